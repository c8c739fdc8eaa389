"""The `llama4dpo` command line: one file per command group, each with its commands and their arguments.

    train.py   pretrain, sft, dpo, plot, demo
    infer.py   generate, chat, eval
    models.py  info, export-hf, import-hf, manifest
    args.py    argument types, config and checkpoint arguments, sampling settings

A user's mistake (bad config key, missing file, malformed data) is printed as one line, `error: ...`,
with exit status 2 - never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import UserError
from . import infer, models, train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama4dpo", description="Llama 4 (text, MoE) with pretraining, SFT and DPO.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for group in (models, train, infer):
        group.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides (section.key=value) may come before or after options, so collect them from the leftovers.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except UserError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # always exactly one line
        return 2
    except OSError as e:  # a file we could not write or read (disk full, read-only, permissions) that no
        where = f"{e.filename}: " if e.filename else ""  # narrower handler named: still one line
        print("error: " + " ".join(f"{where}{e.strerror or e}".split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
