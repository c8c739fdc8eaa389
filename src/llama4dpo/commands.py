"""Training subcommands: pretrain, sft, dpo, plot. Config file + dotted `section.key=value` overrides."""

from __future__ import annotations

import argparse


def _config(args):
    from .config import Config

    overrides = list(args.overrides)
    if getattr(args, "strict", False):
        overrides.append("data.strict=true")
    return Config.load(args.config, overrides)


def cmd_pretrain(args) -> int:
    from .train.recipes import run_pretrain

    run_pretrain(_config(args), args.data, args.out, overwrite=args.overwrite, resume=args.resume, show=not args.quiet)
    return 0


def cmd_sft(args) -> int:
    from .train.recipes import run_sft

    run_sft(_config(args), args.data, args.out, args.init, overwrite=args.overwrite, resume=args.resume,
            show=not args.quiet)
    return 0


def cmd_dpo(args) -> int:
    from .train.recipes import run_dpo

    run_dpo(_config(args), args.data, args.out, args.init, args.ref, overwrite=args.overwrite, resume=args.resume,
            show=not args.quiet)
    return 0


def cmd_plot(args) -> int:
    from .plot import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


def _training_args(s: argparse.ArgumentParser, *, init: bool) -> None:
    s.add_argument("--config", help="TOML preset, e.g. configs/tiny.toml (defaults apply without one)")
    s.add_argument("--data", required=True, help="a .jsonl/.json/.parquet/.csv(.gz) or .txt file, a hub dataset "
                                                 "name, or builtin:assistant")
    s.add_argument("--out", required=True, help="run directory (resumed automatically if it holds this run)")
    if init:
        s.add_argument("--init", required=True, help="checkpoint (or run directory) to start from")
    s.add_argument("--resume", action="store_true", help="require resuming from the run directory's latest checkpoint")
    s.add_argument("--overwrite", action="store_true", help="discard whatever is in --out")
    s.add_argument("--strict", action="store_true", help="the first bad data record is an error, not a counted skip")
    s.add_argument("--quiet", action="store_true", help="no progress bar or summaries")
    s.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. train.max_steps=200 dpo.beta=0.1")


def add_commands(sub) -> None:
    s = sub.add_parser("pretrain", help="next-token pretraining from scratch (trains the tokenizer too)")
    _training_args(s, init=False)
    s.set_defaults(func=cmd_pretrain)

    s = sub.add_parser("sft", help="supervised fine-tuning on prompt + chosen response")
    _training_args(s, init=True)
    s.set_defaults(func=cmd_sft)

    s = sub.add_parser("dpo", help="preference optimisation (DPO, cDPO, rDPO, IPO, hinge, SimPO)")
    _training_args(s, init=True)
    s.add_argument("--ref", help="reference checkpoint (default: the --init checkpoint)")
    s.set_defaults(func=cmd_dpo)

    s = sub.add_parser("plot", help="PNG curves of a run's metrics.jsonl")
    s.add_argument("run_dir")
    s.add_argument("--out", help="output directory (default: RUN_DIR/plots)")
    s.set_defaults(func=cmd_plot)
