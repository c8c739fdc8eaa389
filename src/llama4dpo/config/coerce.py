"""Checking (TOML) or parsing (command line) one config value against its field's type annotation."""

from __future__ import annotations

import json
import math
import types
import typing

from ..errors import ConfigError


class _RAW(str):
    """A value typed on the command line: parsed against the target field's type."""


def _coerce(value, tp, key: str):
    """Check (TOML) or parse (command line) `value` against the annotation `tp`."""
    raw = isinstance(value, _RAW)
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType) and set(args) == {int, str}:  # a count or a word ("auto")
        if raw:
            try:
                return int(value)
            except ValueError:
                return str(value.strip())
        if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        raise ConfigError(f"{key}: expected an integer or a string, got {value!r}"[:200])
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None or (raw and value.lower() in ("none", "null", "")):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is list:
        (elem,) = args
        if raw:
            text = value.strip()
            try:
                value = json.loads(text) if text.startswith("[") else [v for v in text.split(",") if v.strip()]
            except (ValueError, RecursionError):
                raise ConfigError(f"{key}: expected a list like [1,2,3], got {text!r}") from None
            if not isinstance(value, list):
                raise ConfigError(f"{key}: expected a list, got {text!r}")
            value = [_RAW(str(v)) if not isinstance(v, str) else _RAW(v) for v in value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, elem, key) for v in value]
    if tp is bool:
        if raw:
            low = value.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
        elif isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        v = value
        if raw:
            try:
                v = int(value)
            except ValueError:
                raise ConfigError(f"{key}: expected an integer, got {str(value)[:40]!r}") from None
        if not isinstance(v, int) or isinstance(v, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}"[:200])
        if abs(v) >= 2 ** 63:
            raise ConfigError(f"{key}: integer out of range")
        return v
    if tp is float:
        try:
            if raw:
                v = float(value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                v = float(value)
            else:
                raise TypeError
        except (ValueError, OverflowError):
            raise ConfigError(f"{key}: expected a finite number, got {str(value)[:40]!r}") from None
        except TypeError:
            raise ConfigError(f"{key}: expected a number, got {value!r}"[:200]) from None
        if not math.isfinite(v):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return v
    if tp is str:
        if isinstance(value, str):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config field type {tp} for {key}")  # a bug in this file, not user input
