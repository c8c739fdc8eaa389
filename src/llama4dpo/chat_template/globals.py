"""transformers' template globals (`raise_exception`, `strftime_now`, `dict`, `namespace`) and its `tojson`
filter, made safe for an untrusted template."""

from __future__ import annotations

import json
from datetime import datetime

from .limits import _MAX_JSON_INDENT, _Limit, _check_format


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
