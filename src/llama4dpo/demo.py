"""`llama4dpo demo` (what `make demo` runs): the whole pipeline on the built-in task, on a CPU, in minutes.

    builtin:assistant -> pretrain (corpus a) -> SFT (demonstrations a) -> DPO (pairs b) -> evaluate on
    held-out prompts (c): ground-truth reward of the SFT reference vs the DPO policy, win rate, KL,
    held-out reward accuracy; sample answers side by side; plots; summary.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .checkpoint import load_model, load_tokenizer
from .config import Config
from .data import load_preference_data
from .evaluate import ground_truth_metrics, preference_metrics
from .model import LlamaModel
from .plot import plot_run
from .train.recipes import run

SOURCE = "builtin:assistant"
# Steps per stage: the demo preset's step count is the pretraining length; SFT and DPO are shorter.
STAGES = {"pretrain": [], "sft": ["train.max_steps=150", "train.lr=1e-3", "train.warmup_steps=20"],
          # DPO with an NLL term on the chosen answer (RPO, Pang et al. 2024, alpha = 1): on this task plain
          # DPO lowers the chosen log-prob too and gains less (BENCHMARKS.md, "The demo's DPO recipe").
          "dpo": ["train.max_steps=150", "train.lr=1e-4", "train.warmup_steps=20", "dpo.sft_weight=1.0"]}


def run_demo(out: str | Path, overrides: list[str] = (), *, quick: bool = False) -> dict:

    out = Path(out)
    scale = ["train.max_steps=30"] if quick else []
    start = time.perf_counter()
    print(f"llama4dpo demo -> {out}\n"
          f"  1. pretrain a {_size()} Llama 4 (MoE) on the built-in assistant task's mixed-quality corpus\n"
          f"  2. SFT on its demonstrations: the reference model (hedges about half the time, often wrong)\n"
          f"  3. DPO (+ NLL on chosen, RPO) on preference pairs (chosen: correct, concise; rejected: hedged or wrong)\n"
          f"  4. evaluate reference vs policy on held-out prompts with the task's ground-truth reward\n"
          f"  Expect about 5 minutes on a 2-core CPU.\n", flush=True)
    cfg = lambda stage: Config.load("demo", [*STAGES[stage], *overrides, *scale])  # noqa: E731
    for stage, init in (("pretrain", None), ("sft", out / "pretrain"), ("dpo", out / "sft")):
        run(stage, cfg(stage), SOURCE, out / stage, init, overwrite=True)
        plot_run(out / stage)

    print("\nevaluating on held-out prompts...", flush=True)
    policy, reference = load_model(out / "dpo" / "final"), load_model(out / "sft" / "final")
    tokenizer = load_tokenizer(out / "dpo" / "final")
    dcfg = cfg("dpo")
    data = load_preference_data(SOURCE, dcfg.data, tokenizer)
    prompts = data.eval_prompts[:12] if quick else data.eval_prompts
    gt = ground_truth_metrics(policy, reference, tokenizer, prompts, data.score, show=6)
    pref = preference_metrics(policy, reference, data.eval, tokenizer.pad_id, dcfg.dpo)
    summary = {
        "reward_reference": gt["reward_reference"], "reward_policy": gt["reward_policy"],
        "win_rate": gt["win_rate"], "kl": gt["kl"], "kl_median": gt["kl_median"],
        "reward_accuracy": pref["reward_accuracy"],
        "reward_margin": pref["reward_margin"], "heldout_prompts": gt["prompts"], "heldout_pairs": pref["pairs"],
        "seconds": round(time.perf_counter() - start, 1), "examples": gt["examples"],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(report(summary))
    return summary


def _size() -> str:
    import torch

    with torch.device("meta"):
        total, active = LlamaModel(Config.load("demo", ["model.vocab_size=72"]).model).num_params()
    return f"{total / 1e6:.1f}M-parameter ({active / 1e6:.1f}M active)"


def report(s: dict) -> str:
    lines = ["", "| held-out metric | reference (SFT) | policy (DPO) |", "|---|---|---|",
             f"| ground-truth reward (0-1) | {s['reward_reference']:.3f} | {s['reward_policy']:.3f} |",
             f"| win rate vs reference | | {s['win_rate']:.3f} |",
             f"| KL(policy ‖ reference), nats/answer | | {s['kl']:.3f} |",
             f"| KL per answer, median | | {s['kl_median']:.3f} |",
             f"| implicit-reward accuracy on pairs | | {s['reward_accuracy']:.3f} |",
             f"| implicit-reward margin | | {s['reward_margin']:.3f} |",
             f"\n{s['heldout_prompts']} held-out prompts, {s['heldout_pairs']} held-out pairs, {s['seconds']:.0f} s\n",
             "Held-out prompts, answered by the reference and by the DPO policy:"]
    for ex in s["examples"]:
        q = ex["prompt"].split("Human:")[-1].split("\n\nAssistant:")[0].strip()
        lines += [f"  Q: {q}", f"     reference: {ex['reference'].strip()!r:40} score {ex['score_reference']:.1f}",
                  f"     policy:    {ex['policy'].strip()!r:40} score {ex['score_policy']:.1f}"]
    return "\n".join(lines)
