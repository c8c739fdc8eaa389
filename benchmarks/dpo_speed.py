"""DPO training speed, model forward+backward, generation and achieved FLOP/s: llama4dpo vs transformers/TRL.

Everything is measured side by side in ONE run, on the same model (built with our `LlamaModel`, saved, and
exported with `export_hf`, so transformers loads bit-identical weights), the same synthetic data, the same
batch and lengths, the same precision, after warm-up; step times are medians.

    python benchmarks/dpo_speed.py                 # CPU, the 15M configuration at 4, 8 and 16 experts
    python benchmarks/dpo_speed.py --quick         # smoke mode: tiny model, 1 warm-up + 2 steps (< 60 s)
    python benchmarks/dpo_speed.py --device cuda --preset 100m   # one GPU (what benchmarks/gpu.sh runs)

Definitions (also printed under the tables):
  * tokens/s (DPO) = non-pad tokens of prompt+chosen and prompt+rejected rows per optimizer step / median step
    wall time. A step is everything the training loop does: batch collation, reference forward (unless
    reference log-probs are precomputed), policy forward + backward, gradient clipping, AdamW step.
    For TRL the step time is the interval between consecutive `on_step_end` callbacks; for us the interval
    between consecutive `Trainer.train_step()` calls. On a shared machine each step also records how many cores
    OTHER processes used meanwhile (/proc/stat minus this process); the median is taken over the "quiet" steps
    (< 0.25 cores used by others) when there are at least 3, else over all steady steps; the table says how
    many were quiet. `--rounds N` interleaves N runs of every setting; `--threads 1` is the robust choice on a
    loaded machine (with 2 threads every parallel op waits whenever its second thread is descheduled).
  * peak memory (CPU): each setting runs in its own subprocess; "peak RSS" is getrusage's ru_maxrss of that
    process; "train RSS" is that peak minus the RSS measured after imports, before anything is built (models,
    data, optimizer, activations: what training adds). On CUDA: torch.cuda.max_memory_allocated.
  * model FLOPs: N = active parameters per token excluding the input embedding (a lookup; the LM head is
    counted), attention-score FLOPs not counted. DPO step = (6 + 2) * N * tokens with a reference forward,
    6 * N * tokens with precomputed reference log-probs; forward+backward = 6 * N * tokens; generation =
    2 * N * (prompt + generated tokens). TRL/transformers are credited with the same useful FLOPs (not the
    dense all-experts work they actually do). MFU = achieved / measured matmul peak of the same dtype, measured
    in the same run (best of square matmuls).

TRL friction handled here (TRL 1.16, transformers 5.24): Llama4ForCausalLM declares base_model_prefix =
"language_model" while its backbone is `.model`, which breaks TRL's fused LM head -> the instance's prefix is
set to "model"; router_aux_loss_coef=0.0 in DPOConfig (else TRL reads config.num_experts, which
Llama4TextConfig lacks); bf16 and gradient_checkpointing are always set explicitly.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SRC = ROOT / "src"
for p in (str(HERE), str(SRC)):
    if p not in sys.path:
        sys.path.insert(0, p)

PAD, BOS, EOS = 0, 1, 2


def _stub_tqdm() -> None:
    """llama4dpo.train.metrics imports tqdm for its progress bar, which the benchmark never shows: where tqdm is
    missing (a bare GPU machine), a stand-in module lets the trainer import."""
    try:
        import tqdm.auto  # noqa: F401
    except ImportError:
        import types
        mod = types.ModuleType("tqdm")
        auto = types.ModuleType("tqdm.auto")

        class tqdm:  # noqa: N801
            def __init__(self, *a, **k):
                pass

            def __getattr__(self, name):
                return lambda *a, **k: None
        auto.tqdm = mod.tqdm = tqdm
        mod.auto = auto
        sys.modules["tqdm"], sys.modules["tqdm.auto"] = mod, auto


_stub_tqdm()

# ---- presets -----------------------------------------------------------------------------------------------
# model: ModelConfig fields; pairs x seq: preference pairs per step and tokens per sequence (prompt + response)
PRESETS = {
    # the issue's 15M configuration: every layer MoE, expert (and shared-expert) width 512, 15.3M parameters
    # total at 8 experts (4.3M active per token). Dense width 1024 is stated but unused (no dense layers).
    "15m": dict(model=dict(vocab_size=256, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=8, intermediate_size=512, intermediate_size_mlp=1024,
                           interleave_moe_layer_step=1, num_experts_per_tok=1, max_position_embeddings=1024),
                pairs=8, seq=128, experts=[4, 8, 16]),
    # configs/llama4-100m.toml's shape: 12 x 768, 12 heads / 4 kv of 64, MoE every 2nd layer (16 experts,
    # top-1, width 1536), dense width 3072, vocab 32000 (153M active / 472M total)
    "100m": dict(model=dict(vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                            num_key_value_heads=4, head_dim=64, intermediate_size=1536, intermediate_size_mlp=3072,
                            interleave_moe_layer_step=2, num_experts_per_tok=1, attention_chunk_size=8192,
                            max_position_embeddings=2048),
                 pairs=8, seq=512, experts=[16]),
    # smoke mode
    "tiny": dict(model=dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=128, intermediate_size_mlp=256,
                            interleave_moe_layer_step=1, num_experts_per_tok=1, max_position_embeddings=256),
                 pairs=4, seq=32, experts=[4]),
}

# DPO settings: side, precision, gradient checkpointing (TRL only), precomputed reference log-probs
SETTINGS = {
    "ours-fp32":          dict(side="ours", precision="fp32", gc=False, preref=False),
    "ours-bf16":          dict(side="ours", precision="bf16", gc=False, preref=False),
    "ours-fp32-preref":   dict(side="ours", precision="fp32", gc=False, preref=True),
    "ours-bf16-preref":   dict(side="ours", precision="bf16", gc=False, preref=True),
    # train.compile=true: the model through torch.compile (6 untimed steps first: compilation, recompiles)
    "ours-bf16-compile":  dict(side="ours", precision="bf16", gc=False, preref=False, compile=True),
    "ours-bf16-preref-compile": dict(side="ours", precision="bf16", gc=False, preref=True, compile=True),
    # the same with train.activation_memory_budget=0.8: the compiled step recomputes some activations in backward
    "ours-bf16-preref-compile-lean": dict(side="ours", precision="bf16", gc=False, preref=True, compile=True,
                                          budget=0.8),
    # train.compile_mode=reduce-overhead: the compiled model's graphs replayed as CUDA graphs (on CPU: as compile)
    "ours-bf16-cgraphs":  dict(side="ours", precision="bf16", gc=False, preref=False, compile=True,
                               mode="reduce-overhead"),
    "ours-bf16-preref-cgraphs": dict(side="ours", precision="bf16", gc=False, preref=True, compile=True,
                                     mode="reduce-overhead"),
    # dpo.share_prompt=false: [chosen; rejected] rows, the prompt computed twice (the layout TRL uses)
    "ours-fp32-unshared": dict(side="ours", precision="fp32", gc=False, preref=False, share=False),
    "ours-bf16-unshared": dict(side="ours", precision="bf16", gc=False, preref=False, share=False),
    "trl-fp32":           dict(side="trl", precision="fp32", gc=False, preref=False),
    "trl-default":        dict(side="trl", precision="bf16", gc=True, preref=False),   # TRL's own defaults
    "trl-bf16":           dict(side="trl", precision="bf16", gc=False, preref=False),
    "trl-fp32-gc":        dict(side="trl", precision="fp32", gc=True, preref=False),
    "trl-default-preref": dict(side="trl", precision="bf16", gc=True, preref=True),
    "trl-bf16-preref":    dict(side="trl", precision="bf16", gc=False, preref=True),
    # transformers model + a hand-written DPO step (frozen reference, AdamW): the fallback where TRL is missing
    "hf-fp32":            dict(side="hf", precision="fp32", gc=False, preref=False),
    "hf-bf16":            dict(side="hf", precision="bf16", gc=False, preref=False),
}


def _prec(row: dict) -> str:
    return SETTINGS[row["setting"]]["precision"]


def describe(name: str) -> str:
    s = SETTINGS[name]
    side = {"ours": "llama4dpo Trainer", "trl": "TRL DPOTrainer", "hf": "transformers + hand-written DPO"}[s["side"]]
    prec = "fp32" if s["precision"] == "fp32" else "bf16 autocast"
    extra = (", grad ckpt" if s["gc"] else "") + (", precomputed ref" if s["preref"] else "") + \
        (", torch.compile" if s.get("compile") else "") + \
        (f", activation memory budget {s['budget']}" if s.get("budget") else "") + \
        (", CUDA graphs" if s.get("mode") == "reduce-overhead" else "") + \
        (", no prefix sharing" if s.get("share") is False else "")
    return f"{side} ({prec}{extra})"


# ---- environment -------------------------------------------------------------------------------------------
def package_status() -> dict[str, str | None]:
    """Version of each package this benchmark can use, None where it is missing."""
    import importlib
    out = {}
    for name in ("torch", "safetensors", "numpy", "tqdm", "transformers", "trl", "datasets", "accelerate",
                 "tokenizers", "psutil"):
        try:
            mod = importlib.import_module(name)
            out[name] = getattr(mod, "__version__", "?")
        except Exception:  # noqa: BLE001 - a broken install counts as missing
            out[name] = None
    return out


def check_env(device: str) -> dict[str, bool]:
    """Print what is present and what each part needs; return which sides can run."""
    st = package_status()
    print("packages: " + ", ".join(f"{k} {v}" if v else f"{k} MISSING" for k, v in st.items()), flush=True)
    need_ours = ["torch", "safetensors"]
    missing = [k for k in need_ours if not st[k]]
    if not st["tqdm"]:
        print("NOTE: tqdm is missing: a stub stands in (the trainer imports it for its progress bar only).",
              flush=True)
    if missing:
        print(f"ERROR: llama4dpo itself needs {', '.join(missing)} (pip install {' '.join(missing)}); "
              f"nothing can be measured.", flush=True)
        sys.exit(3)
    can = {"ours": True, "hf": bool(st["transformers"]),
           "trl": all(st[k] for k in ("transformers", "trl", "datasets", "accelerate", "tokenizers"))}
    if not can["hf"]:
        print("NOTE: transformers is missing: only llama4dpo is measured (pip install transformers for the "
              "comparison).", flush=True)
    elif not can["trl"]:
        lack = [k for k in ("trl", "datasets", "accelerate", "tokenizers") if not st[k]]
        print(f"NOTE: TRL's DPOTrainer needs {', '.join(lack)} (missing): the transformers side uses a "
              f"hand-written DPO step instead (frozen reference, AdamW).", flush=True)
    if device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            print(f"ERROR: --device {device} but torch {torch.__version__} sees no CUDA device "
                  f"(a CPU-only build? torch.version.cuda={torch.version.cuda}).", flush=True)
            sys.exit(3)
        print(f"device: {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}", flush=True)
    return can


# ---- model + data ------------------------------------------------------------------------------------------
def model_config(preset: str, experts: int):
    from llama4dpo.config import ModelConfig
    m = dict(PRESETS[preset]["model"])
    m.update(num_local_experts=experts, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    cfg = ModelConfig(**m)
    cfg.validate()
    return cfg


def build_checkpoints(preset: str, experts: int, workdir: Path, seed: int = 0) -> tuple[Path, Path, dict]:
    """Our checkpoint and its `export_hf` twin (identical weights); returns (ckpt, hf_dir, info)."""
    import torch
    from llama4dpo import Config, LlamaModel, save_model
    from llama4dpo.interop.hf import export_hf

    mcfg = model_config(preset, experts)
    torch.manual_seed(seed)
    model = LlamaModel(mcfg).init_weights(seed=seed)
    total, active = model.num_params()
    embed = model.embed_tokens.weight.numel()
    ckpt, hf_dir = workdir / f"ours-e{experts}", workdir / f"hf-e{experts}"
    save_model(ckpt, model, Config(model=mcfg))
    export_hf(ckpt, hf_dir)
    info = dict(experts=experts, total_params=total, active_params=active, flop_params=active - embed,
                expert_width=mcfg.expert_size, dense_width=mcfg.dense_size, moe_layers=mcfg.moe_layer_ids)
    return ckpt, hf_dir, info


def make_examples(n_pairs: int, seq: int, vocab: int, seed: int) -> list[dict]:
    """Random pairs; every sequence is exactly `seq` tokens: bos + prompt (seq/2), response (seq/2) ending in eos."""
    import torch
    g = torch.Generator().manual_seed(seed)
    p_len, r_len = seq // 2, seq - seq // 2

    def draw(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()
    return [{"prompt_ids": [BOS] + draw(p_len - 1), "chosen_ids": draw(r_len - 1) + [EOS],
             "rejected_ids": draw(r_len - 1) + [EOS]} for _ in range(n_pairs)]


def _collate_preference(shared: bool = False):
    """collate_preference ([chosen; rejected] rows), or collate_preference_shared (one prefix-shared row per pair)."""
    name = "collate_preference_shared" if shared else "collate_preference"
    try:
        import llama4dpo.data.collate as mod
    except ImportError:  # data/__init__ pulls datasets etc.; the collator itself only needs torch
        import importlib.util
        spec = importlib.util.spec_from_file_location("_l4d_collate", SRC / "llama4dpo" / "data" / "collate.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return getattr(mod, name)


def char_tokenizer(vocab: int):
    """A transformers tokenizer whose token i is the single character chr(0x4E00 + i) (BPE with no merges): a
    text of those characters tokenizes to exactly the ids it spells, so TRL sees our token ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    assert 0x4E00 + vocab < 0xD800, "vocabulary too large for the character map"
    tk = Tokenizer(models.BPE(vocab={chr(0x4E00 + i): i for i in range(vocab)}, merges=[]))
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token=chr(0x4E00 + PAD), bos_token=chr(0x4E00 + BOS),
                                   eos_token=chr(0x4E00 + EOS))


def _text(ids) -> str:
    return "".join(chr(0x4E00 + i) for i in ids)


# ---- measurement helpers -----------------------------------------------------------------------------------
def _rss_bytes() -> int:
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _sync(device):
    import torch
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


QUIET = 0.25  # a step is "quiet" when other processes used less than this many cores during it


def _cpu_jiffies() -> tuple[int, int]:
    """(busy jiffies of the whole machine, jiffies of this process: all its threads), 0s off Linux."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(v) - v[3] - v[4], int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return 0, 0


class StepClock:
    """Wall time of each interval between ticks, and how many cores OTHER processes used meanwhile (the shared
    machine's load, from /proc/stat minus this process's own CPU time)."""

    HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __init__(self, device="cpu"):
        self.device, self.times, self.others = device, [], []
        self.start()

    def start(self):
        self.last = (time.perf_counter(), *_cpu_jiffies())

    def tick(self):
        _sync(self.device)
        now = (time.perf_counter(), *_cpu_jiffies())
        dt = now[0] - self.last[0]
        self.times.append(dt)
        self.others.append(max(0.0, ((now[1] - self.last[1]) - (now[2] - self.last[2])) / self.HZ / max(dt, 1e-9)))
        self.last = now


def quiet_median(times: list[float], others: list[float], min_quiet: int = 3) -> tuple[float, int]:
    """Median over the steps during which other processes were (nearly) idle when there are at least
    `min_quiet` of them, else over all steps; returns (median, number of quiet steps)."""
    quiet = [t for t, o in zip(times, others) if o < QUIET]
    return statistics.median(quiet if len(quiet) >= min_quiet else times), len(quiet)


def _median_time(fn, warmup: int, repeat: int, device="cpu") -> float:
    for _ in range(warmup):
        fn()
    clock = StepClock(device)
    for _ in range(repeat):
        clock.start()
        fn()
        clock.tick()
    return quiet_median(clock.times, clock.others, min_quiet=max(2, repeat // 2))[0]


def _autocast(precision: str, device: str):
    import contextlib
    import torch
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---- DPO workers (each in its own subprocess) ----------------------------------------------------------------
def worker(spec: dict) -> dict:
    import torch
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    rss0 = _rss_bytes()
    if spec["device"].startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    fn = {"ours": _dpo_ours, "trl": _dpo_trl, "hf": _dpo_hf}[SETTINGS[spec["setting"]]["side"]]
    times, others, tokens, *losses = fn(spec, SETTINGS[spec["setting"]])
    w = spec["warmup"]
    med, n_quiet = quiet_median(times[w:], others[w:])
    out = dict(setting=spec["setting"], experts=spec["experts"], tokens_per_step=tokens, step_s=med,
               tokens_per_s=tokens / med, step_times=[round(t, 4) for t in times],
               others=[round(o, 2) for o in others], quiet_steps=n_quiet, steady_steps=len(times[w:]),
               median_all_s=statistics.median(times[w:]),
               rss_base_mb=rss0 / 2**20, rss_peak_mb=_peak_rss_bytes() / 2**20)
    out["rss_train_mb"] = out["rss_peak_mb"] - out["rss_base_mb"]
    # tokens actually run through the model: with prefix sharing our rows hold each prompt once
    st = SETTINGS[spec["setting"]]
    prompt = spec["seq"] // 2
    out["computed_tokens"] = spec["pairs"] * (2 * spec["seq"] - prompt) if st["side"] == "ours" and \
        st.get("share", True) else tokens
    if spec["device"].startswith("cuda"):
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if losses:
        out["losses"] = [round(v, 6) for v in losses[0]]
    return out


UNTIMED_COMPILE_STEPS = 6  # steps a compiled setting runs before its timed ones (compiling, recompiling)


def _dpo_ours(spec, s):
    import functools
    import torch
    from llama4dpo import Config, load_model
    from llama4dpo.config import DPOConfig, TrainConfig
    from llama4dpo.train.batches import ExampleBatches
    from llama4dpo.train.objectives import Preference, precompute_reference_logps
    from llama4dpo.train.trainer import Trainer, autocast

    device = torch.device(spec["device"])
    n_steps = spec["warmup"] + spec["steps"]
    untimed = UNTIMED_COMPILE_STEPS if s.get("compile") else 0
    cfg = Config.load_json(Path(spec["ckpt"]) / "config.json")
    cfg.train = TrainConfig(batch_size=spec["pairs"], grad_accum_steps=1, precision=s["precision"],
                            device=spec["device"], lr=1e-6, warmup_steps=0, max_steps=untimed + n_steps,
                            weight_decay=0.0,
                            grad_clip=1.0, seed=spec["seed"], compile=s.get("compile", False),
                            compile_mode=s.get("mode", "default"), activation_memory_budget=s.get("budget", 1.0))
    cfg.dpo = DPOConfig(beta=0.1, precompute_ref=s["preref"], share_prompt=s.get("share", True))
    cfg.validate()
    # the same examples (and so the same order) in every llama4dpo setting, compiled or not: step i trains on the
    # same batch in all of them, so their losses can be set side by side
    examples = make_examples(spec["pairs"] * (UNTIMED_COMPILE_STEPS + n_steps), spec["seq"], cfg.model.vocab_size,
                             spec["seed"])
    collate = functools.partial(_collate_preference(cfg.dpo.share_prompt), pad_id=PAD)
    batches = ExampleBatches(examples, collate, spec["pairs"], 1, spec["seed"])
    model = load_model(spec["ckpt"], device).train()
    if s["preref"]:  # one pass over the data before training (not in the step times), then no reference held;
        # as `llama4dpo dpo` does when the reference is the initial checkpoint: the policy before its first step
        with autocast(cfg.train, device):
            logps = precompute_reference_logps(model, batches.fixed(), len(examples), device)
        objective = Preference(cfg.dpo, reference_logps=logps)
    else:
        objective = Preference(cfg.dpo, reference=load_model(spec["ckpt"], device).requires_grad_(False))
    trainer = Trainer(cfg, model, objective, batches, None, Path(spec["workdir"]) / "ours-run", device=device,
                      show_progress=False)
    # each step's loss, from the first: every llama4dpo setting starts from the same weights and trains on the
    # same batches (a frozen reference and precomputed log-probs are the same numbers: the initial weights')
    losses = []
    for _ in range(untimed):  # compile (and recompile; record CUDA graphs) before timing; then go on from there
        losses.append(trainer.train_step()["loss"])
    clock = StepClock(device)
    for _ in range(n_steps):
        losses.append(trainer.train_step()["loss"])
        clock.tick()
    # the same count on every side: prompt+chosen and prompt+rejected rows (equal-length rows, no padding),
    # whether or not our rows hold the prompt once (prefix sharing)
    return clock.times, clock.others, 2 * spec["pairs"] * spec["seq"], losses


def _load_hf(hf_dir, device):
    import torch
    from transformers import Llama4ForCausalLM
    model = Llama4ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa").to(device)
    model.base_model_prefix = "model"  # the class says "language_model"; TRL's fused LM head needs the backbone
    return model


def _dpo_trl(spec, s):
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer
    import transformers
    transformers.logging.set_verbosity_error()

    n_steps = spec["warmup"] + spec["steps"]
    vocab = json.loads((Path(spec["hf_dir"]) / "config.json").read_text())["vocab_size"]
    examples = make_examples(spec["pairs"] * n_steps, spec["seq"], vocab, spec["seed"])
    # TRL tokenizes text and appends eos to the responses itself: give it the responses without their eos
    ds = Dataset.from_dict({"prompt": [_text(e["prompt_ids"]) for e in examples],
                           "chosen": [_text(e["chosen_ids"][:-1]) for e in examples],
                           "rejected": [_text(e["rejected_ids"][:-1]) for e in examples]})
    tok = char_tokenizer(vocab)
    model = _load_hf(spec["hf_dir"], spec["device"])
    ref = _load_hf(spec["hf_dir"], spec["device"])
    cuda = spec["device"].startswith("cuda")
    args = DPOConfig(
        output_dir=str(Path(spec["workdir"]) / "trl-run"), per_device_train_batch_size=spec["pairs"],
        gradient_accumulation_steps=1, max_steps=n_steps, learning_rate=1e-6, weight_decay=0.0, max_grad_norm=1.0,
        bf16=s["precision"] == "bf16", gradient_checkpointing=s["gc"], precompute_ref_log_probs=s["preref"],
        router_aux_loss_coef=0.0, beta=0.1, loss_type="sigmoid", max_length=spec["seq"] + 8,
        logging_steps=10**6, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=not cuda,
        dataloader_num_workers=0, seed=spec["seed"])
    clock = StepClock(spec["device"])

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock.start()

        def on_step_end(self, *a, **k):
            clock.tick()

    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok,
                         callbacks=[Clock()])
    first = trainer.train_dataset[0]
    want = {(tuple(e["prompt_ids"]), tuple(e["chosen_ids"]), tuple(e["rejected_ids"])) for e in examples}
    got = (tuple(first["prompt_ids"]), tuple(first["chosen_ids"]), tuple(first["rejected_ids"]))
    assert got in want, "TRL tokenized the data differently from our token ids"
    trainer.train()
    return clock.times, clock.others, 2 * spec["pairs"] * spec["seq"]  # equal-length rows: no padding


def _dpo_hf(spec, s):
    """transformers' model with a hand-written DPO step: reference forward (no grad), policy forward + backward,
    clip, AdamW (fused on CUDA). The loss is DPO's sigmoid loss on summed response log-probs."""
    import functools
    import torch
    import torch.nn.functional as F

    device = spec["device"]
    n_steps = spec["warmup"] + spec["steps"]
    vocab = json.loads((Path(spec["hf_dir"]) / "config.json").read_text())["vocab_size"]
    examples = make_examples(spec["pairs"] * n_steps, spec["seq"], vocab, spec["seed"])
    collate = functools.partial(_collate_preference(), pad_id=PAD)
    model = _load_hf(spec["hf_dir"], device).train()
    ref = _load_hf(spec["hf_dir"], device).eval().requires_grad_(False)
    if s["gc"]:
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0, fused=device.startswith("cuda"))

    def seq_logps(logits, labels):
        logits, labels = logits[:, :-1].float(), labels[:, 1:]
        mask = labels != -100
        picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return ((picked - logits.logsumexp(-1)) * mask).sum(-1)

    clock, tokens = StepClock(device), 0
    for i in range(n_steps):
        b = {k: v.to(device) for k, v in collate(examples[i * spec["pairs"]:(i + 1) * spec["pairs"]]).items()}
        with _autocast(s["precision"], device):
            with torch.no_grad():
                r = seq_logps(ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
            p = seq_logps(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
        B = p.shape[0] // 2
        h = (p[:B] - r[:B]) - (p[B:] - r[B:])
        loss = -F.logsigmoid(0.1 * h).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        clock.tick()
        tokens = int(b["attention_mask"].sum())
    return clock.times, clock.others, tokens


def pool_rounds(runs: list[dict], warmup: int) -> dict:
    """One row per setting: the median over the steady steps of all its rounds; memory: the median peak."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[-1]
    steady = [t for r in good for t in r["step_times"][warmup:]]
    others = [o for r in good for o in r["others"][warmup:]]
    out = dict(good[0])
    out["step_s"], out["quiet_steps"] = quiet_median(steady, others)
    out["steady_steps"] = len(steady)
    out["median_all_s"] = statistics.median(steady)
    out["tokens_per_s"] = out["tokens_per_step"] / out["step_s"]
    out["round_tokens_per_s"] = [r["tokens_per_s"] for r in good]
    out["failed_rounds"] = len(runs) - len(good)
    for k in ("rss_peak_mb", "rss_train_mb", "rss_base_mb", "cuda_peak_mb"):
        if k in out:
            out[k] = statistics.median(r[k] for r in good)
    return out


def run_worker(spec: dict, timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), str(HERE), os.environ.get("PYTHONPATH", "")]),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1", WANDB_DISABLED="true")
    t = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                           capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(setting=spec["setting"], experts=spec["experts"], error=f"timed out after {timeout:.0f} s")
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            out = json.loads(line[len("RESULT "):])
            out["wall_s"] = time.perf_counter() - t
            return out
    tail = (p.stderr or p.stdout).strip().splitlines()[-15:]
    return dict(setting=spec["setting"], experts=spec["experts"], error=" | ".join(tail)[-1500:])


# ---- in-process benchmarks -----------------------------------------------------------------------------------
def matmul_peak(device: str, dtypes: list[str], sizes: list[int]) -> dict[str, float]:
    """Best achieved FLOP/s of square matmuls per dtype (the machine's measured peak for the MFU column)."""
    import torch
    out = {}
    for name in dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        best = 0.0
        for n in sizes:
            a = torch.randn(n, n, device=device).to(dtype)
            b = torch.randn(n, n, device=device).to(dtype)
            t = _median_time(lambda: a @ b, warmup=2, repeat=5, device=device)
            best = max(best, 2 * n**3 / t)
        out[name] = best
    return out


def fwd_bwd(ckpt, hf_dir, device, precision, rows, seq, vocab, warmup, repeat, has_hf) -> dict:
    """Forward + backward of the model alone (no optimizer): cross-entropy on rows x seq random tokens."""
    import torch
    import torch.nn.functional as F
    from llama4dpo import load_model

    ids = torch.randint(3, vocab, (rows, seq), generator=torch.Generator().manual_seed(1)).to(device)

    def step(forward, params):
        def run():
            with _autocast(precision, device):
                logits = forward(ids)
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            for p in params:
                p.grad = None
        return run

    ours = load_model(ckpt, device).train()
    res = {"ours_s": _median_time(step(ours, list(ours.parameters())), warmup, repeat, device)}
    if has_hf:
        hf = _load_hf(hf_dir, device).train()
        res["hf_s"] = _median_time(step(lambda x: hf(input_ids=x).logits, list(hf.parameters())), warmup, repeat,
                                   device)
        if precision == "fp32":  # same weights -> same logits (checked once, in eval mode)
            with torch.no_grad():
                ours.eval(), hf.eval()
                d = (ours(ids[:2]) - hf(input_ids=ids[:2]).logits).abs().max().item()
            res["max_logit_diff"] = d
        del hf
    res["tokens"] = rows * seq
    return res


def generation(ckpt, hf_dir, device, precision, batch, prompt_len, new_tokens, vocab, repeat, has_hf,
               weights="fp32", compiled=True) -> dict:
    """Greedy decoding with a KV cache, `new_tokens` per row (no eos stop on either side): ours eager, ours
    with `torch.compile(model.decode)`, transformers' `generate`, timed in turns (A B C A B C ...), medians.
    weights="bf16": both models held in bf16 (no autocast); "fp32": fp32 weights under `precision`."""
    import torch
    from llama4dpo import load_model
    from llama4dpo.generate import Sampling, generate_ids

    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    held = torch.bfloat16 if weights == "bf16" else torch.float32
    if weights == "bf16":
        precision = "fp32"  # no autocast: the weights themselves are bf16
    ours = load_model(ckpt, device).eval().to(held)
    s = Sampling(max_new_tokens=new_tokens, temperature=0.0)
    got, runs = {}, {}

    def ours_run(compile):
        def run():
            with _autocast(precision, device):
                got["ours-compiled" if compile else "ours"] = generate_ids(ours, prompts, s, eos_id=-1, pad_id=PAD,
                                                                           compile=compile)
        return run
    runs["ours"] = ours_run(False)
    if compiled:
        runs["ours-compiled"] = ours_run(True)
    res = {}
    if has_hf:
        hf = _load_hf(hf_dir, device).eval().to(held)
        hf.generation_config.eos_token_id = None  # generate exactly new_tokens, like ours with eos_id=-1
        ids = torch.tensor(prompts, device=device)
        mask = torch.ones_like(ids)

        def run_hf():
            with torch.no_grad(), _autocast(precision, device):
                out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=PAD, use_cache=True)
            got["hf"] = out[:, prompt_len:].tolist()
        runs["hf"] = run_hf
    for name, fn in list(runs.items()):  # warm-up; the first compiled call compiles
        t = time.perf_counter()
        try:
            fn()
        except Exception as e:  # e.g. no C++ compiler for torch.compile: report it, keep the other rows
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            res[f"{name.replace('-', '_')}_error"] = f"{type(e).__name__}: {first}"
            del runs[name]
            continue
        res[f"{name.replace('-', '_')}_first"] = time.perf_counter() - t  # seconds, compilation included
    times = {name: [] for name in runs}
    for _ in range(repeat):
        for name, fn in runs.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t)
    for name, ts in times.items():
        res[f"{name.replace('-', '_')}_s"] = statistics.median(ts)  # ours_s, ours_compiled_s, hf_s
    if "hf" in got:
        assert all(len(r) == new_tokens for r in got["hf"]), "transformers stopped early"
        total = batch * new_tokens
        for name in ("ours", "ours-compiled"):
            if name in got:  # the share of tokens equal to transformers' (bf16 roundings may part the two)
                res[f"same_{name.replace('-', '_')}"] = sum(
                    a == b for x, y in zip(got[name], got["hf"]) for a, b in zip(x, y)) / total
        del hf
    res["new_tokens"] = batch * new_tokens
    res["processed_tokens"] = batch * (prompt_len + new_tokens)
    res["weights"] = weights
    return res


# ---- report --------------------------------------------------------------------------------------------------
def _flops_str(name: str, v: float) -> str:
    return f"{name} {v / 1e12:,.1f} TFLOP/s" if v >= 1e12 else f"{name} {v / 1e9:,.1f} GFLOP/s"


def fmt(x, nd=0):
    return "-" if x is None else f"{x:,.{nd}f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="15m (CPU default), 100m (GPU), tiny")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, or auto")
    p.add_argument("--experts", default=None, help="comma list (default: the preset's)")
    p.add_argument("--settings", default=None, help="comma list of DPO settings at every expert count "
                   f"(choices: {', '.join(SETTINGS)})")
    p.add_argument("--extra-settings", default=None,
                   help="more settings, run only at --extra-at experts (default: the preref/no-gc variants)")
    p.add_argument("--extra-at", type=int, default=8)
    p.add_argument("--steps", type=int, default=None, help="measured steps per setting (after warm-up)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--gen-batches", default="1,8")
    p.add_argument("--gen-tokens", type=int, default=None)
    p.add_argument("--gen-weights", default=None,
                   help="comma list of weight dtypes for generation, fp32 and/or bf16 (default: fp32,bf16 on CPU, "
                        "bf16 on GPU; fp32 in --quick)")
    p.add_argument("--gen-repeat", type=int, default=None,
                   help="timed generate calls per variant, in turns (default: 15 on CPU, where the shared machine's "
                        "load moves single calls by up to ~30%%, 5 on CUDA)")
    p.add_argument("--gen-compile", default=None, choices=["on", "off"],
                   help="also time our compiled decoding (default: on, off in --quick: compiling takes ~30 s)")
    p.add_argument("--skip", default="", help="comma list of parts to skip: dpo, fwdbwd, gen, peak")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every setting this many times, interleaved (A B C A B C ...), pooling the steady "
                        "steps of all rounds: on a shared machine the load then hits every setting alike")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--quick", action="store_true",
                   help="smoke mode: tiny model, 1 warm-up + 2 steps, 1 thread unless --threads; < 60 s")
    p.add_argument("--timeout", type=float, default=None, help="seconds per DPO subprocess")
    p.add_argument("--no-write", action="store_true", help="do not write BENCHMARKS.md")
    p.add_argument("--section", default="dpo_speed", help="BENCHMARKS.md section name")
    p.add_argument("--json", default=None, help="also write all results as JSON here")
    p.add_argument("--md", default=None, help="also write the markdown report here")
    p.add_argument("--from-json", default=None, help="render (and write) the report of a saved --json run")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
        res["models"] = {int(k): v for k, v in res["models"].items()}
        report = render(res)
        print(report)
        if args.md:
            Path(args.md).write_text(report + "\n")
        if not args.no_write:
            from _report import write_section
            write_section(args.section, report)
            print(f"wrote section {args.section!r} of BENCHMARKS.md", flush=True)
        return

    if args.worker:
        import warnings
        warnings.filterwarnings("ignore")
        out = worker(json.loads(args.worker))
        print("RESULT " + json.dumps(out), flush=True)
        return

    t_start = time.perf_counter()
    import torch
    if args.quick and args.threads is None:
        args.threads = 1  # smoke mode: one thread keeps it fast and steady on a loaded machine
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    preset = args.preset or ("tiny" if args.quick else "100m" if cuda else "15m")
    P = PRESETS[preset]
    can = check_env(args.device)
    tf_side = "trl" if can["trl"] else "hf" if can["hf"] else None
    experts = [int(e) for e in args.experts.split(",")] if args.experts else P["experts"]
    steps = args.steps or (2 if args.quick else 10 if cuda else 6)
    warmup = args.warmup or (1 if args.quick else 3 if cuda else 2)
    skip = set(filter(None, args.skip.split(",")))
    if args.settings:
        settings = args.settings.split(",")
    elif args.quick:
        settings = ["ours-fp32", "trl-fp32" if tf_side == "trl" else "hf-fp32"]
    elif cuda:
        settings = ["ours-bf16", "trl-bf16" if tf_side == "trl" else "hf-bf16"]
    else:
        settings = ["ours-fp32", "ours-bf16", "trl-fp32", "trl-default"]
    if args.extra_settings is not None:
        extra = [x for x in args.extra_settings.split(",") if x]
    elif args.quick or cuda:
        extra = []
    else:
        extra = ["ours-fp32-unshared", "ours-fp32-preref", "ours-bf16-preref", "ours-bf16-preref-compile", "trl-bf16",
                 "trl-bf16-preref", "trl-default-preref"]
    for name in settings + extra:
        if name not in SETTINGS:
            p.error(f"unknown setting {name!r} (choices: {', '.join(SETTINGS)})")
    # drop the sides that cannot run here, saying so
    def runnable(name):
        side = SETTINGS[name]["side"]
        return side == "ours" or (side == "trl" and can["trl"]) or (side == "hf" and can["hf"])
    def substitute(names):  # TRL missing but transformers present: the hand-written DPO step stands in
        out = []
        for n in names:
            if not runnable(n) and SETTINGS[n]["side"] == "trl" and can["hf"]:
                n = f"hf-{SETTINGS[n]['precision']}"
            if runnable(n) and n not in out:
                out.append(n)
        return out
    dropped = [n for n in settings + extra if not runnable(n)]
    if dropped:
        print(f"not runnable here (packages missing): {', '.join(dropped)}"
              + ("; transformers + hand-written DPO step instead" if can["hf"] else ""), flush=True)
    settings, extra = substitute(settings), substitute(extra)
    timeout = args.timeout or (120 if args.quick else 420 if cuda else 1200)
    gen_tokens = args.gen_tokens or (8 if args.quick else 64)
    gen_batches = [int(b) for b in args.gen_batches.split(",") if b]
    gen_weights = (args.gen_weights or ("fp32" if args.quick else "bf16" if cuda else "fp32,bf16")).split(",")
    if any(w not in ("fp32", "bf16") for w in gen_weights):
        p.error(f"--gen-weights takes fp32 and/or bf16, not {args.gen_weights!r}")
    if args.gen_repeat is not None and args.gen_repeat < 1:
        p.error(f"--gen-repeat takes a count of 1 or more, not {args.gen_repeat}")
    threads = torch.get_num_threads()
    machine = (torch.cuda.get_device_name(0) if cuda else
               f"CPU {os.cpu_count()} cores, {threads} torch threads") + f", torch {torch.__version__}"
    versions = package_status()
    print(f"preset {preset}, experts {experts}, {P['pairs']} pairs x {P['seq']} tokens, warm-up {warmup} + "
          f"{steps} steps, device {args.device}; {machine}", flush=True)

    try:
        import transformers
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    skip_opts = {"--json", "--md"}
    argv, cmd = sys.argv[1:], []
    while argv:
        a = argv.pop(0)
        if a in skip_opts:
            argv.pop(0) if argv else None
        elif a != "--no-write" and not any(a.startswith(o + "=") for o in skip_opts):
            cmd.append(a)
    results: dict = dict(cmd="python benchmarks/dpo_speed.py" + "".join(" " + (c if c else '""') for c in cmd),
                         load_start=os.getloadavg()[0], threads=torch.get_num_threads(), rounds=args.rounds,
                         preset=preset, device=args.device, machine=machine, versions=versions, pairs=P["pairs"],
                         seq=P["seq"], steps=steps, warmup=warmup, models={}, dpo=[], fwdbwd=[], gen=[], peak={})
    results["gen_repeat"] = (1 if args.quick else 5 if cuda else 15) if args.gen_repeat is None else args.gen_repeat
    workdir = Path(tempfile.mkdtemp(prefix="dpo_speed_"))
    atexit.register(shutil.rmtree, workdir, True)  # ~120 MB of checkpoints a run

    # matmul peak first (the same run, the same machine state as the rest)
    if "peak" not in skip:
        sizes = [512, 1024] if args.quick else [4096, 8192] if cuda else [1024, 2048]
        results["peak"] = matmul_peak(args.device, ["bf16"] if cuda else ["fp32", "bf16"], sizes)
        print("matmul peak: " + ", ".join(_flops_str(k, v) for k, v in results["peak"].items()),
              flush=True)

    ckpts = {}
    for E in experts:
        ckpt, hf_dir, info = build_checkpoints(preset, E, workdir)
        ckpts[E] = (ckpt, hf_dir)
        results["models"][E] = info
        print(f"E={E}: {info['total_params'] / 1e6:.2f}M params, {info['active_params'] / 1e6:.2f}M active "
              f"({info['flop_params'] / 1e6:.2f}M without the embedding)", flush=True)

    if "dpo" not in skip:
        for E in experts:
            names = settings + ([n for n in extra if n not in settings] if E == args.extra_at else [])
            runs: dict[str, list] = {n: [] for n in names}
            for rnd in range(args.rounds):
                for name in names:
                    spec = dict(setting=name, experts=E, ckpt=str(ckpts[E][0]), hf_dir=str(ckpts[E][1]),
                                workdir=str(workdir / f"w-{E}-{name}-{rnd}"), device=args.device, pairs=P["pairs"],
                                seq=P["seq"], steps=steps, warmup=warmup, seed=rnd, threads=args.threads)
                    r = run_worker(spec, timeout)
                    runs[name].append(r)
                    if "error" in r:
                        print(f"E={E:2d} {name:20s} FAILED: {r['error']}", flush=True)
                    else:
                        mem = f"cuda peak {r['cuda_peak_mb']:,.0f} MiB" if cuda else \
                            f"peak RSS {r['rss_peak_mb']:,.0f} MiB (train {r['rss_train_mb']:,.0f})"
                        print(f"E={E:2d} {name:20s} {r['tokens_per_s']:9,.0f} tok/s  step {r['step_s']:.3f} s "
                              f"({r['quiet_steps']}/{r['steady_steps']} quiet)  {mem}  steps {r['step_times']}  "
                              f"other procs (cores) {r['others']}", flush=True)
                        if "losses" in r:  # llama4dpo settings train the same weights on the same data
                            print(f"      losses {r['losses']}", flush=True)
            for name in names:
                results["dpo"].append(pool_rounds(runs[name], warmup))

    if "gen" not in skip:
        try:
            E = args.extra_at if args.extra_at in experts else experts[0]
            prec = "bf16" if cuda else "fp32"
            for weights in gen_weights:
                for B in gen_batches:
                    r = generation(*ckpts[E], args.device, prec, B, 64 if not args.quick else 8, gen_tokens,
                                   PRESETS[preset]["model"]["vocab_size"], results["gen_repeat"],
                                   can["hf"], weights, (args.gen_compile or ("off" if args.quick else "on")) == "on")
                    r.update(experts=E, batch=B, precision="bf16 weights" if weights == "bf16" else prec)
                    results["gen"].append(r)
                    rate = {k: fmt(r.get(f"{k}_s") and r["new_tokens"] / r[f"{k}_s"], 1)
                            for k in ("ours", "ours_compiled", "hf")}
                    print(f"generate E={E} batch {B} {r['precision']}: ours {rate['ours']} tok/s, compiled "
                          f"{rate['ours_compiled']} (first call {fmt(r.get('ours_compiled_first'), 1)} s), "
                          f"transformers {rate['hf']} tok/s; same tokens {fmt(r.get('same_ours'), 2)} / "
                          f"{fmt(r.get('same_ours_compiled'), 2)}"
                          + "".join(f"; {k}: {v}" for k, v in r.items() if k.endswith("_error")), flush=True)
        except Exception as e:  # in-process: report it and keep what the other parts measured
            results.setdefault("errors", []).append(f"generation: {type(e).__name__}: {e}"[:500])
            print(f"generation FAILED: {type(e).__name__}: {e}"[:500], flush=True)

    if "fwdbwd" not in skip:
        try:
            rows = 2 * P["pairs"]
            first_ours = next((SETTINGS[n]["precision"] for n in settings if SETTINGS[n]["side"] == "ours"), "fp32")
            for prec in (["bf16"] if cuda else [first_ours] if args.quick else ["fp32", "bf16"]):
                for E in ([experts[0]] if args.quick else experts):
                    r = fwd_bwd(*ckpts[E], args.device, prec, rows, P["seq"], PRESETS[preset]["model"]["vocab_size"],
                                1 if args.quick else 2, 2 if args.quick else 5, can["hf"])
                    r.update(experts=E, precision=prec)
                    results["fwdbwd"].append(r)
                    print(f"fwd+bwd E={E} {prec}: ours {r['ours_s'] * 1e3:.1f} ms, transformers "
                          f"{fmt(r.get('hf_s', None) and r['hf_s'] * 1e3, 1)} ms, max |logit diff| "
                          f"{r.get('max_logit_diff', '-')}", flush=True)
        except Exception as e:  # in-process: report it and keep what the other parts measured
            results.setdefault("errors", []).append(f"fwd+bwd: {type(e).__name__}: {e}"[:500])
            print(f"fwd+bwd FAILED: {type(e).__name__}: {e}"[:500], flush=True)

    results["gen_prompt"] = 64 if not args.quick else 8
    results["load_end"] = os.getloadavg()[0]
    results["wall_s"] = time.perf_counter() - t_start
    report = render(results)
    print("\n" + report, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str) + "\n")
    if args.md:
        Path(args.md).write_text(report + "\n")
    if not args.no_write and not args.quick:
        from _report import write_section
        write_section(args.section, report)
        print(f"wrote section {args.section!r} of BENCHMARKS.md", flush=True)
    failed = [r for r in results["dpo"] if "error" in r]
    if failed and not any("error" not in r and SETTINGS[r["setting"]]["side"] == "ours" for r in results["dpo"]):
        sys.exit(1)


def render(res: dict) -> str:
    cuda = res["device"].startswith("cuda")
    peak = res["peak"]
    tf_side = "trl" if any(SETTINGS[r["setting"]]["side"] == "trl" for r in res["dpo"]) else "hf"
    cmd = res.get("cmd") or "python benchmarks/dpo_speed.py --threads 1 --rounds 2"
    lines = [f"## DPO training, forward+backward, generation: llama4dpo vs transformers/TRL ({res['preset']})", "",
             f"`{cmd}` - {res['machine']}; "
             + ", ".join(f"{k} {v}" for k, v in res["versions"].items() if k in ("transformers", "trl") and v)
             + f". {res['pairs']} pairs x {res['seq']} tokens per sequence (prompt {res['seq'] // 2} incl. bos + "
             f"response {res['seq'] - res['seq'] // 2} incl. eos, no padding), warm-up {res['warmup']} + median of "
             f"{res['steps']} steps" + (f" x {res['rounds']} rounds (settings interleaved, steady steps pooled)"
                                        if res["rounds"] > 1 else "")
             + f", each setting in its own process. Whole run: {res['wall_s']:.0f} s.", ""]
    for E, info in res["models"].items():
        lines.append(f"- E={E}: {info['total_params'] / 1e6:.2f}M parameters, {info['active_params'] / 1e6:.2f}M "
                     f"active per token ({info['flop_params'] / 1e6:.2f}M counted for FLOPs), expert width "
                     f"{info['expert_width']}, dense width {info['dense_width']}, MoE layers {info['moe_layers']}")
    if peak:
        lines += ["", "Measured matmul peak (same run): " + ", ".join(
            _flops_str(k, v) for k, v in peak.items()) + "."]

    def mfu(flops, precision):
        pk = peak.get(precision) or peak.get("bf16")
        if not pk:
            return "-"
        x = 100 * flops / pk
        return f"{x:.1f}%" if x >= 1 else f"{x:.2f}%" if x >= 0.01 else f"{x:.1e}%"

    ok = [r for r in res["dpo"] if "error" not in r]
    if res["dpo"]:
        # the baseline column: the transformers side's fp32 setting, else its first setting in the run
        present = [r["setting"] for r in ok if SETTINGS[r["setting"]]["side"] != "ours"]
        base_name = next((n for n in (f"{tf_side}-fp32", f"{tf_side}-bf16") if n in present),
                         present[0] if present else f"{tf_side}-fp32")
        lines += ["", "### DPO training step", "",
                  "| experts | setting | tokens/s | step (s) | vs " + base_name + " | "
                  + ("CUDA peak (MiB)" if cuda else "peak RSS (MiB) | train RSS (MiB)") + " | model TFLOP/s | MFU |"
                  + (" quiet steps |" if not cuda else "")
                  + (" tokens/s per round |" if res["rounds"] > 1 else ""),
                  "|---:|---|---:|---:|---:|---:|" + ("" if cuda else "---:|") + "---:|---:|"
                  + ("---:|" if not cuda else "") + ("---|" if res["rounds"] > 1 else "")]
        for r in res["dpo"]:
            E = r["experts"]
            if "error" in r:
                lines.append(f"| {E} | {describe(r['setting'])} | failed: {r['error'][:200]} |")
                continue
            s = SETTINGS[r["setting"]]
            n = res["models"][E]["flop_params"]
            flops = (6 + (0 if s["preref"] else 2)) * n * r.get("computed_tokens", r["tokens_per_step"]) / r["step_s"]
            base = next((b for b in ok if b["experts"] == E and b["setting"] == base_name), None)
            vs = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
            mem = f"{r['cuda_peak_mb']:,.0f}" if cuda else f"{r['rss_peak_mb']:,.0f} | {r['rss_train_mb']:,.0f}"
            rounds = (" " + ", ".join(f"{x:,.0f}" for x in r.get("round_tokens_per_s", [])) + " |"
                      if res["rounds"] > 1 else "")
            quiet = (f" {r['quiet_steps']}/{r['steady_steps']} |" if "quiet_steps" in r else " - |") if not cuda else ""
            lines.append(f"| {E} | {describe(r['setting'])} | {r['tokens_per_s']:,.0f} | {r['step_s']:.3f} | {vs} | "
                         f"{mem} | {flops / 1e12:.3f} | {mfu(flops, s['precision'])} |{quiet}{rounds}")
        lines += ["", "**Ratios** (llama4dpo / " + ("TRL" if tf_side == "trl" else "transformers") + ", same run):", ""]
        mem_key = "cuda_peak_mb" if cuda else "rss_peak_mb"
        for E in res["models"]:
            rows = {r["setting"]: r for r in ok if r["experts"] == E}
            ours = {k: v for k, v in rows.items() if SETTINGS[k]["side"] == "ours"}
            theirs = {k: v for k, v in rows.items() if SETTINGS[k]["side"] != "ours"}
            if not ours or not theirs:
                continue
            parts = []
            for prec in ("fp32", "bf16"):
                o = rows.get(f"ours-{prec}")
                t = rows.get(f"{tf_side}-{prec}")
                if o and t:
                    mem = f"; peak memory {o[mem_key] / t[mem_key]:.2f}x"
                    if not cuda:
                        mem += f" (train RSS {o['rss_train_mb'] / max(t['rss_train_mb'], 1e-9):.2f}x)"
                    parts.append(f"both {prec}: **{o['tokens_per_s'] / t['tokens_per_s']:.2f}x** tokens/s{mem}")
                h = rows.get(f"hf-{prec}")
                if o and h and tf_side == "trl":  # the hand-written DPO step on transformers' model, too
                    parts.append(f"both {prec}, vs transformers + hand-written DPO: "
                                 f"**{o['tokens_per_s'] / h['tokens_per_s']:.2f}x**")
            bo = max(ours.values(), key=lambda r: r["tokens_per_s"])
            bt = max(theirs.values(), key=lambda r: r["tokens_per_s"])
            mem = f"; peak memory {bo[mem_key] / bt[mem_key]:.2f}x"
            if not cuda:
                mem += f" (train RSS {bo['rss_train_mb'] / max(bt['rss_train_mb'], 1e-9):.2f}x)"
            parts.append(f"each at its fastest measured here ({describe(bo['setting'])} vs {describe(bt['setting'])}): "
                         f"**{bo['tokens_per_s'] / bt['tokens_per_s']:.2f}x**{mem}")
            lo = min(ours.values(), key=lambda r: r[mem_key])
            if lo is not bo:
                parts.append(f"least memory of ours ({describe(lo['setting'])}) vs TRL's fastest: "
                             f"**{lo['tokens_per_s'] / bt['tokens_per_s']:.2f}x** tokens/s; "
                             f"peak memory {lo[mem_key] / bt[mem_key]:.2f}x")
            if "trl-default" in rows:
                parts.append(f"fastest ours vs TRL's defaults (bf16 + grad ckpt): "
                             f"**{bo['tokens_per_s'] / rows['trl-default']['tokens_per_s']:.2f}x**")
            lines.append(f"- E={E}: " + "; ".join(parts))
            for prec in ("fp32", "bf16"):  # one precision's llama4dpo settings train the same weights, same data
                same = [r for r in ours.values() if r.get("losses") and _prec(r) == prec]
                if len(same) < 2:
                    continue
                # against the first compiled one where there is one: CUDA graphs should replay its very kernels
                base = next((r for r in same if SETTINGS[r["setting"]].get("compile")), same[0])
                diffs = ", ".join(f"{r['setting']} {max(abs(a - b) for a, b in zip(r['losses'], base['losses'])):.1e}"
                                  for r in same if r is not base)
                first = ", ".join(f"{r['setting']} {r['losses'][0]:.6f}" for r in same)
                lines.append(f"  - same training, step by step (step i trains on the same batch in every setting; "
                             f"compiled ones count their untimed first steps): loss (summed over the step's "
                             f"pairs) at the first step {first}; max |loss - {base['setting']}'s loss| over the "
                             f"steps both ran: {diffs}")
    if res["fwdbwd"]:
        lines += ["", "### Model forward + backward alone (cross-entropy, no optimizer)", "",
                  "| experts | precision | tokens | llama4dpo (ms) | transformers (ms) | speed-up | llama4dpo MFU | "
                  "max abs logit diff (fp32) |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in res["fwdbwd"]:
            n = res["models"][r["experts"]]["flop_params"]
            sp = f"{r['hf_s'] / r['ours_s']:.2f}x" if "hf_s" in r else "-"
            d = f"{r['max_logit_diff']:.1e}" if "max_logit_diff" in r else "-"
            lines.append(f"| {r['experts']} | {r['precision']} | {r['tokens']:,} | {r['ours_s'] * 1e3:,.1f} | "
                         f"{fmt(r.get('hf_s') and r['hf_s'] * 1e3, 1)} | {sp} | "
                         f"{mfu(6 * n * r['tokens'] / r['ours_s'], r['precision'])} | {d} |")
    if res["gen"]:
        lines += ["", f"### Generation (greedy, KV cache, prompt {res['gen_prompt']} tokens, every row generates the "
                  f"same count; median of {res.get('gen_repeat', 5)} call(s) per variant, timed in turns)", "",
                  "| experts | batch | precision | new tokens | llama4dpo tokens/s | llama4dpo compiled tokens/s | "
                  "transformers generate tokens/s | speed-up | speed-up compiled | llama4dpo MFU (compiled) | "
                  "same tokens (eager / compiled) |", "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in res["gen"]:
            n = res["models"][r["experts"]]["flop_params"]
            rate = {k: r.get(f"{k}_s") and r["new_tokens"] / r[f"{k}_s"] for k in ("ours", "ours_compiled", "hf")}
            hf = rate["hf"]
            sp = {k: f"{rate[k] / hf:.2f}x" if hf and rate[k] else "-" for k in ("ours", "ours_compiled")}
            best = r.get("ours_compiled_s") or r["ours_s"]
            same = " / ".join(fmt(r.get(k), 2) for k in ("same_ours", "same_ours_compiled"))
            lines.append(f"| {r['experts']} | {r['batch']} | {r['precision']} | {r['new_tokens']} | "
                         f"{fmt(rate['ours'], 1)} | {fmt(rate['ours_compiled'], 1)} | {fmt(hf, 1)} | {sp['ours']} | "
                         f"{sp['ours_compiled']} | "
                         f"{mfu(2 * n * r['processed_tokens'] / best, 'bf16' if 'bf16' in r['precision'] else 'fp32')}"
                         " | "
                         f"{same} |")
        fastest = {}
        for r in res["gen"]:
            for side, keys in (("ours", ("ours", "ours_compiled")), ("hf", ("hf",))):
                for k in keys:
                    if r.get(f"{k}_s"):
                        label = r["precision"] + (", compiled" if k == "ours_compiled" else "")
                        v = (r["new_tokens"] / r[f"{k}_s"], label)
                        fastest[(r["batch"], side)] = max(fastest.get((r["batch"], side), v), v)
        for B in sorted({r["batch"] for r in res["gen"]}):
            if (B, "ours") in fastest and (B, "hf") in fastest:
                (o, od), (t, td) = fastest[(B, "ours")], fastest[(B, "hf")]
                lines.append(f"- batch {B}, each at its fastest: llama4dpo {o:,.1f} tok/s ({od}) vs transformers "
                             f"{t:,.1f} ({td}): **{o / t:.2f}x**")
        errors = sorted({f"{k}: {v}" for r in res["gen"] for k, v in r.items() if k.endswith("_error")})
        if errors:
            lines.append("- not measured: " + "; ".join(errors))
        lines += ["", "Compiled: `generate_ids(..., compile=True)` (`llama4dpo generate --compile`) runs each decoding "
                  "step through `torch.compile(model.decode)` (on CPU with inductor's C++ wrapper, on CUDA as CUDA "
                  "graphs: mode reduce-overhead, a static cache reused per shape); its first call "
                  "compiles, and is a warm-up here. bf16 weights: both models held in bf16 (no autocast); their "
                  "greedy tokens can part from transformers' where bf16 roundings differ."]
    lines += ["", "Definitions: tokens/s = non-pad tokens of the prompt+chosen and prompt+rejected rows per optimizer "
              "step / median step time" + ("" if cuda else
              " (median over the quiet steady steps - other processes used < 0.25 cores during the step, read from "
              "/proc/stat - when there are at least 3, else over all steady steps)")
              + " (a step: collation, reference forward unless precomputed, policy forward+backward, clipping, "
              "AdamW). Precomputed reference log-probs cost one extra forward pass over the data before training, "
              "not counted in the step (ours: by the policy before its first step, as `llama4dpo dpo` does when "
              "the reference is the initial checkpoint; TRL: by its ref_model, which it keeps). Memory: " +
              ("torch.cuda.max_memory_allocated per process." if cuda else
               "peak RSS (getrusage) of the setting's own process; train RSS = peak minus the RSS after imports.") +
              " Model FLOPs: (6 + 2 for the reference forward) x N x tokens run through the model, N = active "
              "parameters without the input embedding; the same useful FLOPs per token are credited to both sides "
              "(not the dense all-experts work transformers does). With prefix sharing (our default, "
              "dpo.share_prompt) a pair is one row [prompt | chosen | rejected], so fewer tokens run through the "
              "model (P + C + R instead of 2P + C + R) and fewer FLOPs are credited; tokens/s counts 2P + C + R "
              "on every side. MFU = model FLOP/s / the matmul "
              "peak of that precision measured above."]
    if not cuda:
        lines += ["", f"The machine is shared ({os.cpu_count()} cores; 1-minute load average {res['load_start']:.1f} "
                  f"at the start, {res['load_end']:.1f} at the end of this run): absolute numbers drift between runs, "
                  "the ratios are measured side by side in one run. With {0} torch threads.".format(res["threads"])
                  + (" One thread per process is the robust choice on a loaded machine: with 2 threads every "
                     "parallel op waits for a descheduled worker thread (per-op times of ~5 ms regardless of size "
                     "were measured under load), which punishes whichever side runs more ops."
                     if res["threads"] == 1 else "")]
    if res.get("errors"):
        lines += ["", "Parts that failed in this run: " + "; ".join(f"`{e}`" for e in res["errors"])]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
