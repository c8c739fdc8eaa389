"""Rendering a chat template: the public `render_chat` and `turn_end_token`, the cached environment and
compiled templates, plain-data inputs, and every failure turned into one UserError line."""

from __future__ import annotations

import functools
from typing import Any

from ..errors import UserError
from .filters import _guard_filter
from .globals import _TemplateDict, _namespace_class, _raise_exception, _strftime_now, _tojson
from .limits import _Limit, _time_limited
from .sandbox import _generation_extension, _guarded_environment_class


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
