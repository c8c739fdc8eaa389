"""Run directories: fresh, resumed, or refused.

A run directory holds config.json (the resolved config), tokenizer.json, metrics.jsonl, data_report.txt,
checkpoints/step-N/ and final/. Starting a run in a directory that already holds a run of the same
config resumes it from its latest checkpoint; a different config, or a directory holding something
else, is refused with a one-line error unless `--overwrite` is given.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..config import Config
from ..errors import UserError
from .state import checkpoint_dirs, latest_good_checkpoint

# Keys a resumed run may change: they do not alter what the checkpoint holds.
RESUMABLE_CHANGES = {"train.max_steps", "train.eval_every", "train.save_every", "train.keep_last",
                     "train.log_every", "train.tensorboard", "train.device", "data.num_proc",
                     "distributed.strategy"}


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def config_difference(old: Config, new: Config) -> str | None:
    a, b = flatten(old.to_dict()), flatten(new.to_dict())
    for key in sorted(set(a) | set(b)):
        if key not in RESUMABLE_CHANGES and a.get(key) != b.get(key):
            return f"{key}: {a.get(key)!r} in the run, {b.get(key)!r} now"
    return None


def prepare_run_dir(out: Path, cfg: Config, *, overwrite: bool = False, resume: bool = False,
                    inputs: dict | None = None) -> Path | None:
    """Create `out` for a fresh run, or return the checkpoint to resume from. `inputs` (command, data
    source, init/ref checkpoints) are recorded in run.json; resuming with other inputs is refused."""
    out = Path(out)
    inputs = {k: str(v) if v is not None else None for k, v in (inputs or {}).items()}
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if overwrite and out.exists():
        shutil.rmtree(out)
    if out.is_dir() and any(out.iterdir()):
        saved = out / "config.json"
        ckpts = checkpoint_dirs(out)
        if not saved.is_file():
            raise UserError(f"{out}: directory is not empty and holds no llama4dpo run; "
                            f"choose another --out or pass --overwrite")
        diff = config_difference(Config.load_json(saved), cfg)
        recorded = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else inputs
        for key in sorted(set(recorded) | set(inputs)):
            if recorded.get(key) != inputs.get(key):
                diff = diff or f"{key}: {recorded.get(key)!r} in the run, {inputs.get(key)!r} now"
        if diff:
            raise UserError(f"{out}: holds a run with a different config ({diff}); "
                            f"use another --out, or --overwrite to discard it")
        if ckpts:
            good = latest_good_checkpoint(out)
            if good is not None:
                return good
            raise UserError(f"{out}: every checkpoint is damaged; use --overwrite to start over")
        if resume:
            raise UserError(f"{out}: no checkpoint to resume from yet")
        shutil.rmtree(out)  # same config but nothing saved yet: start over cleanly
    elif resume:
        raise UserError(f"{out}: nothing to resume (no run directory)")
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_json(out / "config.json")
    (out / "run.json").write_text(json.dumps(inputs, indent=1) + "\n")
    return None
