"""Inference commands: generate, chat, eval. They load checkpoints and never import training code."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ..checkpoint import load_config, resolve_checkpoint
from ..data import check_context, load_preference_data
from ..data.chat import HUMAN, check_no_special_tokens, has_template, render_prompt, template_prompt
from ..errors import UserError
from ..evaluate import format_table, ground_truth_metrics, policy_logps, preference_metrics
from ..generate import generate
from ..repl import chat_session
from .args import add_sampling_args, model_and_tokenizer, positive_int, sampling_of


def _read_prompts_file(path: str) -> str:
    """The text of --prompts-file; a missing, unreadable or non-UTF-8 file is a one-line UserError."""
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
    prompts = _read_prompts(args)  # before loading the model: a bad prompts file fails fast
    if args.raw and args.system:
        raise UserError("--system needs the chat template: drop --raw")
    model, tokenizer = model_and_tokenizer(args.model)
    if args.dtype == "bf16":
        model = model.to(torch.bfloat16)
    s = sampling_of(args)
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
    model, tokenizer = model_and_tokenizer(args.model)
    return chat_session(model, tokenizer, input, lambda t: print(t, end="", flush=True), sampling_of(args),
                        system=args.system)


def _eval_config(args):
    """The evaluated checkpoint's config with the command line's overrides. The run's data.max_samples
    limited its training set: it must not silently shorten the scored file, so only --max-samples (or an
    explicit data.max_samples=N override) limits it."""
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
    cfg = _eval_config(args)
    check_context(cfg.data, cfg.model.max_position_embeddings)  # before loading any model
    model, tokenizer = model_and_tokenizer(args.model)
    reference = model_and_tokenizer(args.ref)[0] if args.ref else None
    data = load_preference_data(args.data, cfg.data, tokenizer, split=False,
                                context=cfg.model.max_position_embeddings)
    print(data.report.summary())
    results: dict = {"model": str(args.model), "reference": args.ref, "data": args.data,
                     "data_report": data.report.to_dict()}
    if reference is not None:
        results.update(preference_metrics(model, reference, data.eval, tokenizer.pad_id, cfg.dpo))
    else:
        results.update(policy_logps(model, data.eval, tokenizer.pad_id))
    if data.score is not None and reference is not None:
        prompts = data.eval_prompts[:args.limit] if args.limit else data.eval_prompts
        gt = ground_truth_metrics(model, reference, tokenizer, prompts, data.score, args.max_new_tokens)
        results.update(gt)
    print(format_table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


def add_commands(sub) -> None:
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
    add_sampling_args(s)
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("chat", help="interactive multi-turn chat")
    s.add_argument("--model", required=True)
    s.add_argument("--system", help="system message")
    add_sampling_args(s)
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
