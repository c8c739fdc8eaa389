"""The bounds on a render: MAX_OUTPUT_CHARS for every value built, TIME_LIMIT_S of template code, and the
checks made before an operator or a str method allocates."""

from __future__ import annotations

import contextvars
import math
import re
import time
from typing import Any

MAX_OUTPUT_CHARS = 1_000_000  # ~250k tokens: far above any context length, far below a memory problem
TIME_LIMIT_S = 5.0            # a real template renders in about a millisecond
_MAX_INT_BITS = 1 << 16       # integers a template may build (`**`, `*`); 65536 bits is ~20k digits
_MAX_JSON_INDENT = 64
_HUGE_WIDTH = re.compile(r"\d{7,}")  # a width/precision of 1,000,000 or more in a format string
_DEADLINE: contextvars.ContextVar[float] = contextvars.ContextVar("chat_template_deadline", default=math.inf)


class _Limit(Exception):
    """A render bound was hit (size or time)."""


def _time_limited(run):
    token = _DEADLINE.set(time.monotonic() + TIME_LIMIT_S)
    try:
        return run()
    finally:
        _DEADLINE.reset(token)


def _tick() -> None:
    """Called on every loop iteration and every call: a loop that writes nothing (nested `range` loops) or
    a macro recursing in width is never stopped by a size bound."""
    if time.monotonic() > _DEADLINE.get():
        raise _Limit(f"rendering took longer than {TIME_LIMIT_S:g} s")


# Size checks: refuse before allocating where the size is known in advance, check results otherwise


def _size(x: Any) -> int:
    """Characters (str/bytes), or elements plus their sizes (containers, counted as a tree: a list holding
    the same big list twice counts it twice, as its repr would). Raises _Limit once past the bound, so
    counting a structure that shares itself exponentially stops early."""
    total, stack = 0, [x]
    while stack:
        v = stack.pop()
        if isinstance(v, (str, bytes, bytearray)):
            total += len(v)
        elif isinstance(v, (list, tuple)):
            total += len(v)
            stack.extend(v)
        elif isinstance(v, dict):
            total += len(v)
            stack.extend(v.keys())
            stack.extend(v.values())
        else:
            total += 1
        if total > MAX_OUTPUT_CHARS:
            _require(total, "a value")
    return total


def _require(size: int, what: str) -> None:
    if size > MAX_OUTPUT_CHARS:
        raise _Limit(f"{what} would exceed the output bound of {MAX_OUTPUT_CHARS:,} characters")


def _join_bounded(parts) -> str:
    out, total = [], 0
    for p in parts:
        total += len(p)
        _require(total, "the rendered text")
        out.append(p)
    return "".join(out)


def _check_result(value: Any) -> Any:
    if isinstance(value, (str, bytes, bytearray, list, tuple, dict)):
        _size(value)
    return value


def _is_seq(x: Any) -> bool:
    return isinstance(x, (str, bytes, list, tuple))


def _check_ints(values, what: str) -> None:
    for n in values:
        if isinstance(n, int) and not isinstance(n, bool) and abs(n) > MAX_OUTPUT_CHARS:
            raise _Limit(f"{what}: the number {n} is larger than the output bound")


def _check_binop(op: str, left: Any, right: Any) -> None:
    ints = all(isinstance(x, int) for x in (left, right))
    if op == "+" and _is_seq(left) and _is_seq(right):
        _require(_size(left) + _size(right), "a concatenation")
    elif op == "*" and ints:
        if abs(left).bit_length() + abs(right).bit_length() > _MAX_INT_BITS:
            raise _Limit("a product is too large")
    elif op == "*":
        seq, n = (left, right) if isinstance(right, int) else (right, left)
        if _is_seq(seq) and isinstance(n, int):
            _require(_size(seq) * max(n, 0), "a repetition")
    elif op == "**" and ints and right > 0 and right * max(abs(left).bit_length(), 1) > _MAX_INT_BITS:
        raise _Limit("a power is too large")
    elif op == "%" and isinstance(left, (str, bytes)):
        _check_format(left)
        _check_ints(right if isinstance(right, tuple) else (right,), "a format width")  # '%*d' % (width, x)


def _check_format(fmt: Any) -> None:
    if isinstance(fmt, (str, bytes)) and _HUGE_WIDTH.search(str(fmt)):
        raise _Limit("a format string with a width of a million or more")


# str methods whose result can be much larger than their inputs in ways not worth checking: refused.
_REFUSED_STR_METHODS = {"expandtabs", "translate", "maketrans"}


def _check_call(obj: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Before a call from the template: the str methods that can multiply sizes are checked or refused
    (padding widths bounded, `replace` and `join` sized). Other calls are checked by their result."""
    target = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format / format_map
    owner = getattr(target, "__self__", None)
    if not isinstance(owner, (str, bytes)):
        return args, kwargs
    name = getattr(target, "__name__", "")
    _check_ints((*args, *kwargs.values()), f"the string method {name}")
    if name in _REFUSED_STR_METHODS:
        raise _Limit(f"the string method {name} is not allowed in a chat template")
    if name in ("format", "format_map"):
        _check_format(owner)
    elif name == "replace" and len(args) >= 2 and _is_seq(args[1]):
        _require(len(owner) + (len(owner) + 1) * len(args[1]), "replace")
    elif name == "join" and args:
        items = list(args[0])  # a generator is read once here, so the call gets the list
        _require(len(owner) * len(items) + sum(_size(i) for i in items), "join")
        args = (items, *args[1:])
    return args, kwargs
