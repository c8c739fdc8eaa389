"""Reading a transformers model directory's tokenizer files: size-bounded text, JSON objects, and the
special-token and chat-template entries of tokenizer_config.json, as transformers reads them."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from .base import _first_line


def _token_content(value, key: str) -> str | None:
    """A special token in tokenizer_config.json: a string, an AddedToken dict {"content": ...}, or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise UserError(f"{key} must be a string or an object with a string 'content', got {type(value).__name__}")


def _default_template(value) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of {"name", "template"}: take "default"."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        template = named.get("default")
        if template is None or isinstance(template, str):
            return template
    raise UserError("chat_template must be a string or a list of {'name', 'template'} objects")


_MAX_MODEL_FILE_BYTES = 1 << 30  # the largest real tokenizer.json is tens of MB


def _read_model_file(path: Path, *, required: bool) -> str | None:
    """A file of a model directory as text. Symlinks are followed: a Hugging Face cache snapshot is all
    symlinks into its blob store."""
    try:
        if not path.exists():
            if required:
                raise UserError(f"no {path.name}" + (" (only a slow tokenizer.model: convert it with transformers "
                                                      "first)" if (path.parent / "tokenizer.model").exists() else ""))
            return None
        if not path.is_file():
            raise UserError(f"{path.name} is not a regular file")
        if path.stat().st_size > _MAX_MODEL_FILE_BYTES:
            raise UserError(f"{path.name} is larger than {_MAX_MODEL_FILE_BYTES >> 20} MiB")
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"cannot read {path.name}: {type(e).__name__}: {_first_line(e)}") from None


def _read_json_object(path: Path) -> dict:
    """An optional JSON object file ({} when absent)."""
    text = _read_model_file(path, required=False)
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path.name} is not valid JSON: {e.msg} (line {e.lineno})") from None
    except RecursionError:
        raise UserError(f"{path.name} is nested too deeply") from None
    if not isinstance(value, dict):
        raise UserError(f"{path.name} must hold a JSON object, not {type(value).__name__}")
    return value
