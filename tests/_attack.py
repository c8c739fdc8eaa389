"""Shared helpers of the attack tests (tests/test_attack_*.py): fingerprints of folders, one-line errors."""

import hashlib
import os
from pathlib import Path

from llama4dpo.cli import main

TINY = ["--config", "tiny", "--quiet"]


def pretrain(out, *extra, data="builtin:assistant"):
    return main(["pretrain", *TINY, "--data", str(data), "--out", str(out), "train.max_steps=4",
                 "train.save_every=2", *extra])


def tree_hash(root) -> str:
    """Names, kinds and bytes of everything under `root` (symlinks not followed): equal iff nothing changed."""
    h = hashlib.sha256()
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            h.update(str(p.relative_to(root)).encode())
            if p.is_symlink():
                h.update(b"L" + os.readlink(p).encode())
            elif p.is_file():
                h.update(b"F" + p.read_bytes())
    return h.hexdigest()


def one_line_error(capsys) -> str:
    """The captured stderr, asserted to be exactly one `error: ...` line (no traceback)."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err
