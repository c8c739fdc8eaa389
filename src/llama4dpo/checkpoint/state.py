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
import math
import pickle
import re
import shutil
import sys
from pathlib import Path

import torch

from .adapters import read_base
from .files import ADAPTERS, WEIGHTS, WriteError, atomic_dir, verify_manifest
from .model import check_finite, read_weights, write_model_files
from ..errors import UserError
from ..faults import fault_point

CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"step-(\d{7,})")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporaries of interrupted writes and foreign names are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if STEP_DIR.fullmatch(p.name) and p.is_dir() and not p.is_symlink()
             and (p / "trainer_state.json").is_file()]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    return int(STEP_DIR.fullmatch(Path(path).name).group(1))


def save_training_checkpoint(run_dir: Path, step: int, model, model_state: dict, optimizer_state: dict, cfg,
                             tokenizer, loop_state: dict, keep_last: int, base: dict | None = None) -> Path:
    """model_state / optimizer_state: full state dicts (see distributed.Dist.model_state); with `base` (LoRA:
    adapters.base_record) only the trained tensors are written, beside base.json."""
    final = Path(run_dir) / CHECKPOINTS / f"step-{step:07d}"
    try:
        check_finite(flat_tensors(optimizer_state), f"optimizer state at step {step}")
        with atomic_dir(final) as tmp:
            write_model_files(tmp, model, cfg, tokenizer, model_state, base)  # (refuses NaN/inf weights)
            torch.save({"optimizer": optimizer_state, "rng_cpu": torch.get_rng_state()}, tmp / "optimizer.pt")
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **loop_state}, indent=1))
            fault_point("save", step)
    except WriteError as e:  # disk full, quota, read-only: the previous checkpoints are untouched
        raise UserError(f"{e}; stopped. Last good checkpoint: {last_checkpoint(run_dir)}") from None
    except UserError as e:  # non-finite values: nothing was written
        raise UserError(f"{e}; checkpoint {final.name} not written. Last good checkpoint: "
                        f"{last_checkpoint(run_dir)}") from None
    for old in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def last_checkpoint(run_dir: Path) -> Path | str:
    """The newest checkpoint that verifies against its manifest, for error messages ("none" if there is none)."""
    for path in reversed(checkpoint_dirs(run_dir)):
        try:
            verify_manifest(path, required=True)
            return path
        except UserError:
            continue
    return "none"


def flat_tensors(tree, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested dict/list, keyed by its path (for finiteness checks and messages)."""
    if torch.is_tensor(tree):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    return {k: v for key, sub in items for k, v in flat_tensors(sub, f"{prefix}.{key}" if prefix else str(key)).items()}


def latest_good_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose files match their manifest; damaged newer ones are skipped with a warning.
    When none is good, a one-line error gives the newest one's reason."""
    reasons = []
    for path in reversed(checkpoint_dirs(run_dir)):
        try:
            verify_manifest(path, required=True)
        except UserError as e:
            reasons.append(str(e))
            continue
        for reason in reasons:
            print(f"warning: skipping damaged checkpoint: {reason}", file=sys.stderr)
        return path
    if reasons:
        raise UserError(f"{run_dir}: no usable checkpoint (newest: {reasons[0]}); use --overwrite to start over")
    return None


def load_training_checkpoint(path: Path, model, optimizer, dist, base: dict | None = None) -> dict:
    """Restore model, optimizer and RNG in place (every rank reads the files); return the loop state. With
    `base` (LoRA: the run's adapters.base_record), the trained tensors only, once base.json shows they were
    trained on that base as it is now."""
    path = Path(path)
    verify_manifest(path, required=True)
    if (base is not None) != (path / ADAPTERS).is_file():
        raise UserError(f"{path}: {'a full model' if base is not None else 'adapters'}, not what this run trains")
    if base is not None:
        read_base(path, expected=Path(base["base"]))
    weights = read_weights(model, path / (ADAPTERS if base is not None else WEIGHTS), adapters=base is not None)
    try:
        blob = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        state = json.loads((path / "trainer_state.json").read_text())
    except (pickle.UnpicklingError, RuntimeError, OSError, ValueError, EOFError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: cannot load training state ({first})") from None
    check_loop_state(path, state)
    check_rng_state(path, blob)
    optim = check_optimizer_state(path, model, optimizer, blob["optimizer"], state["step"])
    dist.load_model_state(model, weights, strict=base is None)
    try:
        dist.load_optimizer_state(model, optimizer, optim)
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise UserError(f"{path}: optimizer state does not fit this model ({type(e).__name__}: {e})") from None
    torch.set_rng_state(blob["rng_cpu"])
    return state


# ---- validation: a checkpoint is read as untrusted input, checked before any of it is used ----------------
def check_loop_state(path: Path, state) -> None:
    """trainer_state.json: the step of its directory's name, and a window of finite metric sums."""
    step = state.get("step") if isinstance(state, dict) else None
    if type(step) is not int or step != checkpoint_step(path):
        raise UserError(f"{path}: trainer_state.json says step {step!r}, the directory step {checkpoint_step(path)}")
    window = state.get("window", {})
    ok = isinstance(window, dict) and all(
        _finite_number(v) or (isinstance(v, list) and all(_finite_number(x) for x in v)) for v in window.values())
    if not ok:
        raise UserError(f"{path}: trainer_state.json has a malformed metric window")


def check_rng_state(path: Path, blob) -> None:
    rng = blob.get("rng_cpu") if isinstance(blob, dict) else None
    like = torch.get_rng_state()
    if not isinstance(blob, dict) or "optimizer" not in blob:
        raise UserError(f"{path}: optimizer.pt is not a training state (expected 'optimizer' and 'rng_cpu')")
    if not torch.is_tensor(rng) or rng.dtype != like.dtype or rng.shape != like.shape or not rng.is_contiguous():
        raise UserError(f"{path}: optimizer.pt holds no valid CPU random state ('rng_cpu')")


def check_optimizer_state(path: Path, model, optimizer, named, step: int) -> dict:
    """AdamW state checked against the model's parameters before the optimizer, whose fused kernels write
    without bounds checks, ever sees it: names, the exact entries per parameter, shapes, dtypes, contiguous
    memory (an expanded tensor has the shape but not the bytes), finite values, a whole step count no later
    than the checkpoint's. Returns it with the live optimizer's hyperparameters (the run's config, which a
    resume may not change: see run_dir), so nothing in the file but moments, counts and names is used."""
    def bad(why: str):
        raise UserError(f"{path / 'optimizer.pt'}: {why}")

    if not (isinstance(named, dict) and isinstance(named.get("state"), dict)
            and isinstance(named.get("param_groups"), list)):
        bad("not an optimizer state (expected 'state' and 'param_groups')")
    params = {id(p): n for n, p in model.named_parameters()}
    live = [[params[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    shapes = {n: p.shape for n, p in model.named_parameters()}
    saved = named["param_groups"]
    if len(saved) != len(live) or any(not isinstance(g, dict) or not isinstance(g.get("params"), list)
                                      or sorted(map(str, g["params"])) != sorted(names)
                                      for g, names in zip(saved, live)):
        bad("its parameter groups do not name this model's parameters")
    entries = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if optimizer.defaults.get("amsgrad") else set())
    for name, entry in named["state"].items():
        if name not in shapes or not isinstance(entry, dict):
            bad(f"state for {name!r}, which is not a trained parameter of this model")
        if set(entry) != entries:
            bad(f"state of {name} holds {sorted(map(str, entry))}, AdamW keeps {sorted(entries)}")
        for key, value in entry.items():
            if not torch.is_tensor(value) or not value.is_floating_point():
                bad(f"{name}.{key} is not a floating-point tensor")
            want = torch.Size([]) if key == "step" else shapes[name]
            if value.shape != want:
                bad(f"{name}.{key} has shape {tuple(value.shape)}, the parameter needs {tuple(want)}")
            if not value.is_contiguous():
                bad(f"{name}.{key} is not a contiguous tensor")
            if not bool(torch.isfinite(value).all()):
                bad(f"{name}.{key} holds NaN or inf")
        count = float(entry["step"])
        if count != int(count) or not 0 <= count <= step:
            bad(f"{name}.step is {count}, not a whole number of updates up to the checkpoint's step {step}")
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(s["params"])}
              for g, s in zip(optimizer.param_groups, saved)]
    return {"state": named["state"], "param_groups": groups}


def _finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
