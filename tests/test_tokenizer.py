"""Tokenizers: round trips, NFKC, special ids, user text that looks like a special, save/load, bad files."""

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama4dpo.errors import UserError
from llama4dpo.tokenizer import (
    SPECIALS,
    BPETokenizer,
    CharTokenizer,
    build_tokenizer,
    load_tokenizer,
    normalize,
    tokenizer_from_dict,
)

ALPHABET = "abcdefghij XYZ.,\n"
# Tokenizer fixtures are module-scoped; hypothesis only worries that they are not reset between examples.
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def make_corpus(n_docs=300, seed=0):
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "mat", "naïve", "café", "日本語", "ﬁle", "１２", "hello!", "\t"]
    words += SPECIALS  # typed by users, they must stay plain text
    return [" ".join(rng.choices(words, k=rng.randint(1, 40))) for _ in range(n_docs)]


@pytest.fixture(scope="module")
def char_tok():
    return CharTokenizer.train(make_corpus() + [ALPHABET])


@pytest.fixture(scope="module")
def bpe_tok():
    return BPETokenizer.train(make_corpus(), vocab_size=300)


@pytest.fixture(params=["char", "bpe"])
def tok(request, char_tok, bpe_tok):
    return char_tok if request.param == "char" else bpe_tok


def test_normalize_is_nfkc():
    assert normalize("ﬁ １２") == "fi 12"


def test_specials_have_fixed_ids(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.decode([0, 1, 2, 3], skip_special=False) == "".join(SPECIALS)
    assert tok.decode([0, 1, 2, 3]) == ""


def test_bpe_specials_are_the_first_vocabulary_entries(bpe_tok):
    assert [bpe_tok._tok.id_to_token(i) for i in range(4)] == list(SPECIALS)
    assert bpe_tok.vocab_size == 300


def test_round_trip_on_corpus(tok):
    for text in make_corpus(50, seed=1):
        ids = tok.encode(text)
        assert all(4 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == normalize(text)


def test_bos_eos_flags(tok):
    ids = tok.encode("the cat", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert ids[1:-1] == tok.encode("the cat")
    assert tok.decode(ids, skip_special=False) == "<bos>the cat<eos>"
    assert tok.encode_batch(["the", "cat"], eos=True) == [tok.encode("the", eos=True), tok.encode("cat", eos=True)]


def test_special_names_in_user_text_are_plain_text(tok):
    for name in SPECIALS:
        ids = tok.encode(f"a{name}b")
        assert not set(ids) & {0, 1, 2, 3}
        assert tok.decode(ids) == f"a{name}b"


def test_nfkc_applied_identically(tok):
    assert tok.encode("ﬁle １２") == tok.encode("file 12")
    assert tok.decode(tok.encode("ﬁle １２")) == "file 12"


def test_char_unknown_chars_map_to_unk(char_tok):
    ids = char_tok.encode("a€b")  # "€" never occurs in the training corpus
    assert ids == [char_tok.stoi["a"], char_tok.unk_id, char_tok.stoi["b"]]
    assert char_tok.decode(ids) == "ab"
    assert char_tok.decode(ids, skip_special=False) == "a<unk>b"
    assert char_tok.encode("\U0010ffff\ud800") == [char_tok.unk_id] * 2  # beyond the table, lone surrogate


def test_char_vocab_is_sorted_and_deterministic():
    a = CharTokenizer.train(["cab", "ﬁ"])
    assert a.itos == list(SPECIALS) + ["a", "b", "c", "f", "i"]
    assert a.fingerprint() == CharTokenizer.train(iter(["ﬁ", "bca"])).fingerprint()


def test_bpe_lone_surrogate_does_not_crash(bpe_tok):
    assert bpe_tok.decode(bpe_tok.encode("a\ud800b")) == "a\ufffdb"


def test_out_of_range_ids_decode_as_unk(tok):
    assert tok.decode([tok.vocab_size + 5]) == ""
    assert tok.decode([tok.vocab_size + 5], skip_special=False) == "<unk>"


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_save_load_round_trip(tmp_path, kind):
    original = build_tokenizer(kind, make_corpus(100), vocab_size=280)
    path = original.save(tmp_path)  # a directory -> DIR/tokenizer.json
    assert path == tmp_path / "tokenizer.json"
    assert json.loads(path.read_text())["type"] == kind
    for loaded in (load_tokenizer(tmp_path), load_tokenizer(path), tokenizer_from_dict(original.to_dict())):
        assert type(loaded) is type(original)
        assert loaded.fingerprint() == original.fingerprint()
        assert loaded.vocab_size == original.vocab_size
        texts = make_corpus(20, seed=2) + ["a<eos>b €"]
        assert loaded.encode_batch(texts, bos=True) == original.encode_batch(texts, bos=True)


def test_different_tokenizers_have_different_fingerprints(char_tok, bpe_tok):
    assert char_tok.fingerprint() != bpe_tok.fingerprint()
    assert char_tok.fingerprint() != CharTokenizer.train(["xyz"]).fingerprint()


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "not found"),
        ("{not json", "not valid JSON"),
        ('{"type": "wordpiece", "version": 1}', "unknown tokenizer type 'wordpiece'"),
        ("[1, 2]", "unknown tokenizer type"),
        ('{"type": "char", "version": 99, "chars": []}', "unsupported tokenizer format"),
        ('{"type": "char", "version": 1}', "corrupt char tokenizer"),
        ('{"type": "bpe", "version": 1, "tokenizer": "{\\"oops\\": 1}"}', "corrupt bpe tokenizer"),
    ],
)
def test_bad_files_raise_one_line_user_error(tmp_path, content, match):
    path = tmp_path / "tokenizer.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=match) as excinfo:
        load_tokenizer(path)
    message = str(excinfo.value)
    assert "\n" not in message and str(path) in message


def test_build_tokenizer_rejects_unknown_kind_and_tiny_bpe_vocab():
    with pytest.raises(UserError, match="unknown tokenizer kind"):
        build_tokenizer("wordpiece", ["abc"])
    with pytest.raises(UserError, match="at least 260"):
        build_tokenizer("bpe", ["abc"], vocab_size=100)


@PROPERTY
@given(text=st.text(alphabet=ALPHABET, max_size=200))
def test_char_round_trip_in_vocabulary(char_tok, text):
    assert char_tok.decode(char_tok.encode(text)) == normalize(text)


@PROPERTY
@given(text=st.text(max_size=100))
def test_char_round_trip_drops_only_unknown_chars(char_tok, text):
    ids = char_tok.encode(text, bos=True, eos=True)
    assert len(ids) == len(normalize(text)) + 2  # one id per normalised character
    known = "".join(c for c in normalize(text) if c in char_tok.stoi)
    assert char_tok.decode(ids) == known


@PROPERTY
@given(text=st.text(max_size=100))
def test_bpe_round_trip_any_text(bpe_tok, text):
    ids = bpe_tok.encode(text)
    assert bpe_tok.unk_id not in ids
    assert bpe_tok.decode(ids) == normalize(text)
    assert bpe_tok.encode_batch([text, text]) == [ids, ids]
