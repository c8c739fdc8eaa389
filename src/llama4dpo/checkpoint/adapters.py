"""Adapter checkpoints: what a LoRA run writes in place of the whole model.

    config.json  adapters.safetensors  base.json  tokenizer.json  manifest.json

adapters.safetensors holds only the trained tensors (the adapters, and the routers with lora.train_router) by
their names in the adapted model; base.json names the checkpoint they adapt and the SHA-256 of its manifest, so
that loading or resuming against a base that changed since is refused with one line instead of computing
something else. `load_model` (model.py) reads either kind; `llama4dpo merge` writes the adapters folded in.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .files import ADAPTERS, BASE, CONFIG, MANIFEST, WEIGHTS, read_json, sha256_file


def is_adapter_checkpoint(path: str | Path) -> bool:
    return (Path(path) / ADAPTERS).is_file()


def checkpoint_fingerprint(base: Path) -> str:
    """SHA-256 of the base's manifest.json (itself the size and SHA-256 of each of its files); of its weights
    (or adapters) where it has no manifest."""
    for name in (MANIFEST, WEIGHTS, ADAPTERS):
        if (base / name).is_file():
            return f"{name}:{sha256_file(base / name)}"
    raise UserError(f"{base}: not a checkpoint (no {MANIFEST}, {WEIGHTS} or {ADAPTERS})")


def base_record(base: Path) -> dict:
    """base.json's content: the base checkpoint's absolute path and fingerprint (taken once, when a run loads its
    base, and written with every checkpoint of the run)."""
    base = Path(base).resolve()
    return {"base": str(base), "fingerprint": checkpoint_fingerprint(base)}


def read_base(path: Path, expected: Path | None = None) -> Path:
    """The base checkpoint `path`'s adapters were trained on, checked unchanged (and, with `expected`, the same
    checkpoint the caller holds: a resumed run's --init)."""
    record = read_json(path / BASE)
    base = record.get("base") if isinstance(record, dict) else None
    if not isinstance(base, str) or not isinstance(record.get("fingerprint"), str):
        raise UserError(f"{path / BASE}: malformed (expected 'base' and 'fingerprint')")
    base = Path(base)
    if not (base / CONFIG).is_file():
        raise UserError(f"{path}: its base checkpoint {base} is gone; restore it there, or load the merged model "
                        f"(`llama4dpo merge` where the base exists)")
    if expected is not None and base.resolve() != Path(expected).resolve():
        raise UserError(f"{path}: adapters of {base}, not of {expected}")
    if checkpoint_fingerprint(base) != record["fingerprint"]:
        raise UserError(f"{path}: its base checkpoint {base} changed since these adapters were trained on it "
                        f"(manifest hash differs); adapters fit only the weights they were trained with")
    return base


def trained_names(model) -> list[str]:
    """The names of the model's trained parameters: what an adapter checkpoint holds."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def adapter_state(model, state: dict) -> dict:
    """The entries of the full `state` (model.state_dict() or its gathered FSDP2 copy) that an adapter
    checkpoint keeps."""
    return {n: state[n] for n in trained_names(model)}
