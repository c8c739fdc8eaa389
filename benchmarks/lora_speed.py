"""LoRA DPO: llama4dpo's LoRA DPO against its own full DPO and against TRL's DPOTrainer + PEFT LoRA (CPU).

Side by side in ONE run, per model shape, on the same weights and synthetic pairs, each setting in its own process
(benchmarks/dpo_sides.py's worker; workload.py's data):
  * the SmolLM2-135M shape, dense (hidden 576, 30 layers, 9 / 3 kv heads, MLP 1536, vocabulary 49152, tied
    embeddings), built with our `LlamaModel` and exported by `export_hf` as a `LlamaForCausalLM`: llama4dpo full DPO,
    llama4dpo LoRA, and TRL's DPOTrainer with a PEFT LoraConfig and no ref_model (its reference: the adapters off);
  * the 15m MoE preset at 8 experts: llama4dpo full DPO and LoRA (PEFT cannot adapt Llama 4's fused experts).
LoRA rank 8, alpha 16, no dropout, on attention q/k/v/o and the MLP gate/up/down (MoE: the shared and every routed
expert): on the dense shape the same 2.44M adapter weights on both sides.

    python benchmarks/lora_speed.py              # both shapes, ~8 min on 2 shared cores
    python benchmarks/lora_speed.py --quick      # smoke mode: tiny dense + tiny MoE, 1 warm-up + 2 steps

tokens/s and step times as in benchmarks/dpo_speed.py; memory per process, split into the RSS before the model,
the model state (computed) and the rest (the report's definitions). One torch thread unless --threads: on 2 shared
cores two threads stall whenever another process holds a core (steps 3-10x slower, seen here). Targets (issue
#24): LoRA / full DPO peak memory <= 0.5; ours / TRL + PEFT, each at its fastest: tokens/s >= 2, memory <= 0.8.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import sys
import time
from importlib import metadata

import harness
import workload
from dpo_sides import SETTINGS, pool_rounds, worker

HEADING = "## LoRA DPO: llama4dpo LoRA vs full DPO and TRL + PEFT (`benchmarks/lora_speed.py`)"
RANK, ALPHA = 8, 16
PEFT_LORA = dict(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def ours_lora(precision: str, base: str = "fp32", preref: bool = False) -> dict:
    return dict(side="ours", precision=precision, gc=False, preref=preref, lora=base, overrides=[
        f"lora.rank={RANK}", f"lora.alpha={ALPHA}", "lora.dropout=0.0", f"lora.base_dtype={base}",
        "lora.targets=attention,mlp,shared_expert,experts"])


def peft(precision: str, gc: bool = False, preref: bool = False) -> dict:
    return dict(side="trl", precision=precision, gc=gc, preref=preref, peft=PEFT_LORA)


SETTINGS.update({  # into dpo_sides' table, whose worker trains them (in this script's worker process)
    "lora-fp32": ours_lora("fp32"), "lora-bf16": ours_lora("bf16"), "lora-bf16-base": ours_lora("bf16", "bf16"),
    "lora-bf16-base-preref": ours_lora("bf16", "bf16", preref=True),
    "peft-fp32": peft("fp32"), "peft-bf16": peft("bf16"), "peft-default": peft("bf16", gc=True),
    "peft-bf16-preref": peft("bf16", preref=True)})
FULL = ["ours-fp32", "ours-bf16"]
DENSE_SETTINGS = FULL + ["lora-fp32", "lora-bf16", "lora-bf16-base", "lora-bf16-base-preref",
                         "peft-fp32", "peft-bf16", "peft-default", "peft-bf16-preref"]
MOE_SETTINGS = FULL + ["lora-fp32", "lora-bf16", "lora-bf16-base"]
QUICK_SETTINGS = ["ours-fp32", "lora-fp32", "peft-fp32"]

DENSE = dict(family="llama", moe_layers=[], attention_chunk_size=None, use_qk_norm=False,
             attn_temperature_tuning=False, tie_word_embeddings=True, rope_theta=100000.0)
SHAPES = {  # dense: ModelConfig fields (the checkpoint is built here); else a workload preset at `experts`
    "smollm2-135m": dict(dense=dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                    intermediate_size_mlp=1536, num_hidden_layers=30, num_attention_heads=9,
                                    num_key_value_heads=3, max_position_embeddings=8192), pairs=2, seq=128),
    "15m": dict(preset="15m", experts=8, pairs=8, seq=128),
    "tiny-dense": dict(dense=dict(vocab_size=256, hidden_size=64, intermediate_size=128, intermediate_size_mlp=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256), pairs=4, seq=32),
    "tiny": dict(preset="tiny", experts=4, pairs=4, seq=32),
}


def label(name: str) -> str:
    s = SETTINGS[name]
    side = ("TRL + PEFT LoRA" if s.get("peft") else "TRL") if s["side"] == "trl" else \
        "llama4dpo LoRA" if s.get("lora") else "llama4dpo full DPO"
    extra = ["fp32" if s["precision"] == "fp32" else "bf16 autocast"] + (["bf16 base"] if s.get("lora") == "bf16"
                                                                         else [])
    extra += (["grad ckpt: TRL's defaults"] if s["gc"] else []) + (["precomputed ref"] if s["preref"] else [])
    return f"{side} ({', '.join(extra)})"


def build_shape(name: str, work) -> tuple:
    """(our checkpoint, its transformers export with the same weights, model config, preset file or None)."""
    from llama4dpo import Config, LlamaModel, ModelConfig, save_model
    from llama4dpo.interop.hf import export_hf
    sh = SHAPES[name]
    if "preset" in sh:
        ckpt, hf_dir, _ = workload.build_checkpoints(sh["preset"], sh["experts"], work)
        cfg = workload.model_config(sh["preset"], sh["experts"])
        return ckpt, hf_dir, cfg, workload.PRESETS[sh["preset"]]["config"]
    cfg = ModelConfig(**DENSE, **sh["dense"], no_rope_layers=[1] * sh["dense"]["num_hidden_layers"],
                      pad_token_id=workload.PAD, bos_token_id=workload.BOS, eos_token_id=workload.EOS)
    ckpt, hf_dir = work / f"{name}-ours", work / f"{name}-hf"
    if not (hf_dir / "config.json").is_file():  # (a --workdir reused)
        model = LlamaModel(cfg).init_weights(seed=0)
        save_model(ckpt, model, Config(model=cfg), workload.our_tokenizer(cfg.vocab_size))
        export_hf(ckpt, hf_dir)
    return ckpt, hf_dir, cfg, None  # no preset file: `llama4dpo dpo` on the defaults + the benchmark's overrides


def shape_info(name: str, cfg) -> dict:
    import torch
    from llama4dpo import LlamaModel
    from llama4dpo.model.lora import add_lora
    with torch.device("meta"):  # shapes only: nothing allocated
        model = LlamaModel(cfg)
        params, embed = model.num_params()[0], model.embed_tokens.weight.numel()
        adapters = sum(p.numel() for p in add_lora(model, RANK, ALPHA).parameters() if p.requires_grad)
    sh = SHAPES[name]
    kind = "dense, exported as LlamaForCausalLM" if "dense" in sh else f"MoE, {sh['experts']} experts"
    return dict(params=params, embed=embed, adapters=adapters, line=(
        f"- {name} ({kind}): {params / 1e6:.1f}M parameters; LoRA rank {RANK}: {adapters:,} trainable "
        f"({100 * adapters / params:.2f}%); {sh['pairs']} pairs x {sh['seq']} tokens a step (prompt {sh['seq'] // 2} "
        f"incl. bos + response {sh['seq'] - sh['seq'] // 2} incl. eos, no padding)"))


def state_mb(name: str, info: dict) -> float:
    """Weights, gradients and AdamW moments (computed): full DPO 5 fp32 copies (policy, reference, gradient, 2
    moments); LoRA one copy of the frozen base (bf16 base: 2 bytes but for the embedding) + 4 of the adapters."""
    s, n, emb = SETTINGS[name], info["params"], info["embed"]
    if not (s.get("lora") or s.get("peft")):
        return 5 * 4 * n / 2**20
    return ((2 * (n - emb) + 4 * emb if s.get("lora") == "bf16" else 4 * n) + 16 * info["adapters"]) / 2**20


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=None, help=f"comma list of {', '.join(SHAPES)} (default: smollm2-135m,15m; "
                   "--quick: tiny-dense,tiny)")
    p.add_argument("--settings", default=None, help=f"comma list of {', '.join(DENSE_SETTINGS)} (TRL + PEFT: dense "
                   "shapes only)")
    p.add_argument("--steps", type=int, default=None, help="measured steps per setting, after warm-up (default 6)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--rounds", type=int, default=1, help="run every setting this many times, interleaved")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per setting's process")
    p.add_argument("--quick", action="store_true", help="smoke mode; writes nothing to BENCHMARKS.md")
    p.add_argument("--workdir", default=None, help="keep the checkpoints here instead of a temporary folder")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    p.add_argument("--json", default=None, help="also write all results as JSON here")
    p.add_argument("--md", default=None, help="also write the markdown report here")
    args = p.parse_args()
    args.device, args.preset = "cpu", "-"  # (what harness.setup and finish read; the shapes are this script's)
    shapes = (args.shapes or ("tiny-dense,tiny" if args.quick else "smollm2-135m,15m")).split(",")
    for x in shapes + (args.settings.split(",") if args.settings else []):
        if x not in SHAPES and x not in DENSE_SETTINGS:
            p.error(f"unknown shape or setting {x!r}")
    t_start = time.perf_counter()
    mach, work = harness.setup(args)
    can = harness.check_env("cpu")
    can["peft"] = can["trl"] and importlib.util.find_spec("peft") is not None
    if not can["peft"]:
        print("NOTE: TRL + PEFT not runnable here (pip install trl peft): llama4dpo only", flush=True)
    steps, warmup = args.steps or (2 if args.quick else 6), args.warmup or (1 if args.quick else 2)
    res: dict = dict(cmd=harness.command("lora_speed.py"), date=str(datetime.date.today()), machine=mach,
                     load_start=os.getloadavg()[0], threads=args.threads, rounds=args.rounds, steps=steps,
                     warmup=warmup, shapes={}, dpo=[],
                     versions={**can["versions"], "peft": can["peft"] and metadata.version("peft")})
    for shape in shapes:
        sh = SHAPES[shape]
        ckpt, hf_dir, cfg, config = build_shape(shape, work)
        info = res["shapes"][shape] = shape_info(shape, cfg)
        print(info["line"], flush=True)
        names = args.settings.split(",") if args.settings else QUICK_SETTINGS if args.quick else \
            DENSE_SETTINGS if "dense" in sh else MOE_SETTINGS
        names = [n for n in names if not SETTINGS[n].get("peft") or ("dense" in sh and can["peft"])]
        runs: dict[str, list] = {n: [] for n in names}
        for rnd in range(args.rounds):
            for name in names:
                spec = dict(setting=name, experts=sh.get("experts", 0), ckpt=str(ckpt), hf_dir=str(hf_dir),
                            workdir=str(work / f"w-{shape}-{name}-{rnd}"), device="cpu", config=config,
                            preset=sh.get("preset", shape), pairs=sh["pairs"], seq=sh["seq"], steps=steps,
                            warmup=warmup, seed=rnd, threads=args.threads)
                r = harness.run_worker(harness.HERE / "lora_speed.py", spec,
                                       args.timeout or (180 if args.quick else 600))
                runs[name].append(r)
                print(f"{shape:12s} {name:22s} " + (f"FAILED: {r['error']}" if "error" in r else
                      f"{r['tokens_per_s']:8,.0f} tok/s  step {r['step_s']:.3f} s  peak RSS {r['rss_peak_mb']:,.0f} "
                      f"MiB (before the model {r['rss_premodel_mb']:,.0f})  steps {r['step_times']}  others "
                      f"{r['others']}"), flush=True)
        for n in names:
            r = dict(pool_rounds(runs[n], warmup), shape=shape)
            if "error" not in r:
                r["state_mb"] = state_mb(n, info)
                r["rest_mb"] = r["rss_peak_mb"] - r["rss_premodel_mb"] - r["state_mb"]
            res["dpo"].append(r)
    res["load_end"], res["wall_s"] = os.getloadavg()[0], time.perf_counter() - t_start
    harness.finish(args, res, render(res))
    if not any("error" not in r for r in res["dpo"]):
        sys.exit(1)


def render(res: dict) -> str:
    versions = ", ".join(f"{k} {res['versions'][k]}" for k in ("transformers", "trl", "peft") if res["versions"].get(k))
    rounds = f" x {res['rounds']} rounds (interleaved, steady steps pooled)" if res["rounds"] > 1 else ""
    lines = [HEADING, "", f"`{res['cmd']}` - {res['date']}, {res['machine']}; {versions}. Warm-up {res['warmup']} + "
             f"median of {res['steps']} steps{rounds}, each setting in its own process. Whole run: {res['wall_s']:.0f} "
             "s.", "", *(i["line"] for i in res["shapes"].values()), "",
             "| shape | setting | tokens/s | step (s) | peak RSS (MiB) | train RSS | before the model | model state "
             "(computed) | rest | quiet steps |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["dpo"]:
        lines.append(f"| {r['shape']} | {label(r['setting'])} | " + (f"failed: {r['error'][:200]} |" if "error" in r
                     else " | ".join(f"{r[k]:,.0f}" if k != "step_s" else f"{r[k]:.3f}" for k in (
                         "tokens_per_s", "step_s", "rss_peak_mb", "rss_train_mb", "rss_premodel_mb", "state_mb",
                         "rest_mb")) + f" | {r['quiet_steps']}/{r['steady_steps']} |"))
    lines += ["", "**Ratios against issue #24's targets** (same run, same weights and data):", ""]
    for shape in res["shapes"]:
        lines += ratios(shape, [r for r in res["dpo"] if r["shape"] == shape and "error" not in r])
    lines += ["", "Definitions: tokens/s = non-pad tokens of the prompt+chosen and prompt+rejected rows per optimizer "
              "step / median step time (as in the DPO training step section; our rows hold each prompt once, "
              "dpo.share_prompt, TRL's twice). Memory in MiB, per process: peak RSS = VmHWM; train RSS = peak minus "
              "the RSS after importing torch; before the model = the RSS when the first model starts loading "
              "(interpreter, imports, data); model state = weights, gradients and AdamW moments computed from the "
              "parameter counts (full DPO: 5 fp32 copies - policy, reference, gradient, 2 moments; LoRA: one copy of "
              "the frozen base, 2 bytes a weight but the embedding's with a bf16 base, + 4 copies of the adapters); "
              "rest = peak - before the model - model state: activations, logits, load transients (full DPO's reads "
              "low: AdamW's moments take memory the backward has freed). llama4dpo LoRA: "
              f"`llama4dpo dpo ... lora.rank={RANK} lora.alpha={ALPHA} lora.dropout=0.0` (bf16 base: "
              "lora.base_dtype=bf16), its reference the policy with the adapters off (no second model). TRL + PEFT: "
              f"DPOTrainer(peft_config=LoraConfig(r={RANK}, lora_alpha={ALPHA}, lora_dropout=0, target_modules=q/k/v/"
              "o/gate/up/down_proj)), no ref_model. PEFT cannot adapt Llama 4's routed experts (transformers' "
              "Llama4TextExperts holds them as fused 3-D parameters, not nn.Linear): TRL + PEFT runs on the dense "
              "shape only.", "", harness.shared_machine_note(res)]
    return "\n".join(lines)


def ratios(shape: str, ok: list[dict]) -> list[str]:
    rows = {r["setting"]: r for r in ok}
    lora = [r for r in ok if SETTINGS[r["setting"]].get("lora")]
    theirs = [r for r in ok if SETTINGS[r["setting"]].get("peft")]
    verdict = lambda x, met: f"**{x:.2f}x** ({'met' if met else 'MISSED'})"  # noqa: E731
    fastest = lambda rs: max(rs, key=lambda r: r["tokens_per_s"])  # noqa: E731
    out = []
    for lo, fu in (("lora-fp32", "ours-fp32"), ("lora-bf16", "ours-bf16"), ("lora-bf16-base", "ours-bf16")):
        if lo in rows and fu in rows:
            a, b = rows[lo], rows[fu]
            x = a["rss_peak_mb"] / b["rss_peak_mb"]
            out.append(f"- {shape}: {label(lo)} / {label(fu)}: peak memory {verdict(x, x <= 0.5)} (target <= 0.5; "
                       f"train RSS {a['rss_train_mb'] / b['rss_train_mb']:.2f}x), tokens/s "
                       f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x" + ("" if x <= 0.5 else
                       f"; why: LoRA sheds {b['state_mb'] - a['state_mb']:,.0f} MiB of model state, but "
                       f"{(a['rss_premodel_mb'] + a['rest_mb']) / a['rss_peak_mb']:.0%} of its peak is what it does "
                       f"not shrink: {a['rss_premodel_mb']:,.0f} MiB before the model + {a['rest_mb']:,.0f} MiB "
                       "of activations, logits and transients"))
    if lora and theirs:
        bo, bt = fastest(lora), fastest(theirs)
        lo, lt = (min(rs, key=lambda r: r["rss_peak_mb"]) for rs in (lora, theirs))
        t, m = bo["tokens_per_s"] / bt["tokens_per_s"], bo["rss_peak_mb"] / bt["rss_peak_mb"]
        out.append(f"- {shape}: llama4dpo LoRA vs TRL + PEFT LoRA, each at its fastest ({label(bo['setting'])} vs "
                   f"{label(bt['setting'])}): tokens/s {verdict(t, t >= 2)} (target >= 2), peak memory "
                   f"{verdict(m, m <= 0.8)} (target <= 0.8); each at its least memory ({label(lo['setting'])} vs "
                   f"{label(lt['setting'])}): peak memory **{lo['rss_peak_mb'] / lt['rss_peak_mb']:.2f}x**, "
                   f"tokens/s {lo['tokens_per_s'] / lt['tokens_per_s']:.2f}x")
    return out


def run_worker(spec: dict) -> dict:
    """One setting, in this process (dpo_sides' worker); also records the RSS when the first model starts loading,
    through the loaders both sides call (llama4dpo's load_model, workload.load_hf)."""
    import torch  # noqa: F401 - first: train RSS counts from here, as in dpo_sides' worker
    base = harness.rss_bytes() / 2**20
    from llama4dpo.train import recipes
    workload.PRESETS.setdefault(spec["preset"], dict(config=spec["config"]))  # dense shapes: no preset file
    mark: dict = {}

    def first_load(fn):
        def load(*a, **k):
            mark.setdefault("rss_premodel_mb", harness.rss_bytes() / 2**20)
            return fn(*a, **k)
        return load
    recipes.load_model, workload.load_hf = first_load(recipes.load_model), first_load(workload.load_hf)
    out = worker(spec)
    # VmHWM: getrusage's peak (harness.peak_rss_bytes) also holds the PARENT's peak, which a process started by
    # vfork + exec inherits - and the parent built a 135M-parameter model
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    return dict(out, **mark, rss_peak_mb=peak, rss_base_mb=base, rss_train_mb=peak - base)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        harness.worker_main(run_worker, sys.argv[2])
    else:
        main()
