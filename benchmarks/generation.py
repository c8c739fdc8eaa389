"""Generation: llama4dpo's `generate_ids` (eager, and compiled as `llama4dpo generate --compile` runs it) vs
transformers' `generate`, greedy with a KV cache, on the same weights.

Every row generates the same count (no eos stop on either side); the variants are timed in turns (A B C A B C
...), medians of --repeat calls each; the first call of each is a warm-up (for the compiled one: compilation).
The share of tokens equal to transformers' is reported (bf16 roundings may part the two).

    python benchmarks/generation.py             # CPU: the 15m preset at 8 experts, batch 1 and 8, fp32 and bf16 weights
    python benchmarks/generation.py --quick     # smoke mode: tiny preset, 8 new tokens, no compilation
    python benchmarks/generation.py --device cuda --batches 1    # one GPU: the 100m preset (gpu.sh runs it)
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import harness
import workload

HEADING = "## Generation: llama4dpo vs transformers (`benchmarks/generation.py`)"


def generation(ckpt, hf_dir, device, precision, batch, prompt_len, new_tokens, vocab, repeat, has_hf,
               weights="fp32", compiled=True) -> dict:
    """weights="bf16": both models held in bf16 (no autocast); "fp32": fp32 weights under `precision`."""
    import torch
    from llama4dpo import load_model
    from llama4dpo.generate import Sampling, generate_ids
    from llama4dpo.runtime import Decoder

    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    held = torch.bfloat16 if weights == "bf16" else torch.float32
    if weights == "bf16":
        precision = "fp32"  # no autocast: the weights themselves are bf16
    ours = load_model(ckpt, device).eval().to(held)
    s = Sampling(max_new_tokens=new_tokens, temperature=0.0)
    got, runs, res = {}, {}, {}
    decoder = Decoder(ours)  # one compiled step for every call, as a caller generating repeatedly keeps it

    def ours_run(compile):
        def run():
            with harness.autocast(precision, device):
                got["ours-compiled" if compile else "ours"] = generate_ids(
                    ours, prompts, s, eos_id=-1, pad_id=workload.PAD, compile=compile, decoder=decoder)
        return run
    runs["ours"] = ours_run(False)
    if compiled:
        runs["ours-compiled"] = ours_run(True)
    if has_hf:
        hf = workload.load_hf(hf_dir, device).eval().to(held)
        hf.generation_config.eos_token_id = None  # generate exactly new_tokens, like ours with eos_id=-1
        ids = torch.tensor(prompts, device=device)
        mask = torch.ones_like(ids)

        def run_hf():
            with torch.no_grad(), harness.autocast(precision, device):
                out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=workload.PAD, use_cache=True)
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
            harness.sync(device)
            t = time.perf_counter()
            fn()
            harness.sync(device)
            times[name].append(time.perf_counter() - t)
    for name, ts in times.items():
        res[f"{name.replace('-', '_')}_s"] = statistics.median(ts)  # ours_s, ours_compiled_s, hf_s
    if "hf" in got:
        assert all(len(r) == new_tokens for r in got["hf"]), "transformers stopped early"
        for name in ("ours", "ours-compiled"):
            if name in got:
                res[f"same_{name.replace('-', '_')}"] = sum(
                    a == b for x, y in zip(got[name], got["hf"]) for a, b in zip(x, y)) / (batch * new_tokens)
        del hf
    res.update(new_tokens=batch * new_tokens, processed_tokens=batch * (prompt_len + new_tokens), weights=weights)
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_common_args(p, workload.PRESETS)
    p.add_argument("--batches", "--gen-batches", default="1,8", help="comma list of batch sizes")
    p.add_argument("--tokens", "--gen-tokens", type=int, default=None, help="new tokens per row (64; 8 in --quick)")
    p.add_argument("--weights", "--gen-weights", default=None,
                   help="comma list of weight dtypes, fp32 and/or bf16 (default: fp32,bf16 on CPU, bf16 on GPU; "
                        "fp32 in --quick)")
    p.add_argument("--repeat", "--gen-repeat", type=int, default=None,
                   help="timed calls per variant, in turns (default: 15 on CPU, where the shared machine's load "
                        "moves single calls by up to ~30%%, 5 on CUDA, 1 in --quick)")
    p.add_argument("--compile", "--gen-compile", default=None, choices=["on", "off"],
                   help="also time our compiled decoding (default: on, off in --quick: compiling takes ~30 s)")
    args = p.parse_args()
    weights = (args.weights or ("fp32" if args.quick else "bf16" if args.device.startswith("cuda")
                                else "fp32,bf16")).split(",")
    if any(w not in ("fp32", "bf16") for w in weights):
        p.error(f"--weights (--gen-weights) takes fp32 and/or bf16, not {args.weights!r}")
    if args.repeat is not None and args.repeat < 1:
        p.error(f"--repeat (--gen-repeat) takes a count of 1 or more, not {args.repeat}")
    mach, work = harness.setup(args)
    import torch
    t0 = time.perf_counter()
    cuda = args.device.startswith("cuda")
    can = harness.check_env(args.device)
    P = workload.PRESETS[args.preset]
    E = int(args.experts.split(",")[0]) if args.experts else (8 if 8 in P["experts"] else P["experts"][0])
    res = dict(cmd=harness.command("generation.py"), date=str(datetime.date.today()), machine=mach,
               versions=can["versions"], preset=args.preset, device=args.device, threads=torch.get_num_threads(),
               load_start=os.getloadavg()[0], prompt=8 if args.quick else 64, models={}, gen=[], peak={},
               repeat=(1 if args.quick else 5 if cuda else 15) if args.repeat is None else args.repeat)
    if not args.skip_peak:
        res["peak"] = harness.measure_peak(args.device, args.quick)
    ckpt, hf_dir, res["models"][E] = workload.build_checkpoints(args.preset, E, work)
    prec = "bf16" if cuda else "fp32"
    for w in weights:
        for B in [int(b) for b in args.batches.split(",") if b]:
            r = generation(ckpt, hf_dir, args.device, prec, B, res["prompt"], args.tokens or (8 if args.quick else 64),
                           res["models"][E]["vocab"], res["repeat"], can["hf"], w,
                           (args.compile or ("off" if args.quick else "on")) == "on")
            r.update(experts=E, batch=B, precision="bf16 weights" if w == "bf16" else prec)
            res["gen"].append(r)
            rate = {k: harness.fmt(r.get(f"{k}_s") and r["new_tokens"] / r[f"{k}_s"], 1)
                    for k in ("ours", "ours_compiled", "hf")}
            print(f"generate E={E} batch {B} {r['precision']}: ours {rate['ours']} tok/s, compiled "
                  f"{rate['ours_compiled']} (first call {harness.fmt(r.get('ours_compiled_first'), 1)} s), "
                  f"transformers {rate['hf']} tok/s; same tokens {harness.fmt(r.get('same_ours'), 2)} / "
                  f"{harness.fmt(r.get('same_ours_compiled'), 2)}"
                  + "".join(f"; {k}: {v}" for k, v in r.items() if k.endswith("_error")), flush=True)
    res["load_end"], res["wall_s"] = os.getloadavg()[0], time.perf_counter() - t0
    harness.finish(args, res, render(res))


def rates(r: dict) -> dict:
    """tokens/s of each variant of a measured row (None where it was not measured)."""
    return {k: r.get(f"{k}_s") and r["new_tokens"] / r[f"{k}_s"] for k in ("ours", "ours_compiled", "hf")}


def cells(r: dict, n: int, peak: dict) -> list[str]:
    """A row's measured columns: tokens/s eager, compiled and transformers', the two speed-ups, the MFU of our
    faster variant (2 x n x (prompt + new tokens) / time), the shares of tokens equal to transformers'."""
    rate = rates(r)
    sp = [f"{rate[k] / rate['hf']:.2f}x" if rate["hf"] and rate[k] else "-" for k in ("ours", "ours_compiled")]
    best = r.get("ours_compiled_s") or r["ours_s"]
    return [harness.fmt(rate["ours"], 1), harness.fmt(rate["ours_compiled"], 1), harness.fmt(rate["hf"], 1), *sp,
            harness.mfu(2 * n * r["processed_tokens"] / best, peak, "bf16" if "bf16" in r["precision"] else "fp32"),
            " / ".join(harness.fmt(r.get(k), 2) for k in ("same_ours", "same_ours_compiled"))]


def comparison_lines(gen: list[dict], judge) -> list[str]:
    """Per batch size, each side at its fastest (over weights and compilation): '- batch B, ...: judge(B, ratio)';
    then what could not be measured."""
    fastest: dict = {}
    for r in gen:
        rate = rates(r)
        for side, keys in (("ours", ("ours", "ours_compiled")), ("hf", ("hf",))):
            for k in keys:
                if rate[k]:
                    v = (rate[k], r["precision"] + (", compiled" if k == "ours_compiled" else ""))
                    fastest[(r["batch"], side)] = max(fastest.get((r["batch"], side), v), v)
    lines = []
    for B in sorted({r["batch"] for r in gen}):
        if (B, "ours") in fastest and (B, "hf") in fastest:
            (o, od), (t, td) = fastest[(B, "ours")], fastest[(B, "hf")]
            lines.append(f"- batch {B}, each at its fastest: llama4dpo {o:,.1f} tokens/s ({od}) vs transformers "
                         f"{t:,.1f} ({td}): {judge(B, o / t)}")
    errors = sorted({f"{k}: {v}" for r in gen for k, v in r.items() if k.endswith("_error")})
    return lines + (["- not measured: " + "; ".join(errors)] if errors else [])


def render(res: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in res["versions"].items() if k == "transformers" and v)
    lines = [HEADING, "", f"`{res['cmd']}` - {res['date']}, {res['machine']}; {versions}. Preset {res['preset']}, "
             f"greedy, KV cache, prompt {res['prompt']} tokens, every row generates the same count; median of "
             f"{res['repeat']} call(s) per variant, timed in turns. Whole run: {res['wall_s']:.0f} s.", ""]
    lines += workload.describe_models(res["models"])
    rows = [[r["experts"], r["batch"], r["precision"], r["new_tokens"],
             *cells(r, res["models"][r["experts"]]["flop_params"], res["peak"])] for r in res["gen"]]
    lines += ["", harness.markdown_table(
        ["experts", "batch", "precision", "new tokens", "llama4dpo tokens/s", "llama4dpo compiled tokens/s",
         "transformers generate tokens/s", "speed-up", "speed-up compiled", "llama4dpo MFU (compiled)",
         "same tokens (eager / compiled)"], rows, "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")]
    lines += comparison_lines(res["gen"], lambda B, x: f"**{x:.2f}x**")
    lines += ["", "Compiled: `generate_ids(..., compile=True)` (`llama4dpo generate --compile`) runs each decoding "
              "step through `torch.compile(model.decode)` (on CPU with inductor's C++ wrapper, on CUDA as CUDA "
              "graphs: mode reduce-overhead, a static cache reused per shape); its first call compiles, and is a "
              "warm-up here. bf16 weights: both models held in bf16 (no autocast); their greedy tokens can part "
              "from transformers' where bf16 roundings differ. MFU: 2 x N x (prompt + new tokens) / time."]
    if not res["device"].startswith("cuda"):
        lines += ["", harness.shared_machine_note(res)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
