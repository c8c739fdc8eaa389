"""A pretrained model's own chat template (Jinja), rendered the way transformers renders it - but safely.

    render_chat(template, [{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")

The template sees transformers' variables: `messages`, `add_generation_prompt`, `bos_token`, `eos_token`
(left undefined when None, as transformers leaves a missing special token out), `tools`=None,
`documents`=None and any extra keyword (e.g. `pad_token`, `unk_token`, `date_string`); and its globals
`raise_exception`, `strftime_now`, `namespace`, `dict`, `range`, `cycler`, `joiner`; and its `tojson` filter.
The environment is transformers' (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, loop controls,
and `{% generation %}` blocks, rendered as their body).

A template is untrusted input (it comes with a downloaded model). The sandbox stops it from reaching Python
internals (`''.__class__`, `cycler.__init__.__globals__`, ...); on top of that, a render is bounded:
at most MAX_OUTPUT_CHARS characters for the output and for every string, list or number built on the way
(checked before `*`, `+`, `~`, `%`, padding, `replace`, `join`, `indent` and format widths allocate), and at
most TIME_LIMIT_S seconds of template code. Every failure - syntax error, sandbox refusal, undefined call,
`raise_exception`, recursion, a bound exceeded - is a one-line UserError "chat template: ...".

Which token ends an assistant turn: `turn_end_token` renders a probe conversation and returns the special
token the template writes right after the assistant's content (`<|im_end|>` for ChatML/SmolLM2,
`<|eot_id|>` for Llama 3, or the eos token itself). Generation stops at it and at eos
(`HFTokenizer.stop_ids`).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import json
import math
import re
import time
from datetime import datetime
from typing import Any

from .errors import UserError

MAX_OUTPUT_CHARS = 1_000_000  # ~250k tokens: far above any context length, far below a memory problem
TIME_LIMIT_S = 5.0            # a real template renders in about a millisecond
_MAX_INT_BITS = 1 << 16       # integers a template may build (`**`, `*`); 65536 bits is ~20k digits
_MAX_JSON_INDENT = 64
_HUGE_WIDTH = re.compile(r"\d{7,}")  # a width/precision of 1,000,000 or more in a format string
_DEADLINE: contextvars.ContextVar[float] = contextvars.ContextVar("chat_template_deadline", default=math.inf)


class _Limit(Exception):
    """A render bound was hit (size or time)."""


# ---------------------------------------------------------------------------------------------------------
# Public API


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool, bos_token: str | None,
                eos_token: str | None, **extra: Any) -> str:
    """The text transformers' `apply_chat_template(..., tokenize=False)` gives for the same variables."""
    if not isinstance(template, str):
        raise UserError(f"chat template: expected a string, got {type(template).__name__}")
    compiled = _compile(template)
    context: dict[str, Any] = {"messages": _plain(messages), "tools": None, "documents": None,
                               "add_generation_prompt": bool(add_generation_prompt)}
    specials = {"bos_token": bos_token, "eos_token": eos_token}
    context.update({k: v for k, v in specials.items() if v is not None})
    context.update(_plain(extra))
    return _guarded(lambda: compiled.render(context))


def turn_end_token(template: str, special_tokens: list[str], *, bos_token: str | None, eos_token: str | None,
                   **extra: Any) -> str | None:
    """The special token the template writes right after an assistant message's content, or None.

    Kept simple: render [user, assistant] with a marker as the assistant's content and look at what
    follows it. A template that refuses the probe (e.g. one that requires a system message) gives None.
    """
    marker = "\x00llama4dpo-probe\x00"
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
    try:
        text = render_chat(template, probe, add_generation_prompt=False, bos_token=bos_token,
                           eos_token=eos_token, **extra)
    except UserError:
        return None
    at = text.rfind(marker)
    if at < 0:
        return None
    after = text[at + len(marker):]
    found = [t for t in special_tokens if t and after.startswith(t)]
    return max(found, key=len) if found else None


# ---------------------------------------------------------------------------------------------------------
# Compilation: transformers' environment, plus the bounds


@functools.lru_cache(maxsize=32)
def _compile(template: str):
    env = _environment()
    return _guarded(lambda: env.from_string(template))


@functools.lru_cache(maxsize=1)
def _environment():
    try:
        import jinja2  # noqa: F401
    except ImportError:
        raise UserError("chat templates need jinja2: pip install 'jinja2>=3.1.6'") from None
    env = _guarded_environment_class()(trim_blocks=True, lstrip_blocks=True,
                                       extensions=["jinja2.ext.loopcontrols", _generation_extension()])
    env.globals.pop("lipsum", None)  # lipsum(n) builds text of any size; no chat template uses it
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_namespace_class())
    env.filters["tojson"] = _tojson
    for name, f in list(env.filters.items()):
        env.filters[name] = _guard_filter(name, f)
    return env


def _guarded_environment_class():
    from jinja2.compiler import CodeGenerator
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEnvironment

    class GuardedCodeGenerator(CodeGenerator):
        """Generated code that checks time and sizes: every `{% for %}` iterates through tick_iter (loops and
        calls are the only ways a template repeats work); `a ~ b` and list/tuple/dict literals go through
        the environment, literals because `[x, x]` repeated doubles the size of its repr with no copy."""

        def visit_For(self, node, frame):  # the loop's iterable goes through environment.tick_iter
            self._ticked = getattr(self, "_ticked", set()) | {id(node.iter)}
            super().visit_For(node, frame)

        def visit(self, node, *args, **kwargs):
            if id(node) not in getattr(self, "_ticked", ()):
                return super().visit(node, *args, **kwargs)
            self.write("environment.tick_iter(")
            super().visit(node, *args, **kwargs)
            self.write(")")

        def visit_Concat(self, node, frame):  # jinja writes str_join((a, b, )) here
            self.write("environment.join_bounded((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

        def _checked(self, visit, node, frame):
            if getattr(node, "ctx", "load") != "load":  # `{% for a, b in x %}`: an assignment target
                return visit(node, frame)
            self.write("environment.checked(")
            visit(node, frame)
            self.write(")")

        def visit_List(self, node, frame):
            self._checked(super().visit_List, node, frame)

        def visit_Tuple(self, node, frame):
            self._checked(super().visit_Tuple, node, frame)

        def visit_Dict(self, node, frame):
            self._checked(super().visit_Dict, node, frame)

    class GuardedEnvironment(ImmutableSandboxedEnvironment):
        code_generator_class = GuardedCodeGenerator
        # Intercepted operators go through call_binop, and jinja stops folding them at compile time
        # (`{{ 10 ** 10 ** 10 }}` would otherwise hang the compiler).
        intercepted_binops = frozenset({"+", "*", "**", "%"})

        @staticmethod
        def concat(parts):  # every rendered output, block capture ({% set %}...) and macro result
            return _join_bounded(parts)

        @staticmethod
        def join_bounded(parts):
            return _join_bounded(map(str, parts))

        @staticmethod
        def checked(value):
            return _check_result(value)

        @staticmethod
        def tick_iter(iterable):
            for item in iterable:
                _tick()
                yield item

        def call_binop(self, context, operator, left, right):
            _check_binop(operator, left, right)
            return _check_result(SandboxedEnvironment.call_binop(self, context, operator, left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own naming, see its call)
            _tick()  # macros (recursion) and `loop(...)` come through here
            args, kwargs = _check_call(__obj, args, kwargs)
            return _check_result(SandboxedEnvironment.call(__self, __context, __obj, *args, **kwargs))

    return GuardedEnvironment


def _generation_extension():
    """transformers' `{% generation %}...{% endgeneration %}` (marks assistant text); we render the body."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    return Generation


def _guarded(run):
    """Run a compile or render: bounded in time, every failure one UserError line."""
    import jinja2

    try:
        return _time_limited(run)
    except _Limit as e:
        raise UserError(f"chat template: {e}") from None
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"chat template: syntax error on line {e.lineno}: {_line(e)}") from None
    except jinja2.sandbox.SecurityError as e:
        raise UserError(f"chat template: refused by the sandbox: {_line(e)}") from None
    except jinja2.UndefinedError as e:
        raise UserError(f"chat template: undefined value: {_line(e)}") from None
    except jinja2.TemplateError as e:  # raise_exception("...") in the template lands here
        raise UserError(f"chat template: raised an error: {_line(e)}") from None
    except RecursionError:
        raise UserError("chat template: recursion too deep") from None
    except Exception as e:  # a template can fail in any Python way (1/0, int('x'), a bad argument, ...)
        raise UserError(f"chat template: {type(e).__name__}: {_line(e)}") from None


def _line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "..."


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


# ---------------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------------
# transformers' globals and filter


def _raise_exception(message):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    _check_format(fmt)
    return datetime.now().strftime(fmt)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson: no HTML escaping (jinja's default escapes <, >, &, ').
    if isinstance(indent, int) and indent > _MAX_JSON_INDENT:
        raise _Limit(f"tojson indent {indent} is larger than {_MAX_JSON_INDENT}")
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _TemplateDict:
    """transformers' `dict` global: builds dicts, exposes nothing of the `dict` type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _namespace_class():
    from jinja2.sandbox import SecurityError
    from jinja2.utils import Namespace

    class TemplateNamespace(Namespace):
        """transformers' namespace: no underscore-prefixed attributes (a way into CPython internals)."""

        def __init__(*args, **kwargs):  # jinja's signature trick, so that namespace(self=...) works
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise SecurityError(f"namespace attribute {name!r} starts with an underscore")

    return TemplateNamespace


def _plain(value: Any) -> Any:
    """Only plain JSON-like data reaches the template: objects with methods could do things when called."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # subclasses (enums, numpy scalars) carry extra methods: back to the base type
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    raise UserError(f"chat template input: a {type(value).__name__} is not plain data (str, number, list, dict)")
