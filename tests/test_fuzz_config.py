"""Fuzzed configs: dotted overrides, `Config.from_dict`, TOML files and `Config.load_json` on arbitrary input.

Protects: whatever a user writes on the command line or in a config file, loading it either succeeds or
raises a one-line `ConfigError` (never a traceback or a hang), and a config that loads round-trips through
JSON unchanged (`save_json` -> `load_json`); `with_overrides` on a loaded config agrees with
`load(path, overrides)`. The deterministic tests pin inputs that once crashed the parser (huge or deeply
nested values, line breaks in key names, non-object JSON). Shared helpers: tests/_fuzz.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing

from hypothesis import assume, given
from hypothesis import strategies as st

from llama4dpo.config import Config
from llama4dpo.errors import ConfigError

from _fuzz import (BIG, JSONISH, NAME_TEXT, SCALARS, attempt, expect_success_or_one_line, fuzz, tmp_path_for,
                   weighted, write)

SECTION_HINTS = {f.name: typing.get_type_hints(type(getattr(Config(), f.name))) for f in dataclasses.fields(Config)}
TINY_DICT = Config.load("tiny").to_dict()  # drawn from by the strategies below, so loaded at import
STR_CHOICES = {"rope_type": ["default", "llama3"], "tokenizer": ["char", "bpe"], "format":
               ["auto", "explicit", "hh", "conversational"], "precision": ["fp32", "bf16"], "loss_type":
               ["sigmoid", "robust", "ipo", "hinge", "simpo"], "device": ["auto", "cpu"], "split": ["train"]}


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
    # an arbitrary string (no line break: see test_override_unknown_key_with_newline_is_accepted_or_rejected_...)
    if draw(st.integers(0, 9)) == 0:
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
    # a JSON list/number at top level: test_load_json_of_non_object_is_accepted_or_rejected_in_one_line
    assume(_json_object_or_unparseable(data))
    path = tmp_path_for(".json")
    path.write_bytes(data)
    cfg, err = attempt(Config.load_json, path, kind=ConfigError)
    path.unlink()
    if cfg is not None:
        assert_round_trip(cfg)


# ---------------------------------------------------------------------------------------------------------
# deterministic inputs that once crashed the parser: success or a one-line ConfigError
# ---------------------------------------------------------------------------------------------------------


def test_override_with_deeply_nested_list_is_accepted_or_rejected_in_one_line():
    expect_success_or_one_line(Config.load, None, ["model.moe_layers=" + "[" * 100_000], kind=ConfigError)


def test_toml_float_field_with_int_too_big_for_float_is_accepted_or_rejected_in_one_line():
    expect_success_or_one_line(Config.load, write(".toml", "[train]\nlr = 1" + "0" * 400 + "\n"), kind=ConfigError)


def test_toml_int_with_5000_digits_is_accepted_or_rejected_in_one_line():
    expect_success_or_one_line(Config.load, write(".toml", "[train]\nmax_steps = " + "9" * 5000 + "\n"),
                               kind=ConfigError)


def test_toml_with_5000_nested_arrays_is_accepted_or_rejected_in_one_line():
    expect_success_or_one_line(Config.load, write(".toml", "[model]\nmoe_layers = " + "[" * 5000 + "]" * 5000 + "\n"),
                               kind=ConfigError)


def test_toml_huge_hex_int_round_trips_through_json_or_is_rejected_in_one_line():
    cfg = expect_success_or_one_line(Config.load, write(".toml", "[model]\nvocab_size = 0x" + "f" * 4000 + "\n"),
                                     kind=ConfigError)
    if cfg is not None:
        assert_round_trip(cfg)


def test_load_json_of_non_object_is_accepted_or_rejected_in_one_line():
    expect_success_or_one_line(Config.load_json, write(".json", "[]"), kind=ConfigError)


def test_override_unknown_key_with_newline_is_accepted_or_rejected_in_one_line():
    expect_success_or_one_line(Config.load, None, ["model.a\nb=1"], kind=ConfigError)
