"""Conversion to and from other frameworks' formats."""

from __future__ import annotations

from pathlib import Path

from .hf import export_hf
from .hf import import_hf as import_hf_dir


def import_hf(src: str | Path, out_ckpt: str | Path) -> Path:
    """Checkpoint `out_ckpt` from a transformers model directory (Llama 4 or dense Llama), or from a GGUF file
    (llama.cpp's format, architecture llama) when `src` ends in .gguf and is not a directory."""
    if str(src).lower().endswith(".gguf") and not Path(src).is_dir():
        from .gguf import import_gguf  # (imports the gguf package only when needed)
        return import_gguf(src, out_ckpt)
    return import_hf_dir(src, out_ckpt)
