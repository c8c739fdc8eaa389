"""Run directories: fresh, resumed, or refused - and never anything else deleted.

A run directory holds run.json (the command and its inputs), config.json (the resolved config),
tokenizer.json, metrics.jsonl, data_report.txt, checkpoints/step-N/, final/ and plots/. Starting a run in a
directory that already holds a run of the same config resumes it from its latest checkpoint; a different
config, or a directory holding something else, is refused with a one-line error unless `--overwrite` is given.

`--overwrite` removes only the entries listed in RUN_ENTRIES, and only from a directory that holds a run;
it refuses `/`, the home folder, the working folder and its parents, and any folder holding the run's own
inputs (`--data`, `--init`, `--ref`). While a run lives, RUN_DIR/.lock (pid and host) holds an exclusive
lock, so a second run into the same directory is refused; the lock dies with its process, however it ends.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import stat
from pathlib import Path

from ..config import Config
from ..errors import UserError
from .files import ADAPTERS, BASE, WEIGHTS, read_json
from .state import checkpoint_dirs, latest_good_checkpoint

# Keys a resumed run may change: they do not alter what the checkpoint holds.
RESUMABLE_CHANGES = {"train.max_steps", "train.eval_every", "train.save_every", "train.keep_last",
                     "train.log_every", "train.tensorboard", "train.device", "data.num_proc",
                     "distributed.strategy"}
LOCK = ".lock"
# Everything a run writes (ref_logps_*.safetensors by pattern): all that --overwrite may remove.
RUN_ENTRIES = {"run.json", "config.json", "tokenizer.json", "metrics.jsonl", "data_report.txt", "checkpoints",
               "final", "plots", "tb"}


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
    """Lock `out` and create it for a fresh run, or return the checkpoint to resume from. `inputs` (command,
    data source, init/ref checkpoints) are recorded in run.json; resuming with other inputs is refused.
    The lock is held until `release_run_dir(out)` or the end of the process."""
    out = Path(out)
    inputs = {k: str(v) if v is not None else None for k, v in (inputs or {}).items()}
    if overwrite and resume:
        raise UserError("--resume and --overwrite contradict each other: pass one")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if overwrite:
        check_overwrite(out, inputs)
    elif out.is_dir() and _entries(out) and not is_run_dir(out):
        raise UserError(f"{out}: directory is not empty and holds no llama4dpo run; "
                        f"choose another --out (--overwrite removes only a run's own files)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: cannot create the run directory ({e.strerror or e})") from None
    lock_run_dir(out)
    try:
        if overwrite:
            remove_run_files(out)
        return _fresh_or_resume(out, cfg, resume, inputs)
    except BaseException:
        release_run_dir(out)
        raise


def is_run_dir(path: Path) -> bool:
    """run.json (written first), or config.json with a run's files beside it; a model checkpoint, its weights
    beside its config.json, is not a run."""
    if (path / "model.safetensors").exists():
        return False
    return (path / "run.json").is_file() or ((path / "config.json").is_file() and any(
        (path / name).exists() for name in ("metrics.jsonl", "checkpoints")))


def _fresh_or_resume(out: Path, cfg: Config, resume: bool, inputs: dict) -> Path | None:
    if is_run_dir(out) and (out / "config.json").is_file():
        diff = config_difference(Config.load_json(out / "config.json"), cfg)
        recorded = read_json(out / "run.json") if (out / "run.json").is_file() else inputs
        if not isinstance(recorded, dict):
            raise UserError(f"{out / 'run.json'}: damaged (not a JSON object); --overwrite starts the run over")
        for key in sorted(set(recorded) | set(inputs)):
            if recorded.get(key) != inputs.get(key):
                diff = diff or f"{key}: {recorded.get(key)!r} in the run, {inputs.get(key)!r} now"
        if diff:
            raise UserError(f"{out}: holds a run with a different config ({diff}); "
                            f"use another --out, or --overwrite to discard it")
        if checkpoint_dirs(out):
            return latest_good_checkpoint(out)  # (a one-line error when every one is damaged)
        if resume:
            raise UserError(f"{out}: no checkpoint to resume from yet")
        remove_run_files(out)  # same config but nothing saved yet: start over cleanly
    elif is_run_dir(out):  # a run stopped before it wrote its config: nothing of it to keep
        if resume:
            raise UserError(f"{out}: no checkpoint to resume from yet")
        remove_run_files(out)
    elif resume:
        raise UserError(f"{out}: nothing to resume (no run directory)")
    try:  # run.json first: it marks the folder as a run's from the first byte on
        (out / "run.json").write_text(json.dumps(inputs, indent=1) + "\n")
        cfg.save_json(out / "config.json")
    except OSError as e:
        raise UserError(f"{out}: cannot write the run's files ({e.strerror or e})") from None
    return None


# ---- --overwrite ------------------------------------------------------------------------------------------
def check_overwrite(out: Path, inputs: dict) -> None:
    """Refuse, touching nothing, to overwrite a folder that is not a run or that holds what the user needs."""
    target = out.resolve()
    home, cwd = Path.home().resolve(), Path.cwd().resolve()
    if target == Path(target.anchor):
        raise UserError(f"--overwrite refuses --out {out}: it is the root of the file system")
    if target == home:
        raise UserError(f"--overwrite refuses --out {out}: it is the home folder")
    if target == cwd or target in cwd.parents:
        raise UserError(f"--overwrite refuses --out {out}: it is the working folder or one of its parents")
    for key in ("data", "init", "ref"):
        given = inputs.get(key)  # (a path that exists; not a hub name or builtin:)
        where = Path(given).resolve() if given and Path(given).exists() else None
        for held in ([where, *_bases(where)] if where is not None else []):  # an adapter checkpoint's bases too
            if held == target or target in held.parents:
                what = f"--{key} {given}" if held == where else f"{held}, the base of --{key} {given}"
                raise UserError(f"--overwrite refuses --out {out}: it holds {what}")
    if target.is_dir() and _entries(target) and not is_run_dir(target):
        raise UserError(f"--overwrite refuses --out {out}: it holds no llama4dpo run, so nothing in it is ours "
                        f"to delete")


def _bases(checkpoint: Path) -> list[Path]:
    """The chain of base checkpoints under an adapter checkpoint (base.json, as far as it reads)."""
    chain = []
    while (checkpoint / ADAPTERS).is_file() and len(chain) < 64:
        try:
            checkpoint = Path(read_json(checkpoint / BASE)["base"]).resolve()
        except (UserError, KeyError, TypeError, OSError):
            break
        chain.append(checkpoint)
    return chain


def remove_run_files(out: Path) -> None:
    """Delete what a run writes (RUN_ENTRIES and reference caches); leave everything else."""
    for p in out.iterdir():
        if p.name in RUN_ENTRIES or (p.name.startswith("ref_logps_") and p.suffix == ".safetensors"):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


def _entries(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if p.name != LOCK]


# ---- the lock -----------------------------------------------------------------------------------------------
_held: dict[Path, int] = {}  # run directory -> descriptor of its locked .lock file


def lock_run_dir(out: Path) -> None:
    """Take RUN_DIR/.lock (flock: released by the kernel when the process ends, however it ends, so a lock
    left by a killed run is stale and simply taken over). It records pid and host for the refusal message."""
    key = out.resolve()
    if key in _held:
        raise UserError(f"{out}: already in use by this process")
    path = out / LOCK
    try:  # (never through a symbolic link: the pid written below would overwrite its target)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        why = "a symbolic link" if e.errno == errno.ELOOP else e.strerror or e
        raise UserError(f"{path}: cannot open the run's lock file ({why})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{path}: the run's lock file is not a regular file")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.read(fd, 512).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise UserError(f"{out}: another run is using this directory ({holder}); wait for it to finish or "
                            f"choose another --out") from None
        raise UserError(f"{path}: cannot lock the run directory ({e.strerror}); this file system may not "
                        f"support locks") from None
    if not path.exists() or os.stat(path).st_ino != os.fstat(fd).st_ino:  # released and unlinked meanwhile
        os.close(fd)
        return lock_run_dir(out)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    _held[key] = fd


def holds_run_dir(out: Path) -> bool:
    return Path(out).resolve() in _held


def release_run_dir(out: Path) -> None:
    fd = _held.pop(Path(out).resolve(), None)
    if fd is not None:
        try:
            (Path(out) / LOCK).unlink(missing_ok=True)
        except OSError:
            pass
        os.close(fd)


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint directory, or a run directory (its final/ or its latest checkpoint)."""
    path = Path(path)
    for candidate in (path, path / "final"):
        if (candidate / WEIGHTS).is_file() or (candidate / ADAPTERS).is_file():
            return candidate
    found = checkpoint_dirs(path)
    if found:
        return found[-1]
    raise UserError(f"{path}: not a checkpoint or run directory (no {WEIGHTS} or {ADAPTERS})")
