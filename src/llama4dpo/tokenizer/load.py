"""Building (training), and loading a tokenizer from its JSON file or dict, whichever kind it is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from ..errors import UserError
from .base import FORMAT_VERSION, KINDS, SPECIALS, _first_line
from .bpe import BPETokenizer
from .char import CharTokenizer
from .hf import HFTokenizer


def build_tokenizer(kind: str, texts: Iterable[str], vocab_size: int = 1024) -> CharTokenizer | BPETokenizer:
    """Train a tokenizer of `kind` ("char" or "bpe"); `vocab_size` only applies to BPE."""
    if kind == "char":
        return CharTokenizer.train(texts)
    if kind == "bpe":
        return BPETokenizer.train(texts, vocab_size=vocab_size)
    raise UserError(f"unknown tokenizer kind {kind!r} (expected 'char' or 'bpe')")


def tokenizer_from_dict(d: dict) -> CharTokenizer | BPETokenizer | HFTokenizer:
    kind = d.get("type") if isinstance(d, dict) else None
    if kind not in KINDS:
        raise UserError(f"unknown tokenizer type {kind!r} (expected 'char', 'bpe' or 'hf')")
    specials_ok = kind == "hf" or d.get("specials", list(SPECIALS)) == list(SPECIALS)
    if d.get("version") != FORMAT_VERSION or not specials_ok:
        raise UserError(f"unsupported tokenizer format (version {d.get('version')!r}, specials {d.get('specials')})")
    try:
        if kind == "char":
            return CharTokenizer(d["chars"])
        if kind == "bpe":
            return BPETokenizer(d["tokenizer"])
        return HFTokenizer(d["tokenizer"], bos_token=d["bos_token"], eos_token=d["eos_token"],
                           pad_token=d.get("pad_token"), chat_template=d.get("chat_template"),
                           add_bos_token=d.get("add_bos_token", False))
    except Exception as e:  # a missing key, or a corrupt `tokenizers` JSON string (raised from Rust)
        raise UserError(f"corrupt {kind} tokenizer: {type(e).__name__}: {_first_line(e)}") from e


def load_tokenizer(path_or_dir: str | Path) -> CharTokenizer | BPETokenizer | HFTokenizer:
    """Load `tokenizer.json` (or `DIR/tokenizer.json`). Every failure is a one-line UserError naming the file.

    A transformers model's own tokenizer.json (tokenizers' format, no "type") loads its whole directory
    with HFTokenizer.from_pretrained_dir."""
    path = Path(path_or_dir)
    try:
        if path.is_dir():
            path = path / "tokenizer.json"
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"tokenizer file not found: {path}") from None
    except (OSError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"cannot read tokenizer file {path}: {type(e).__name__}: {e}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"tokenizer file {path} is not valid JSON: {e.msg} (line {e.lineno})") from None
    except ValueError as e:  # e.g. a NUL byte in the path
        raise UserError(f"cannot read tokenizer file {path!r}: {e}") from None
    if _is_transformers_tokenizer(d) and path.name == "tokenizer.json":
        return HFTokenizer.from_pretrained_dir(path.parent)
    try:
        return tokenizer_from_dict(d)
    except UserError as e:
        raise UserError(f"tokenizer file {path}: {e}") from None


def _is_transformers_tokenizer(d) -> bool:
    return isinstance(d, dict) and "type" not in d and isinstance(d.get("model"), dict)
