"""Training checkpoints: a model checkpoint plus optimizer, RNG and loop state, written atomically.

    RUN_DIR/checkpoints/step-0000100/
        config.json  model.safetensors  tokenizer.json     <- a loadable model checkpoint
        optimizer.pt                                        <- optimizer state by parameter name + RNG
        trainer_state.json                                  <- step, metric window, schedule position

optimizer.pt is read with `torch.load(weights_only=True)`: only tensors and plain containers are
accepted, so a planted pickle cannot run code. The last `keep_last` checkpoints are kept. Model and optimizer
state are full (unsharded) and keyed by parameter name, so any number of processes can resume them.
"""

from __future__ import annotations

import json
import pickle
import shutil
import sys
from pathlib import Path

import torch

from ..checkpoint import atomic_dir, read_weights, verify_manifest, write_model_files, WEIGHTS
from ..errors import UserError
from ..faults import fault_point

CHECKPOINTS = "checkpoints"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories of interrupted writes are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_training_checkpoint(run_dir: Path, step: int, model, model_state: dict, optimizer_state: dict, cfg,
                             tokenizer, loop_state: dict, keep_last: int) -> Path:
    """model_state / optimizer_state: full state dicts (see distributed.Dist.model_state)."""
    final = Path(run_dir) / CHECKPOINTS / f"step-{step:07d}"
    try:
        with atomic_dir(final) as tmp:
            write_model_files(tmp, model, cfg, tokenizer, state=model_state)
            torch.save({"optimizer": optimizer_state, "rng_cpu": torch.get_rng_state()}, tmp / "optimizer.pt")
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **loop_state}, indent=1))
            fault_point("save", step)
    except OSError as e:  # disk full, quota, permissions: the previous checkpoints are untouched
        previous = checkpoint_dirs(run_dir)
        raise UserError(f"could not write checkpoint {final} ({e.strerror or e}); stopped. "
                        f"Last good checkpoint: {previous[-1] if previous else 'none'}") from None
    for old in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_good_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose files match their manifest; damaged newer ones are skipped with a warning."""
    for path in reversed(checkpoint_dirs(run_dir)):
        try:
            verify_manifest(path, required=True)
            return path
        except UserError as e:
            print(f"warning: skipping damaged checkpoint: {e}", file=sys.stderr)
    return None


def load_training_checkpoint(path: Path, model, optimizer, dist) -> dict:
    """Restore model, optimizer and RNG in place (every rank reads the files); return the loop state."""
    path = Path(path)
    verify_manifest(path, required=True)
    dist.load_model_state(model, read_weights(model, path / WEIGHTS))
    try:
        blob = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        state = json.loads((path / "trainer_state.json").read_text())
    except (pickle.UnpicklingError, RuntimeError, OSError, ValueError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: cannot load training state ({first})") from None
    try:
        dist.load_optimizer_state(model, optimizer, blob["optimizer"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: optimizer state does not fit this model ({type(e).__name__}: {e})") from None
    torch.set_rng_state(blob["rng_cpu"])
    return state
