"""Fuzzed inputs (issue 6, item 5): property-based tests over every place user input enters.

Covered: the config parser (dotted overrides, `Config.from_dict`, TOML presets, `load_json`), file paths,
both tokenizers (encode/decode of arbitrary text and ids, `load_tokenizer` on arbitrary files), the three
preference formats in .jsonl/.jsonl.gz/.json/.csv/.parquet (records with missing/null/non-string/empty fields,
random unicode, junk lines, truncated files), the chat template, and `generate` on arbitrary prompts and
sampling settings. About 4,000 examples in ~30-40 s on 2 cores; LLAMA4DPO_FUZZ_SCALE=N multiplies them.

The only allowed outcomes are success or the project's documented one-line error (`UserError`, or its
subclass `ConfigError` for configs); any other exception is a traceback a user would see, and every example
runs under an alarm so a hang fails too. Successful results are checked as well (config round trip, token
ids in range, bos/eos and lengths of prepared pairs, skip counts, chat-template inverses).

Inputs that trigger the bugs listed at the end of this file are kept out of the property tests (e.g. key
names without newlines, ints below 2**200, no empty parquet file); each bug has a deterministic reproducer
marked `xfail(strict=True, raises=...)`, so fixing it turns that test into an XPASS failure: then remove the
mark and the matching exclusion in the strategies (each exclusion names its test_bug_*). All of them are
fixed now; the test_bug_* functions stay as regression tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gzip
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from llama4dpo.config import Config
from llama4dpo.data import (
    ASSISTANT,
    load_preference_data,
    read_pairs,
    render_prompt,
    render_response,
    render_transcript,
    split_transcripts,
    write_records,
)
from llama4dpo.errors import ConfigError, UserError
from llama4dpo.generate import Sampling, generate
from llama4dpo.tokenizer import SPECIALS, BPETokenizer, CharTokenizer, load_tokenizer, normalize

# ---------------------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------------------

HANG_SECONDS = 20  # one example of any test here takes well under a second
# Multiplies every test's example count, e.g. LLAMA4DPO_FUZZ_SCALE=20 for a nightly or a local bug hunt.
SCALE = float(os.environ.get("LLAMA4DPO_FUZZ_SCALE", "1"))


def fuzz(n: int, *extra_checks):
    return settings(max_examples=max(1, round(n * SCALE)), deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, *extra_checks])


@contextlib.contextmanager
def no_hang(seconds: float = HANG_SECONDS):
    """Fail (instead of hanging the suite) if the body runs longer than `seconds`."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"hang: no result after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def assert_one_line(exc: BaseException, kind: type = UserError) -> None:
    """The documented error: a `kind` whose message is one non-empty line (the CLI prints `error: <msg>`)."""
    assert isinstance(exc, kind), f"expected {kind.__name__}, got {type(exc).__name__}: {exc}"
    msg = str(exc)
    assert msg.strip(), f"empty {type(exc).__name__} message"
    assert "\n" not in msg and "\r" not in msg, f"multi-line {type(exc).__name__}: {msg!r}"


def attempt(fn, *args, kind: type = UserError, **kwargs):
    """(result, None) on success, (None, error) on a one-line `kind`; any other exception propagates."""
    with no_hang():
        try:
            result = fn(*args, **kwargs)
        except kind as e:
            assert_one_line(e, kind)
            event(f"{fn.__name__}: {kind.__name__}")
            return None, e
    event(f"{fn.__name__}: success")
    return result, None


_TMP = tempfile.TemporaryDirectory(prefix="llama4dpo-fuzz-")  # removed at interpreter exit
_COUNTER = itertools.count()


def tmp_path_for(suffix: str) -> Path:
    """A fresh file name per example (hypothesis and function-scoped tmp_path do not mix)."""
    return Path(_TMP.name) / f"f{next(_COUNTER)}{suffix}"


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """Like one_of, with weights (one_of flattens nested one_ofs, so each of their branches counts as one)."""
    return st.sampled_from([s for w, s in choices for _ in range(w)]).flatmap(lambda s: s)


# Text without line breaks, for names that end up inside error messages (see the newline bugs below).
NO_NL = st.characters(exclude_characters="\n\r", exclude_categories=["Cs"])
NAME_TEXT = st.text(NO_NL, max_size=10)

# Chat-template fragments that stress the turn markers, NFKC and line endings.
FRAGMENTS = ["\n\nHuman:", "\n\nAssistant:", "\n\nSystem:", "\nAssistant:", "\n\n\n", "\r\n", "\r\n\r\nHuman:",
             "Assistant:", " ", "\n", "\uff1a", "\uff21ssistant\uff1a", "\ufb01", "\uff11\uff12", "<bos>", "<eos>",
             "\u00e9", "e\u0301", "\U0001f600", "\t", "\u2028", "\x00", "\x85", ":"]
CONTENT = st.lists(st.one_of(st.text(max_size=6), st.sampled_from(FRAGMENTS)), max_size=6).map("".join)
WORDS = ["What is 3 + 4?", "The answer is 7.", "hi", "Hello", " ", "caf\u00e9", "Reverse 'stone'.", "Lima", "?", "7"]
PHRASE = st.lists(weighted((4, st.sampled_from(WORDS)), (1, st.text(max_size=6)), (1, st.sampled_from(FRAGMENTS))),
                  min_size=1, max_size=6).map("".join)  # mostly readable, rarely empty

# ---------------------------------------------------------------------------------------------------------
# 1. config: dotted overrides, from_dict, TOML files, load_json; a loaded config round-trips through JSON
# ---------------------------------------------------------------------------------------------------------

SECTION_HINTS = {f.name: typing.get_type_hints(type(getattr(Config(), f.name))) for f in dataclasses.fields(Config)}
TINY = Config.load("tiny")
TINY_DICT = TINY.to_dict()
STR_CHOICES = {"rope_type": ["default", "llama3"], "tokenizer": ["char", "bpe"], "format":
               ["auto", "explicit", "hh", "conversational"], "precision": ["fp32", "bf16"], "loss_type":
               ["sigmoid", "robust", "ipo", "hinge", "simpo"], "device": ["auto", "cpu"], "split": ["train"]}
BIG = 2**200  # far beyond any field's use, below float overflow (test_bug_float_field_int_overflow)


def _base(tp):
    args = typing.get_args(tp)
    if type(None) in args:
        (tp,) = [a for a in args if a is not type(None)]
    return tp, type(None) in args


def typed_value(key: str, tp) -> st.SearchStrategy:
    """A Python value of (mostly) the field's own type, near the valid range."""
    tp, optional = _base(tp)
    if tp is bool:
        s = st.booleans()
    elif tp is int:
        s = st.one_of(st.sampled_from([1, 2, 4, 8, 16, 32, 64]), st.integers(-2, 300), st.integers(-BIG, BIG))
    elif tp is float:
        s = st.one_of(st.floats(0.0, 0.4), st.floats(-1.0, 2.0), st.floats(), st.integers(-5, 5))
    elif tp is str:
        s = st.one_of(st.sampled_from(STR_CHOICES.get(key, ["x"])), st.text(max_size=8))
    else:  # list[int]
        s = st.lists(st.integers(-1, 6), max_size=6)
    return st.one_of(st.none(), s) if optional else s


def raw_value(key: str, tp) -> st.SearchStrategy:
    """A command-line value string for the field: well-formed ones and junk."""
    tp, optional = _base(tp)
    if tp is bool:
        s = st.sampled_from(["true", "false", "1", "0", "yes", "off", "True", "maybe", "2"])
    elif tp is int:
        s = st.one_of(st.sampled_from(["1", "2", "4", "8", "16", "32", "64", " 2 ", "+4"]),
                      st.integers(-2, 300).map(str), st.integers().map(str))
    elif tp is float:
        s = st.one_of(st.floats(0.0, 0.4).map(repr), st.floats(-1.0, 2.0).map(repr), st.floats().map(repr),
                      st.integers(-5, 5).map(str))
    elif tp is str:
        s = st.sampled_from(STR_CHOICES.get(key, ["x"]))
    else:
        s = st.lists(st.integers(-1, 6), max_size=6).flatmap(
            lambda xs: st.sampled_from([json.dumps(xs), ",".join(map(str, xs))]))
    return st.one_of(st.just("none"), s) if optional else s


RAW_JUNK = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", " ", "none", "null", "None", "nan", "inf", "-inf", "1e999", "-1e999", "0x10", "1_000", " 7 ",
                     "[1,2]", "[]", "1,2,3", ",", "[1", "[[1]]", '["a"]', "[1.5]", "{}", "[null]", "[true]", "[1e999]",
                     "-1", "0", "3.5", "1e-3", "\uff11\uff12", "\u0661", "true", "[" * 50, "=", "a=b"]),
)


@st.composite
def override_item(draw):
    if draw(st.integers(0, 9)) == 0:  # an arbitrary string (no line break: see test_bug_unknown_key_newline)
        return draw(NAME_TEXT) + draw(st.sampled_from(["", "=", "=1", ".x=1"]))
    section = draw(st.sampled_from(list(SECTION_HINTS) + ["", "modle", "Model", "model.hidden_size"]))
    hints = SECTION_HINTS.get(section, {})
    if hints and draw(st.integers(0, 9)):
        key = draw(st.sampled_from(list(hints)))
        current = TINY_DICT[section][key]  # the preset's own value, written as a user would
        if current is None or isinstance(current, list):
            current = "none" if current is None else ",".join(map(str, current))
        current = str(current)
        value = draw(weighted((3, st.just(current)), (3, raw_value(key, hints[key])), (1, RAW_JUNK)))
    else:
        key = draw(st.one_of(NAME_TEXT, st.sampled_from(["", "x", "hidden_size", "lr", "a.b", " vocab_size"])))
        value = draw(RAW_JUNK)
    sep = draw(st.sampled_from(["="] * 6 + [" = ", "==", ":"]))
    return f"{section}.{key}{sep}{value}"


def assert_round_trip(cfg: Config) -> None:
    path = tmp_path_for(".json")
    cfg.save_json(path)
    again = Config.load_json(path)
    path.unlink()
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()


@fuzz(500)
@given(preset=st.sampled_from([None, "tiny", "demo"]), overrides=st.lists(override_item(), max_size=3))
def test_fuzz_config_overrides(preset, overrides):
    cfg, err = attempt(Config.load, preset, overrides, kind=ConfigError)
    if cfg is not None:
        assert_round_trip(cfg)
        base = Config.load(preset)  # with_overrides on a loaded config agrees with load(path, overrides)
        assert attempt(base.with_overrides, overrides, kind=ConfigError)[0] == cfg


# Arbitrary JSON-like values (the data a TOML/JSON file or a Python caller can hand to from_dict).
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-BIG, BIG), st.floats(), st.text(max_size=8))
JSONISH = st.recursive(SCALARS, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(NAME_TEXT, c, max_size=3)),
                       max_leaves=6)


@st.composite
def config_dict(draw):
    """The tiny preset's dict (or {}), with a few fields replaced, deleted or added, or sections broken."""
    d = json.loads(json.dumps(TINY_DICT)) if draw(st.booleans()) else {}
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.integers(0, 12))
        section = draw(st.sampled_from(list(SECTION_HINTS)))
        hints = SECTION_HINTS[section]
        if op <= 5:  # a real field, mostly of its own type
            key = draw(st.sampled_from(list(hints)))
            d.setdefault(section, {})
            if isinstance(d[section], dict):
                d[section][key] = draw(weighted((2, st.just(TINY_DICT[section][key])),
                                                (3, typed_value(key, hints[key])), (1, JSONISH)))
        elif op == 6 and isinstance(d.get(section), dict) and d[section]:
            del d[section][draw(st.sampled_from(sorted(d[section])))]
        elif op == 7:  # an unknown key
            d.setdefault(section, {})
            if isinstance(d[section], dict):
                d[section][draw(NAME_TEXT)] = draw(SCALARS)
        elif op == 8:  # an unknown section
            d[draw(NAME_TEXT)] = draw(st.one_of(st.dictionaries(NAME_TEXT, SCALARS, max_size=2), SCALARS))
        elif op == 9:  # a section that is not a table
            d[section] = draw(JSONISH)
        # op 10-12: nothing (the preset or {} as it is)
    return d


@fuzz(500)
@given(d=config_dict())
def test_fuzz_config_from_dict(d):
    cfg, err = attempt(Config.from_dict, d, kind=ConfigError)
    if cfg is not None:
        assert_round_trip(cfg)


def toml_value(v) -> str | None:
    """TOML text for a JSON-like value (None has no TOML form: the key is dropped)."""
    if v is None:
        return None
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(t for t in map(toml_value, v) if t is not None) + "]"
    return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)} = {t}" for k, t in
                           ((k, toml_value(x)) for k, x in v.items()) if t is not None) + "}"


def render_toml(d: dict) -> str:
    lines = [f"{json.dumps(k, ensure_ascii=False)} = {toml_value(v)}" for k, v in d.items()
             if not isinstance(v, dict) and toml_value(v) is not None]
    for name, section in d.items():
        if isinstance(section, dict):
            lines.append(f"[{json.dumps(name, ensure_ascii=False)}]")
            lines += [f"{json.dumps(k, ensure_ascii=False)} = {t}" for k, t in
                      ((k, toml_value(v)) for k, v in section.items()) if t is not None]
    return "\n".join(lines) + "\n"


@st.composite
def toml_text(draw):
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.text(max_size=60))
    text = render_toml(draw(config_dict()))
    if kind == 1:  # cut or splice somewhere
        i = draw(st.integers(0, len(text)))
        j = draw(st.integers(i, min(len(text), i + 20)))
        splice = draw(st.sampled_from(["", "=", "[", "]", '"', "\n", "[model]\n", "#", "\\", "= ="]))
        text = text[:i] + splice + text[j:]
    return text


@fuzz(400)
@given(text=toml_text(), overrides=st.lists(override_item(), max_size=2),
       encoding=st.sampled_from(["utf-8", "latin-1"]))
def test_fuzz_config_toml_file(text, overrides, encoding):
    path = tmp_path_for(".toml")
    path.write_bytes(text.encode(encoding, "replace"))
    cfg, err = attempt(Config.load, str(path), overrides, kind=ConfigError)
    path.unlink()
    if cfg is not None:
        assert_round_trip(cfg)


def _json_object_or_unparseable(data: bytes) -> bool:
    try:
        return isinstance(json.loads(data), dict)
    except (ValueError, RecursionError):
        return True


@fuzz(200)
@given(data=st.one_of(config_dict().map(lambda d: json.dumps(d).encode()), st.binary(max_size=80),
                      JSONISH.map(lambda v: json.dumps({"model": v}).encode())))
def test_fuzz_config_load_json(data):
    assume(_json_object_or_unparseable(data))  # a JSON list/number at top level: test_bug_load_json_not_object
    path = tmp_path_for(".json")
    path.write_bytes(data)
    cfg, err = attempt(Config.load_json, path, kind=ConfigError)
    path.unlink()
    if cfg is not None:
        assert_round_trip(cfg)


# Components stay < 255 bytes; no NUL or line breaks (test_bug_load_tokenizer_nul_in_path, test_bug_path_newline).
PATH_TEXT = st.text(st.characters(exclude_characters="\x00\n\r", exclude_categories=["Cs"]), max_size=40)


@fuzz(150)
@given(name=PATH_TEXT, where=st.sampled_from(["tmp", "tmp", "relative"]),
       suffix=st.sampled_from(["", ".toml", ".json", ".jsonl", ".csv", ".parquet", ".txt", ".jsonl.gz", "/"]))
def test_fuzz_paths(name, where, suffix):
    """Any path a user can type: a missing file, a directory, an odd name -> success or a one-line error."""
    path = str(Path(_TMP.name) / name) + suffix if where == "tmp" else name + suffix
    attempt(Config.load, path, kind=ConfigError)
    attempt(Config.load_json, path, kind=ConfigError)
    attempt(load_tokenizer, path)
    if suffix not in ("", "/"):  # no suffix: a hub data set name (offline in the tests, but slow to fail)
        attempt(read_pairs, path, TINY.data)


# ---------------------------------------------------------------------------------------------------------
# 2. tokenizers: encode/decode of any text and any ids; load_tokenizer on any file
# ---------------------------------------------------------------------------------------------------------

CORPUS = ["Hello world! The answer is 7.", "\n\nHuman: What is 3 + 4?\n\nAssistant: The answer is 7.",
          "na\u00efve caf\u00e9 \u65e5\u672c\u8a9e \ufb01le \uff11\uff12 <bos> <eos> \t \U0001f600",
          "Reverse the word 'stone'. enots", "The capital of Peru is Lima."] * 20


@functools.lru_cache(maxsize=None)
def tokenizer(kind: str):
    return CharTokenizer.train(CORPUS) if kind == "char" else BPETokenizer.train(CORPUS, vocab_size=300)


ANY_TEXT = st.one_of(st.text(), st.text(st.characters(exclude_categories=())), CONTENT)  # the 2nd has lone surrogates


@fuzz(400)
@given(kind=st.sampled_from(["char", "bpe"]), text=ANY_TEXT, bos=st.booleans(), eos=st.booleans(),
       ids=st.lists(st.one_of(st.integers(-5, 310), st.integers()), max_size=12))
def test_fuzz_tokenizer_encode_decode(kind, text, bos, eos, ids):
    tok = tokenizer(kind)
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
    real = tokenizer(draw(st.sampled_from(["char", "bpe"]))).to_dict()
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
    # A "specials" string holding a line break makes a two-line message: test_bug_tokenizer_specials_newline.
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
# 3. preference data: explicit / hh / conversational records in .jsonl/.json/.csv; the chat template
# ---------------------------------------------------------------------------------------------------------

ROLES = ["user", "assistant", "system"]
# Field values: mostly text, sometimes missing in action. Unhashable roles and lone surrogates are kept out
# (test_bug_conversational_unhashable_role, test_bug_lone_surrogate_*).
JUNK_VALUE = st.one_of(st.none(), st.integers(), st.floats(), st.booleans(), st.just(""), st.just("  \n"),
                       st.lists(st.integers(), max_size=2), st.dictionaries(NAME_TEXT, st.integers(), max_size=2))
TEXT_FIELD = weighted((12, PHRASE), (2, CONTENT), (2, st.text(max_size=150)), (1, JUNK_VALUE))


@st.composite
def messages(draw, min_size=0, max_size=4, valid=None):
    valid = draw(st.integers(0, 9)) > 0 if valid is None else valid
    role = st.sampled_from(ROLES) if valid else st.one_of(st.sampled_from(ROLES + ["bot", "User", ""]),
                                                          st.none(), st.integers())
    content = weighted((3, PHRASE), (1, CONTENT)) if valid else weighted((1, CONTENT), (1, JUNK_VALUE))
    out = []
    for _ in range(draw(st.integers(min_size, max_size))):
        m = {"role": draw(role), "content": draw(content)}
        if not valid and draw(st.integers(0, 5)) == 0:
            m.pop(draw(st.sampled_from(["role", "content"])))
        out.append(m)
    return out


def maybe_break(draw, rec: dict, fields: list[str], value=TEXT_FIELD) -> dict:
    """Drop a field, null it, replace it with junk, or add an unknown field, now and then."""
    for f in fields:
        op = draw(st.integers(0, 15))
        if op == 0:
            rec.pop(f, None)
        elif op == 1:
            rec[f] = draw(value)
    if draw(st.integers(0, 7)) == 0:
        rec[draw(NAME_TEXT)] = draw(SCALARS)
    return rec


@st.composite
def explicit_record(draw):
    rec = {"prompt": draw(TEXT_FIELD), "chosen": draw(TEXT_FIELD), "rejected": draw(TEXT_FIELD)}
    return maybe_break(draw, rec, ["prompt", "chosen", "rejected"])


@st.composite
def hh_record(draw):
    if draw(st.integers(0, 5)) == 0:  # not built as transcripts at all
        return maybe_break(draw, {"chosen": draw(TEXT_FIELD), "rejected": draw(TEXT_FIELD)}, ["chosen", "rejected"])
    context = render_prompt(draw(messages(valid=True, max_size=3)))
    if draw(st.integers(0, 5)) == 0:  # marker missing, or sharing no prefix
        context = draw(st.sampled_from(["", "\n\nHuman: hi", context.replace("Assistant", "Asistant")]))
    rec = {"chosen": context + " " + draw(PHRASE), "rejected": context + " " + draw(PHRASE)}
    return maybe_break(draw, rec, ["chosen", "rejected"])


@st.composite
def conversational_record(draw):
    context = draw(messages(min_size=draw(st.sampled_from([0, 1, 1, 1]))))
    a = draw(messages(min_size=1, max_size=1, valid=draw(st.integers(0, 9)) > 0))
    b = draw(messages(min_size=1, max_size=1, valid=draw(st.integers(0, 9)) > 0))
    for m in a + b:  # mostly an assistant answer
        if draw(st.integers(0, 5)) and m.get("role") is not None:
            m["role"] = "assistant"
    rec = {}
    style = draw(st.integers(0, 4))
    if style == 0:  # UltraFeedback: the prompt string, repeated inside chosen/rejected
        rec["prompt"] = draw(PHRASE)
        rec["chosen"], rec["rejected"] = context + a, context + b
    elif style == 1:  # TRL: prompt messages separate
        rec["prompt"], rec["chosen"], rec["rejected"] = context, a, b
    elif style == 2:  # no prompt at all
        rec["chosen"], rec["rejected"] = context + a, context + b
    elif style == 3:  # message lists as JSON strings (as in CSV)
        rec["chosen"], rec["rejected"] = json.dumps(context + a), json.dumps(context + b)
    else:  # diverging contexts
        rec["chosen"], rec["rejected"] = context + a, draw(messages()) + b
    return maybe_break(draw, rec, ["prompt", "chosen", "rejected"],
                       value=weighted((1, TEXT_FIELD), (1, messages()),
                                      (1, st.text(max_size=5).map(lambda s: "[" + s))))


RECORD = {"explicit": explicit_record(), "hh": hh_record(), "conversational": conversational_record()}
JUNK_LINE = st.one_of(st.text(max_size=40).filter(lambda s: "\n" not in s),
                      st.sampled_from(["", "   ", "{", "}", "[1, 2]", "null", "5", '"text"', "{}", '{"chosen": 1}',
                                       '{"chosen": "a", "rejected": "b"', "\x00", "\ufeff{}"]))


@st.composite
def preference_file(draw, fmt):
    """(path, number of records the reader should count or None) for a file of `fmt` records."""
    records = draw(st.lists(RECORD[fmt], min_size=draw(st.sampled_from([0, 1, 1, 1])), max_size=6))
    container = draw(st.sampled_from(["jsonl", "jsonl", "jsonl", "jsonl.gz", "json", "csv", "parquet"]))
    if container == "parquet" and not (any(records) and all(v is None or isinstance(v, str)
                                                           for r in records for v in r.values())):
        # pyarrow cannot write a column of mixed types; a file without columns: test_bug_parquet_without_columns
        container = "json"
    path = tmp_path_for("." + container)
    if container in ("json", "csv", "parquet"):
        write_records(records, path)
        if container == "parquet" and draw(st.integers(0, 5)) == 0:  # truncated (a corrupt body: see the bugs)
            path.write_bytes(path.read_bytes()[:draw(st.integers(0, path.stat().st_size))])
            return path, None
        return path, (None if container == "csv" else len(records))
    lines = [json.dumps(r, ensure_ascii=draw(st.booleans())) for r in records]
    for _ in range(draw(st.integers(0, 3)) if draw(st.booleans()) else 0):
        lines.insert(draw(st.integers(0, len(lines))), draw(JUNK_LINE))
    data = "\n".join(lines).encode("utf-8")
    if draw(st.integers(0, 9)) == 0:  # invalid UTF-8 somewhere
        i = draw(st.integers(0, len(data)))
        data = data[:i] + b"\xff\xfe" + data[i:]
    n_records = sum(1 for line in data.split(b"\n") if line.strip())
    if container == "jsonl.gz":
        data = gzip.compress(data)
        if draw(st.integers(0, 5)) == 0:  # truncated (a corrupt stream: test_bug_corrupt_gzip)
            data, n_records = data[:draw(st.integers(0, len(data)))], None
    path.write_bytes(data)
    return path, n_records


def check_prepared(ex: dict, tok, max_length: int, max_prompt_length: int) -> None:
    p, c, r = ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]
    assert p and p[0] == tok.bos_id and tok.bos_id not in p[1:] + c + r, "exactly one bos, first"
    assert len(p) <= max_prompt_length
    for resp in (c, r):
        assert resp, "a response keeps at least one token"
        assert len(p) + len(resp) <= max_length
        assert tok.eos_id not in resp[:-1], "eos only at the end"
        assert all(0 <= i < tok.vocab_size for i in p + resp)


def run_preference(fmt: str, file, tok_kind: str, requested: str, strict: bool, eval_fraction: float):
    path, n_records = file
    tok = tokenizer(tok_kind)
    cfg = dataclasses.replace(TINY.data, format=requested, strict=strict, eval_fraction=eval_fraction)
    res, err = attempt(read_pairs, str(path), cfg)
    if res is not None:
        cols, report = res
        if n_records is not None:
            assert report.records == n_records
        assert len(cols["prompt"]) + sum(report.skipped.values()) == report.records
        assert len(cols["is_eval"]) == len(cols["prompt"])
        for prompt, chosen, rejected in zip(cols["prompt"], cols["chosen"], cols["rejected"]):
            assert all(isinstance(t, str) for t in (prompt, chosen, rejected))
            assert chosen != rejected and chosen.strip() and rejected.strip()
    data, err2 = attempt(load_preference_data, str(path), cfg, tok)
    path.unlink()
    if data is not None:
        rep = data.report
        assert res is not None, "read_pairs failed where load_preference_data succeeded"
        assert rep.kept + sum(rep.skipped.values()) == rep.records
        assert len(data.train) == rep.n_train >= 1 and len(data.eval) == rep.n_eval
        for split in (data.train, data.eval):
            for ex in split:
                check_prepared(ex, tok, cfg.max_length, cfg.max_prompt_length)
        assert isinstance(rep.summary(), str)


PREFERENCE_ARGS = dict(tok_kind=st.sampled_from(["char", "bpe"]), strict=st.integers(0, 7).map(lambda i: i == 0),
                       eval_fraction=st.sampled_from([0.0, 0.05, 0.5, 0.9]))


@fuzz(250)
@given(file=preference_file("explicit"), requested=st.sampled_from(["auto", "explicit", "auto"]), **PREFERENCE_ARGS)
def test_fuzz_preference_explicit(file, requested, tok_kind, strict, eval_fraction):
    run_preference("explicit", file, tok_kind, requested, strict, eval_fraction)


@fuzz(250)
@given(file=preference_file("hh"), requested=st.sampled_from(["auto", "hh", "auto"]), **PREFERENCE_ARGS)
def test_fuzz_preference_hh(file, requested, tok_kind, strict, eval_fraction):
    run_preference("hh", file, tok_kind, requested, strict, eval_fraction)


@fuzz(250)
@given(file=preference_file("conversational"), requested=st.sampled_from(["auto", "conversational", "auto"]),
       **PREFERENCE_ARGS)
def test_fuzz_preference_conversational(file, requested, tok_kind, strict, eval_fraction):
    run_preference("conversational", file, tok_kind, requested, strict, eval_fraction)


MARKER = re.compile(r"\n\n(Human|Assistant|System):")
ROLE_OF = {"Human": "user", "Assistant": "assistant", "System": "system"}


@fuzz(500)
@given(msgs=messages(valid=True), a=CONTENT, b=CONTENT, other=st.tuples(CONTENT, CONTENT))
def test_fuzz_chat_template(msgs, a, b, other):
    with no_hang():
        transcript = render_transcript(msgs)
        prompt = render_prompt(msgs)
        assert prompt == transcript + ASSISTANT
        # exactly one turn marker per message, in order (markers inside content are escaped)
        assert [ROLE_OF[r] for r in MARKER.findall(transcript)] == [m["role"] for m in msgs]
        # the HH implicit prompt of two answers to the same conversation is that conversation's prompt
        chosen = render_transcript(msgs + [{"role": "assistant", "content": a}])
        rejected = render_transcript(msgs + [{"role": "assistant", "content": b}])
        assert chosen == prompt + render_response(a)
        assert split_transcripts(chosen, rejected) == (prompt, render_response(a), render_response(b))
        # on arbitrary texts: None, or a split that puts the texts back together
        c, r = other
        split = split_transcripts(c, r)
        if split is not None:
            p, c2, r2 = split
            assert p.endswith(ASSISTANT) and p + c2 == c and p + r2 == r


# ---------------------------------------------------------------------------------------------------------
# 4. generate on arbitrary prompt strings and sampling settings
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The tiny model is ~10x faster on one thread than on two contended ones (a shared 2-core CI box)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@functools.lru_cache(maxsize=None)
def tiny_model(kind: str):
    from llama4dpo.model import LlamaModel

    cfg = Config.load("tiny", [f"model.vocab_size={tokenizer(kind).vocab_size}"])
    return LlamaModel(cfg.model).init_weights(seed=0).eval()


PROMPT = weighted((2, CONTENT), (2, PHRASE), (1, st.text(max_size=30)),
                  (1, st.tuples(st.text(min_size=1, max_size=8), st.integers(5, 40)).map(lambda t: t[0] * t[1])))
# Includes NaN, inf and vanishing temperatures and top_p (test_bug_generate_*): errors or greedy, never a crash.
TEMPERATURE = weighted((2, st.just(0.0)), (3, st.floats(1e-3, 5.0)), (1, st.floats(1e-60, 1e-3)),
                       (1, st.just(math.inf)), (1, st.just(math.nan)), (1, st.floats(-10, -1e-12)))
TOP_P = weighted((3, st.just(1.0)), (4, st.floats(1e-60, 1.0)), (1, st.floats()), (1, st.floats(-1.0, 2.0)))


@fuzz(400)
@given(kind=st.sampled_from(["char", "bpe"]), prompts=st.lists(PROMPT, min_size=1, max_size=3),
       max_new_tokens=weighted((6, st.integers(1, 4)), (1, st.integers(-1, 0))), temperature=TEMPERATURE,
       top_k=weighted((3, st.just(0)), (3, st.integers(1, 400)), (1, st.integers(-2, -1))), top_p=TOP_P,
       seed=st.one_of(st.none(), st.integers(0, 2**32)), stop=st.lists(st.text(max_size=3), max_size=2),
       use_cache=st.integers(0, 7).map(bool))
def test_fuzz_generate(kind, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop, use_cache):
    tok, model = tokenizer(kind), tiny_model(kind)
    s = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop)
    out, err = attempt(generate, model, tok, prompts, s, use_cache=use_cache)
    valid = max_new_tokens >= 1 and math.isfinite(temperature) and temperature >= 0 and top_k >= 0 and 0 < top_p <= 1
    fits = max(len(tok.encode(p, bos=True)) for p in prompts) + max_new_tokens <= model.cfg.max_position_embeddings
    assert (err is None) == (valid and fits), f"unexpected outcome: {err!r}"
    if out is not None:
        assert len(out) == len(prompts) and all(isinstance(t, str) for t in out)
        assert not any(x and x in t for x in stop for t in out)


# ---------------------------------------------------------------------------------------------------------
# Bugs the fuzzing found: deterministic reproducers. Each should give success or a one-line UserError;
# `raises=` pins today's failure, so a fix shows up as an XPASS (strict) and the mark must go.
# ---------------------------------------------------------------------------------------------------------


def expect_success_or_one_line(fn, *args, kind=UserError, **kwargs):
    try:
        return fn(*args, **kwargs)
    except kind as e:
        assert_one_line(e, kind)


def write(suffix: str, data: str | bytes) -> Path:
    path = tmp_path_for(suffix)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
    return path


def test_bug_override_deeply_nested_list():
    expect_success_or_one_line(Config.load, None, ["model.moe_layers=" + "[" * 100_000], kind=ConfigError)


def test_bug_float_field_int_overflow():
    expect_success_or_one_line(Config.load, write(".toml", "[train]\nlr = 1" + "0" * 400 + "\n"), kind=ConfigError)


def test_bug_toml_int_too_many_digits():
    expect_success_or_one_line(Config.load, write(".toml", "[train]\nmax_steps = " + "9" * 5000 + "\n"),
                               kind=ConfigError)


def test_bug_toml_deeply_nested():
    expect_success_or_one_line(Config.load, write(".toml", "[model]\nmoe_layers = " + "[" * 5000 + "]" * 5000 + "\n"),
                               kind=ConfigError)


def test_bug_toml_hex_int_does_not_round_trip():
    cfg = expect_success_or_one_line(Config.load, write(".toml", "[model]\nvocab_size = 0x" + "f" * 4000 + "\n"),
                                     kind=ConfigError)
    if cfg is not None:
        assert_round_trip(cfg)


def test_bug_load_json_not_object():
    expect_success_or_one_line(Config.load_json, write(".json", "[]"), kind=ConfigError)


def test_bug_unknown_key_newline():
    expect_success_or_one_line(Config.load, None, ["model.a\nb=1"], kind=ConfigError)


def test_bug_load_tokenizer_deeply_nested():
    expect_success_or_one_line(load_tokenizer, write(".json", "[" * 100_000))


def test_bug_tokenizer_specials_newline():
    expect_success_or_one_line(load_tokenizer, write(".json", json.dumps({"type": "char", "version": 1,
                                                                          "specials": "a\nb"})))


def test_bug_conversational_unhashable_role():
    rec = {"chosen": [{"role": ["user"], "content": "hi"}, {"role": "assistant", "content": "a"}],
           "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "b"}]}
    expect_success_or_one_line(load_preference_data, str(write(".jsonl", json.dumps(rec) + "\n")), TINY.data,
                               tokenizer("char"))


def test_bug_lone_surrogate_in_prompt():
    path = write(".jsonl", '{"prompt": "Hi \\ud800", "chosen": " a", "rejected": " b"}\n')
    expect_success_or_one_line(load_preference_data, str(path), TINY.data, tokenizer("char"))


def test_bug_lone_surrogate_in_response():
    path = write(".jsonl", '{"prompt": "Hi", "chosen": " a\\udc80", "rejected": " b"}\n')
    expect_success_or_one_line(load_preference_data, str(path), TINY.data, tokenizer("char"))


def test_bug_field_name_newline():
    path = write(".jsonl", json.dumps({"a\nb": 1}) + "\n")
    expect_success_or_one_line(load_preference_data, str(path), TINY.data, tokenizer("char"))


def test_bug_generate_nan_temperature():
    s = Sampling(max_new_tokens=2, temperature=math.nan, seed=0)
    expect_success_or_one_line(generate, tiny_model("char"), tokenizer("char"), ["Hi"], s)


def test_bug_generate_tiny_temperature():
    s = Sampling(max_new_tokens=2, temperature=1e-40, seed=0)
    expect_success_or_one_line(generate, tiny_model("char"), tokenizer("char"), ["Hi"], s)


def test_bug_generate_tiny_top_p():
    s = Sampling(max_new_tokens=2, temperature=1.0, top_p=1e-50, seed=0)
    expect_success_or_one_line(generate, tiny_model("char"), tokenizer("char"), ["Hi"], s)


def test_bug_corrupt_gzip():
    header = bytes([0x1F, 0x8B, 8, 0, 0, 0, 0, 0, 0, 0xFF])  # a gzip header, then a deflate block of reserved type
    path = write(".jsonl.gz", header + b"\x07\x00\x00")
    expect_success_or_one_line(read_pairs, str(path), TINY.data)


def test_bug_parquet_invalid_utf8():
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path_for(".parquet")
    pq.write_table(pa.table({"prompt": ["hello"], "chosen": [" a"], "rejected": [" b"]}), path, compression="none")
    path.write_bytes(path.read_bytes().replace(b"hello", b"\xffello"))
    expect_success_or_one_line(read_pairs, str(path), TINY.data)


@pytest.mark.parametrize("call", ["Config.load", "load_tokenizer", "read_pairs"])
def test_bug_file_name_too_long(call):
    name = "a" * 300 + ".jsonl"
    if call == "Config.load":
        expect_success_or_one_line(Config.load, name, kind=ConfigError)
    elif call == "load_tokenizer":
        expect_success_or_one_line(load_tokenizer, name)
    else:
        expect_success_or_one_line(read_pairs, name, TINY.data)


def test_bug_load_tokenizer_nul_in_path():
    expect_success_or_one_line(load_tokenizer, "a\x00b")


def test_bug_path_newline():
    expect_success_or_one_line(Config.load, str(Path(_TMP.name) / "a\nb.toml"), kind=ConfigError)


def test_bug_parquet_without_columns():
    # In a child process capped at 3 GB of address space: unguarded, this input takes every byte of the host.
    code = """if True:
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))
        from llama4dpo.config import Config
        from llama4dpo.data import read_pairs, write_records
        from llama4dpo.errors import UserError
        path = write_records([], sys.argv[1])
        try:
            read_pairs(str(path), Config.load("tiny").data)
            print("success")
        except UserError as e:
            print("UserError" if "\\n" not in str(e) else "multi-line UserError")
        except MemoryError:
            print("MemoryError")
    """
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path_for(".parquet"))], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert out.stdout.strip() in ("success", "UserError"), out.stdout + out.stderr[-2000:]
