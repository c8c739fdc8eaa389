"""Fuzzed tokenizers: encode/decode of any text and any ids, and `load_tokenizer` on any file.

Protects: for both the char and the byte-level BPE tokenizer, encoding any text (lone surrogates, NFKC
forms, text that looks like special tokens) gives in-range ids with bos/eos only where asked and never a
special id from text, batch encoding agrees with single encoding, and decoding inverts encoding (up to
<unk> for char, U+FFFD for lone surrogates in BPE); decoding arbitrary ids gives a string. A tokenizer file
that is junk, arbitrary JSON or a real tokenizer.json with parts broken or cut either loads into a working
tokenizer or gives a one-line `UserError`. Shared helpers: tests/_fuzz.py; fixtures: tests/conftest.py.
"""

from __future__ import annotations

import json
import re

from hypothesis import assume, given
from hypothesis import strategies as st

from llama4dpo.tokenizer import SPECIALS, load_tokenizer, normalize

from _fuzz import (CONTENT, JSONISH, SCALARS, attempt, expect_success_or_one_line, fuzz, no_hang, tmp_path_for,
                   tokenizer, write)

ANY_TEXT = st.one_of(st.text(), st.text(st.characters(exclude_categories=())), CONTENT)  # the 2nd has lone surrogates


@fuzz(400)
@given(kind=st.sampled_from(["char", "bpe"]), text=ANY_TEXT, bos=st.booleans(), eos=st.booleans(),
       ids=st.lists(st.one_of(st.integers(-5, 310), st.integers()), max_size=12))
def test_fuzz_tokenizer_encode_decode(tiny_tokenizer, kind, text, bos, eos, ids):
    tok = tiny_tokenizer(kind)
    with no_hang():
        out = tok.encode(text, bos=bos, eos=eos)
        body = out[bos:len(out) - eos]
        assert out[:bos] == [tok.bos_id] * bos and out[len(out) - eos:] == [tok.eos_id] * eos
        assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in out)
        assert all(i >= len(SPECIALS) or (kind == "char" and i == tok.unk_id) for i in body)  # text never -> specials
        assert tok.encode_batch([text, text], bos=bos, eos=eos) == [out, out]
        back = tok.decode(out)
        norm = normalize(text)
        if kind == "char":  # characters outside the vocabulary are <unk>, dropped when decoding
            assert back == "".join(c for c in norm if c in tok.stoi)
        else:  # byte-level: exact, except lone surrogates (no UTF-8 form) -> U+FFFD
            assert back == re.sub("[\ud800-\udfff]", "\ufffd", norm)
        assert isinstance(tok.decode(ids), str) and isinstance(tok.decode(ids, skip_special=False), str)


@st.composite
def tokenizer_file(draw):
    """Bytes of a tokenizer.json: junk, arbitrary JSON, or a real tokenizer's dict with parts broken."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=100))
    if kind == 1:
        return json.dumps(draw(JSONISH)).encode()
    real = tokenizer(draw(st.sampled_from(["char", "bpe"]))).to_dict()  # (the tiny_tokenizer fixture's tokenizers)
    d = dict(real)
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(["type", "version", "specials", "chars", "tokenizer"]))
        op = draw(st.integers(0, 3))
        if op == 0:
            d.pop(key, None)
        elif op == 1:
            d[key] = draw(JSONISH)
        elif op == 2 and key == "tokenizer" and isinstance(d.get(key), str):  # splice the HF tokenizer JSON
            s = d[key]
            i = draw(st.integers(0, len(s)))
            j = draw(st.integers(i, min(len(s), i + draw(st.sampled_from([1, 5, 50, 5000])))))
            d[key] = s[:i] + draw(st.one_of(st.sampled_from(["", "0", "-1", '"', "{", "}", "[", "null", "99999999999"]),
                                            st.text(max_size=5))) + s[j:]
        elif op == 2 and key == "chars":
            d[key] = draw(st.lists(st.one_of(st.characters(), st.text(max_size=2)), max_size=8))
        else:
            d[key] = real.get(key) if key in real else draw(SCALARS)
    data = json.dumps(d, ensure_ascii=draw(st.booleans())).encode()
    if draw(st.integers(0, 5)) == 0:
        data = data[:draw(st.integers(0, len(data)))]
    return data


@fuzz(400)
@given(data=tokenizer_file(), text=st.text(max_size=20))
def test_fuzz_load_tokenizer(data, text):
    # A "specials" string holding a line break makes a two-line message:
    # test_load_tokenizer_with_newline_in_specials_is_accepted_or_rejected_in_one_line.
    try:
        d = json.loads(data)
        assume(not (isinstance(d, dict) and isinstance(d.get("specials"), str) and re.search("[\r\n]", d["specials"])))
    except (ValueError, RecursionError):
        pass
    path = tmp_path_for(".json")
    path.write_bytes(data)
    tok, err = attempt(load_tokenizer, path)
    path.unlink()
    if tok is not None:
        ids = tok.encode(text, bos=True, eos=True)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert isinstance(tok.decode(ids), str)


# ---------------------------------------------------------------------------------------------------------
# deterministic tokenizer files that once crashed `load_tokenizer`: success or a one-line UserError
# ---------------------------------------------------------------------------------------------------------


def test_load_tokenizer_on_deeply_nested_json_is_accepted_or_rejected_in_one_line():
    expect_success_or_one_line(load_tokenizer, write(".json", "[" * 100_000))


def test_load_tokenizer_with_newline_in_specials_is_accepted_or_rejected_in_one_line():
    expect_success_or_one_line(load_tokenizer, write(".json", json.dumps({"type": "char", "version": 1,
                                                                          "specials": "a\nb"})))
