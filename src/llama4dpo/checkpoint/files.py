"""Checkpoint files on disk: written atomically, listed in a manifest of sizes and hashes, read as plain files.

Directories are written into a temporary sibling that is renamed into place (`atomic_dir`), so a crash
mid-write never leaves a half-written checkpoint under the final name; write errors become one line naming the
path and the cause. `manifest.json` records each file's size and SHA-256, checked before a resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path

from safetensors import SafetensorError

from ..errors import UserError

CONFIG, WEIGHTS, TOKENIZER, MANIFEST = "config.json", "model.safetensors", "tokenizer.json", "manifest.json"
ADAPTERS, BASE = "adapters.safetensors", "base.json"  # a LoRA run's checkpoints, in place of WEIGHTS (adapters.py)
# Every file a checkpoint or an export holds: atomic_dir replaces a directory holding nothing else.
MODEL_FILES = {CONFIG, WEIGHTS, TOKENIZER, MANIFEST, ADAPTERS, BASE, "optimizer.pt", "trainer_state.json",
               "llama4dpo_tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json"}
WRITE_ERRORS = (OSError, SafetensorError, RuntimeError)  # what a full disk or a read-only folder raises


def write_error_cause(e: Exception, directory: Path) -> str:
    """The cause of a failed write, in words: OSError has them; safetensors wraps them ("... (os error 28)");
    torch.save reports a short write only as "unexpected pos", so a full disk is recognised by its free space."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    text = str(e)
    found = re.search(r"I/O error: (.*?) \(os error \d+\)", text) or re.search(r"strerror: (.*)", text)
    if found:
        return found.group(1).strip()
    try:
        if os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize < (1 << 20):
            return os.strerror(28)  # ENOSPC: No space left on device
    except OSError:
        pass
    return "incomplete write: " + (text.strip().splitlines() or [type(e).__name__])[0]


def sha256_file(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    """manifest.json: size and sha256 of every other file in the directory, checked on load."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps({"version": 1, "files": files}, indent=1) + "\n")


def verify_manifest(directory: Path, *, required: bool = False) -> None:
    """One-line UserError naming the first missing, truncated or corrupted file."""
    directory = Path(directory)
    refuse_symlinks(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        if required:
            raise UserError(f"{directory}: no {MANIFEST} (incomplete or foreign checkpoint); if you trust it, "
                            f"`llama4dpo manifest {directory}` writes one")
        return
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{manifest}: unreadable manifest ({e})") from None
    if not isinstance(files, dict):
        raise UserError(f"{manifest}: unreadable manifest (no file table)")
    for name, meta in files.items():
        f = directory / name
        if Path(name).name != name or not isinstance(meta, dict):
            raise UserError(f"{manifest}: bad entry {name!r}")
        if not f.is_file():
            raise UserError(f"{f}: missing (listed in {MANIFEST})")
        size = f.stat().st_size
        if size != meta.get("bytes"):
            raise UserError(f"{f}: truncated or altered ({size} bytes, manifest says {meta.get('bytes')!r})")
        if sha256_file(f) != meta.get("sha256"):
            raise UserError(f"{f}: corrupted (sha256 differs from {MANIFEST})")


def refuse_symlinks(directory: Path) -> None:
    """A checkpoint is plain files: a symbolic link in it could make us read, or copy out, a file elsewhere."""
    for p in Path(directory).iterdir():
        if p.is_symlink():
            raise UserError(f"{p}: is a symbolic link; a checkpoint must hold its own files (copy the target in)")


class WriteError(UserError):
    """A checkpoint or export could not be written (disk full, read-only, ...); nothing was published."""


class atomic_dir:
    """`with atomic_dir(final) as tmp:` write into tmp; on success tmp replaces `final` in one rename. A write
    error (WRITE_ERRORS) becomes a one-line WriteError naming `final` and the cause, with tmp removed."""

    def __init__(self, final: str | Path, what: str = "checkpoint"):
        self.final, self.what = Path(final), what
        self.tmp = self.final.parent / f".{self.final.name}.tmp-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Path:
        if self.final.is_symlink() or self.final.exists():  # replaced only if it holds what we write
            foreign = ([p.name for p in self.final.iterdir() if p.name not in MODEL_FILES]
                       if self.final.is_dir() and not self.final.is_symlink() else [self.final.name])
            if foreign:
                raise UserError(f"{self.final}: exists and holds {foreign[0]!r}, which no checkpoint holds; "
                                f"refusing to replace it (choose another path)")
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir()
        except OSError as e:
            raise self._failed(e) from None
        return self.tmp

    def _failed(self, e: Exception) -> WriteError:
        return WriteError(f"could not write {self.what} {self.final} ({write_error_cause(e, self.final.parent)})")

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(exc, WRITE_ERRORS):
                raise self._failed(exc) from None
            return False
        try:
            write_manifest(self.tmp)
            _fsync_dir(self.tmp)
        except BaseException as e:  # (a full disk can stop the manifest too: leave no temporary behind)
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(e, WRITE_ERRORS):
                raise self._failed(e) from None
            raise
        if self.final.exists():  # replace: move the old one aside first, then drop it
            old = self.final.parent / f".{self.final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.final, old)
            os.replace(self.tmp, self.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.final)
        _fsync_dir(self.final.parent)
        return False


def _fsync_dir(path: Path) -> None:
    for f in [*path.iterdir(), path] if path.is_dir() else [path]:
        try:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass


def read_json(file: Path) -> dict:
    try:
        return json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"{file}: cannot read JSON ({e})") from None
