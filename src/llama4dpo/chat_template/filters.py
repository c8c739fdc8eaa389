"""Every jinja filter wrapped with the bounds: int arguments limited, size checks for the filters that
multiply sizes (join, indent, replace, format), wordwrap refused, results checked."""

from __future__ import annotations

import functools
import inspect

from .limits import _Limit, _check_format, _check_ints, _check_result, _require


def _guard_filter(name: str, f):
    """Wrap a jinja filter: its int arguments bounded (`center(10**10)`, `slice(10**9)`), size checks for the
    filters that multiply sizes, its result checked."""
    from jinja2.utils import _PassArg

    skip = 2 if _PassArg.from_obj(f) else 1  # (context,) value: the value itself may be any number
    signature = None

    @functools.wraps(f)  # keeps jinja's pass_context/pass_eval_context marker
    def guarded(*args, **kwargs):
        nonlocal signature
        _check_ints((*args[skip:], *kwargs.values()), f"the filter {name}")
        if name in _FILTER_CHECKS:
            signature = signature or inspect.signature(f)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            _FILTER_CHECKS[name](bound.arguments)
            args, kwargs = bound.args, bound.kwargs
        return _check_result(f(*args, **kwargs))

    return guarded


def _check_join_filter(a: dict) -> None:
    items = a["value"] = list(a["value"])
    _require(len(str(a["d"])) * len(items) + sum(len(str(i)) for i in items), "join")


def _check_indent_filter(a: dict) -> None:
    s, width = str(a["s"]), a["width"]
    pad = len(width) if isinstance(width, str) else int(width)
    _require(len(s) + (s.count("\n") + 1) * pad, "indent")


def _check_replace_filter(a: dict) -> None:
    s, new = str(a["s"]), str(a["new"])
    _require(len(s) + (len(s) + 1) * len(new), "replace")


def _refuse_wordwrap(a: dict) -> None:
    raise _Limit("the filter wordwrap is not allowed in a chat template")


_FILTER_CHECKS = {"join": _check_join_filter, "indent": _check_indent_filter, "replace": _check_replace_filter,
                  "format": lambda a: _check_format(a["value"]), "wordwrap": _refuse_wordwrap}
