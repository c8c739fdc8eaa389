"""DPO training speed: llama4dpo's `llama4dpo dpo` vs TRL's DPOTrainer (and transformers + a hand-written step).

Measured side by side in ONE run, on the same model (built with our `LlamaModel`, saved, and exported with
`export_hf`, so transformers loads bit-identical weights), the same synthetic pairs, the same batch and lengths,
the same precision, after warm-up; step times are medians. Each setting runs in its own process
(benchmarks/dpo_sides.py: the settings and the three sides).

    python benchmarks/dpo_speed.py --rounds 2 --steps 8   # CPU: the 15m preset at 4, 8 and 16 experts (~12 min)
    python benchmarks/dpo_speed.py --quick                # smoke mode: tiny preset, 1 warm-up + 2 steps
    python benchmarks/dpo_speed.py --device cuda --preset 100m   # one GPU (what benchmarks/gpu.sh runs)

tokens/s = non-pad tokens of the prompt+chosen and prompt+rejected rows per optimizer step / median step time.
On a shared machine each step also records how many cores OTHER processes used meanwhile (/proc/stat); the
median is over the "quiet" steps (< 0.25 cores used by others) when there are at least 3, else over all steady
steps. `--rounds N` interleaves N runs of every setting; `--threads 1` is the robust choice on a loaded machine.
Memory: peak RSS (getrusage) of the setting's process, and that minus the RSS after importing torch ("train
RSS"); on CUDA torch.cuda.max_memory_allocated. Model FLOPs: (6 + 2 for a reference forward, where one runs) x N x tokens run,
N = active parameters without the input embedding, the same useful FLOPs credited to every side; MFU against
the matmul peak measured in the same run. Forward+backward and generation: fwd_bwd.py and generation.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import harness
import workload
from dpo_sides import SETTINGS, describe, ours_overrides, pool_rounds

HEADING = "## DPO training step: llama4dpo vs TRL and transformers (`benchmarks/dpo_speed.py`)"
CPU_DEFAULT = ["ours-fp32", "ours-bf16", "trl-fp32", "trl-default"]
CPU_EXTRA = ["ours-fp32-unshared", "ours-fp32-preref", "ours-bf16-preref", "ours-bf16-preref-compile", "ours-fp32-simpo",
             "ours-fp32-orpo", "ours-bf16-simpo", "trl-bf16", "trl-bf16-preref",
             "trl-default-preref"]  # run at --extra-at experts only


def reference_free(s: dict) -> bool:
    """A setting whose objective reads no reference (dpo.loss_type simpo, orpo): no reference forward runs."""
    from llama4dpo.losses import REFERENCE_FREE
    return any(o == f"dpo.loss_type={t}" for o in s.get("overrides", ()) for t in REFERENCE_FREE)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_common_args(p, workload.PRESETS)
    p.add_argument("--settings", default=None, help="comma list of DPO settings at every expert count "
                   f"(choices: {', '.join(SETTINGS)})")
    p.add_argument("--extra-settings", default=None,
                   help="more settings, run only at --extra-at experts (default on CPU: " + ",".join(CPU_EXTRA) + ")")
    p.add_argument("--extra-at", type=int, default=8)
    p.add_argument("--steps", type=int, default=None, help="measured steps per setting (after warm-up)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--rounds", type=int, default=1,
                   help="run every setting this many times, interleaved (A B C A B C ...), pooling the steady "
                        "steps of all rounds: on a shared machine the load then hits every setting alike")
    p.add_argument("--timeout", type=float, default=None, help="seconds per setting's process")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for all settings: none starts after it, each process ends by it (gpu.sh)")
    p.add_argument("--skip", default="", help="'peak': no matmul peak (= --skip-peak); dpo, fwdbwd, gen are "
                   "accepted and ignored (forward+backward and generation are fwd_bwd.py and generation.py)")
    p.add_argument("--from-json", default=None, help="render (and write) the report of a saved --json run")
    args, unknown = p.parse_known_args()
    for a in unknown:
        if a.startswith("--gen-"):
            p.error(f"{a.split('=')[0]}: generation is measured by benchmarks/generation.py now (same flag)")
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.skip_peak = args.skip_peak or "peak" in args.skip.split(",")
    return p, args


def choose_settings(p, args, can: dict) -> tuple[list[str], list[str]]:
    cuda = args.device.startswith("cuda")
    tf_side = "trl" if can["trl"] else "hf" if can["hf"] else None
    if args.settings:
        settings = args.settings.split(",")
    elif args.quick:
        settings = ["ours-fp32", "trl-fp32" if tf_side == "trl" else "hf-fp32"]
    elif cuda:
        settings = ["ours-bf16", "trl-bf16" if tf_side == "trl" else "hf-bf16"]
    else:
        settings = list(CPU_DEFAULT)
    if args.extra_settings is not None:
        extra = [x for x in args.extra_settings.split(",") if x]
    else:
        extra = [] if args.quick or cuda else list(CPU_EXTRA)
    for name in settings + extra:
        if name not in SETTINGS:
            p.error(f"unknown setting {name!r} (choices: {', '.join(SETTINGS)})")

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
    return substitute(settings), substitute(extra)


def main():
    p, args = parse_args()
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
        res["models"] = {int(k): v for k, v in res["models"].items()}
        args.device, args.quick = res["device"], False
        return harness.finish(args, res, render(res))
    t_start = time.perf_counter()
    mach, work = harness.setup(args)
    import torch
    can = harness.check_env(args.device)
    cuda = args.device.startswith("cuda")
    P = workload.PRESETS[args.preset]
    experts = [int(e) for e in args.experts.split(",")] if args.experts else P["experts"]
    steps = args.steps or (2 if args.quick else 10 if cuda else 6)
    warmup = args.warmup or (1 if args.quick else 3 if cuda else 2)
    settings, extra = choose_settings(p, args, can)
    timeout = args.timeout or (120 if args.quick else 420 if cuda else 1200)
    print(f"preset {args.preset}, experts {experts}, {P['pairs']} pairs x {P['seq']} tokens, warm-up {warmup} + "
          f"{steps} steps, device {args.device}; {mach}", flush=True)
    res: dict = dict(cmd=harness.command("dpo_speed.py"), date=str(datetime.date.today()),
                     load_start=os.getloadavg()[0], threads=torch.get_num_threads(), rounds=args.rounds,
                     preset=args.preset, device=args.device, machine=mach, versions=can["versions"],
                     pairs=P["pairs"], seq=P["seq"], steps=steps, warmup=warmup, models={}, dpo=[], peak={})
    if not args.skip_peak:  # first: the same run, the same machine state as the rest
        res["peak"] = harness.measure_peak(args.device, args.quick)
    ckpts = {}
    for E in experts:
        ckpt, hf_dir, info = workload.build_checkpoints(args.preset, E, work)
        ckpts[E], res["models"][E] = (ckpt, hf_dir), info
    for line in workload.describe_models(res["models"]):
        print(line, flush=True)
    for E in experts:
        names = settings + ([n for n in extra if n not in settings] if E == args.extra_at else [])
        runs: dict[str, list] = {n: [] for n in names}
        for rnd in range(args.rounds):
            for name in names:
                left = args.budget - (time.perf_counter() - t_start) if args.budget else timeout
                if left < 10:
                    runs[name].append(dict(setting=name, experts=E, error="not run: past the --budget"))
                    continue
                spec = dict(setting=name, experts=E, ckpt=str(ckpts[E][0]), hf_dir=str(ckpts[E][1]),
                            workdir=str(work / f"w-{E}-{name}-{rnd}"), device=args.device, preset=args.preset,
                            pairs=P["pairs"], seq=P["seq"], steps=steps, warmup=warmup, seed=rnd,
                            threads=args.threads)
                r = harness.run_worker(harness.HERE / "dpo_sides.py", spec, min(timeout, left))
                runs[name].append(r)
                report_progress(E, name, r, cuda)
        res["dpo"] += [pool_rounds(runs[n], warmup) for n in names]
    res["load_end"], res["wall_s"] = os.getloadavg()[0], time.perf_counter() - t_start
    harness.finish(args, res, render(res))
    failed = any("error" in r for r in res["dpo"])
    if failed and not any("error" not in r and SETTINGS[r["setting"]]["side"] == "ours" for r in res["dpo"]):
        sys.exit(1)


def report_progress(E: int, name: str, r: dict, cuda: bool) -> None:
    if "error" in r:
        print(f"E={E:2d} {name:20s} FAILED: {r['error']}", flush=True)
        return
    mem = f"cuda peak {r['cuda_peak_mb']:,.0f} MiB" if cuda else \
        f"peak RSS {r['rss_peak_mb']:,.0f} MiB (train {r['rss_train_mb']:,.0f})"
    print(f"E={E:2d} {name:20s} {r['tokens_per_s']:9,.0f} tok/s  step {r['step_s']:.3f} s "
          f"({r['quiet_steps']}/{r['steady_steps']} quiet)  {mem}  steps {r['step_times']}  "
          f"other procs (cores) {r['others']}", flush=True)
    if "losses" in r:  # llama4dpo settings train the same weights on the same data
        print(f"      losses {r['losses']}", flush=True)


# ---- report --------------------------------------------------------------------------------------------------
def render(res: dict) -> str:
    cuda = res["device"].startswith("cuda")
    tf_side = "trl" if any(SETTINGS[r["setting"]]["side"] == "trl" for r in res["dpo"]) else "hf"
    versions = ", ".join(f"{k} {v}" for k, v in res["versions"].items() if k in ("transformers", "trl") and v)
    lines = [HEADING, "",
             f"`{res['cmd']}` - {res.get('date', '')}, {res['machine']}; {versions}. Preset {res['preset']}: "
             f"{res['pairs']} pairs x {res['seq']} tokens per sequence (prompt {res['seq'] // 2} incl. bos + "
             f"response {res['seq'] - res['seq'] // 2} incl. eos, no padding), warm-up {res['warmup']} + median of "
             f"{res['steps']} steps" + (f" x {res['rounds']} rounds (settings interleaved, steady steps pooled)"
                                        if res["rounds"] > 1 else "")
             + f", each setting in its own process. Whole run: {res['wall_s']:.0f} s.", ""]
    lines += workload.describe_models(res["models"])
    peak = res["peak"]
    if peak:
        lines += ["", "Measured matmul peak (same run): " + ", ".join(harness.flops_str(k, v)
                                                                      for k, v in peak.items()) + "."]
    ok = [r for r in res["dpo"] if "error" not in r]
    # the baseline column: the transformers side's fp32 setting, else its first setting in the run
    present = [r["setting"] for r in ok if SETTINGS[r["setting"]]["side"] != "ours"]
    base_name = next((n for n in (f"{tf_side}-fp32", f"{tf_side}-bf16") if n in present),
                     present[0] if present else f"{tf_side}-fp32")
    rounds = res["rounds"] > 1
    lines += ["", "| experts | setting | tokens/s | step (s) | vs " + base_name + " | "
              + ("CUDA peak (MiB)" if cuda else "peak RSS (MiB) | train RSS (MiB)") + " | model TFLOP/s | MFU |"
              + ("" if cuda else " quiet steps |") + (" tokens/s per round |" if rounds else ""),
              "|---:|---|---:|---:|---:|---:|" + ("" if cuda else "---:|") + "---:|---:|"
              + ("" if cuda else "---:|") + ("---|" if rounds else "")]
    for r in res["dpo"]:
        E = r["experts"]
        if "error" in r:
            lines.append(f"| {E} | {describe(r['setting'])} | failed: {r['error'][:200]} |")
            continue
        s = SETTINGS[r["setting"]]
        ref_forward = not s["preref"] and not reference_free(s)
        flops = (6 + (2 if ref_forward else 0)) * res["models"][E]["flop_params"] * r["computed_tokens"] / r["step_s"]
        base = next((b for b in ok if b["experts"] == E and b["setting"] == base_name), None)
        vs = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        mem = f"{r['cuda_peak_mb']:,.0f}" if cuda else f"{r['rss_peak_mb']:,.0f} | {r['rss_train_mb']:,.0f}"
        per_round = " " + ", ".join(f"{x:,.0f}" for x in r.get("round_tokens_per_s", [])) + " |" if rounds else ""
        quiet = "" if cuda else f" {r['quiet_steps']}/{r['steady_steps']} |"
        lines.append(f"| {E} | {describe(r['setting'])} | {r['tokens_per_s']:,.0f} | {r['step_s']:.3f} | {vs} | "
                     f"{mem} | {flops / 1e12:.3f} | {harness.mfu(flops, peak, s['precision'])} |{quiet}{per_round}")
    lines += ratios(res, ok, tf_side, cuda)
    lines += ours_line(res["preset"], [r["setting"] for r in ok if SETTINGS[r["setting"]]["side"] == "ours"])
    lines += ["", "Definitions: tokens/s = non-pad tokens of the prompt+chosen and prompt+rejected rows per optimizer "
              "step / median step time" + ("" if cuda else
              " (median over the quiet steady steps - other processes used < 0.25 cores during the step, read from "
              "/proc/stat - when there are at least 3, else over all steady steps)")
              + " (a step: collation, reference forward unless precomputed, policy forward+backward, clipping, "
              "AdamW). Precomputed reference log-probs cost one extra forward pass over the data before training, "
              "not counted in the step (ours: by the policy before its first step, as `llama4dpo dpo` does when "
              "the reference is the initial checkpoint; TRL: by its ref_model, which it keeps). Memory: " +
              ("torch.cuda.max_memory_allocated per process." if cuda else
               "peak RSS (getrusage) of the setting's own process; train RSS = peak minus the RSS after importing "
               "torch.") +
              " Model FLOPs: (6, + 2 where a reference forward runs: not precomputed, not a reference-free loss) x N x "
              "tokens run through the model, N = active "
              "parameters without the input embedding; the same useful FLOPs per token are credited to both sides "
              "(not the dense all-experts work transformers does). With prefix sharing (our default, "
              "dpo.share_prompt) a pair is one row [prompt | chosen | rejected], so fewer tokens run through the "
              "model (P + C + R instead of 2P + C + R) and fewer FLOPs are credited; tokens/s counts 2P + C + R "
              "on every side. MFU = model FLOP/s / the matmul peak of that precision measured above."]
    if not cuda:
        lines += ["", harness.shared_machine_note(res)]
    return "\n".join(lines)


def ours_line(preset: str, names: list[str]) -> list[str]:
    """How the llama4dpo side trains: the CLI's command and each setting's overrides beyond the defaults."""
    if not names:
        return []
    defaults = ("=false", "=default", "=1.0", "=fp32", "share_prompt=true")

    def extra(n):
        return " ".join(f"`{o}`" for o in ours_overrides(n) if not o.endswith(defaults)) or "nothing"
    return ["", f"The llama4dpo side is the CLI's recipe, `{workload.dpo_cli(preset, [])}` with the benchmark's "
            "overrides (benchmarks/workload.py: one micro-batch of the step's pairs, lr 1e-6, no warm-up or weight "
            "decay, no held-out split), each setting adding: " + "; ".join(f"{n} {extra(n)}" for n in names) + "."]


def ratios(res: dict, ok: list[dict], tf_side: str, cuda: bool) -> list[str]:
    mem_key = "cuda_peak_mb" if cuda else "rss_peak_mb"

    def mem(a, b):
        out = f"; peak memory {a[mem_key] / b[mem_key]:.2f}x"
        return out + ("" if cuda else f" (train RSS {a['rss_train_mb'] / max(b['rss_train_mb'], 1e-9):.2f}x)")
    their = "TRL" if tf_side == "trl" else "transformers"
    lines = ["", f"**Ratios** (llama4dpo / {their}, same run):", ""]
    for E in res["models"]:
        rows = {r["setting"]: r for r in ok if r["experts"] == E}
        ours = {k: v for k, v in rows.items() if SETTINGS[k]["side"] == "ours"}
        theirs = {k: v for k, v in rows.items() if SETTINGS[k]["side"] != "ours"}
        if not ours or not theirs:
            continue
        parts = []
        for prec in ("fp32", "bf16"):
            o, t, h = rows.get(f"ours-{prec}"), rows.get(f"{tf_side}-{prec}"), rows.get(f"hf-{prec}")
            if o and t:
                parts.append(f"both {prec}: **{o['tokens_per_s'] / t['tokens_per_s']:.2f}x** tokens/s{mem(o, t)}")
            if o and h and tf_side == "trl":  # the hand-written DPO step on transformers' model, too
                parts.append(f"both {prec}, vs transformers + hand-written DPO: "
                             f"**{o['tokens_per_s'] / h['tokens_per_s']:.2f}x**")
        bo = max(ours.values(), key=lambda r: r["tokens_per_s"])
        bt = max(theirs.values(), key=lambda r: r["tokens_per_s"])
        parts.append(f"each at its fastest measured here ({describe(bo['setting'])} vs {describe(bt['setting'])}): "
                     f"**{bo['tokens_per_s'] / bt['tokens_per_s']:.2f}x**{mem(bo, bt)}")
        lo = min(ours.values(), key=lambda r: r[mem_key])
        if lo is not bo:
            parts.append(f"least memory of ours ({describe(lo['setting'])}) vs {their}'s fastest: "
                         f"**{lo['tokens_per_s'] / bt['tokens_per_s']:.2f}x** tokens/s; "
                         f"peak memory {lo[mem_key] / bt[mem_key]:.2f}x")
        if "trl-default" in rows:
            parts.append(f"fastest ours vs TRL's defaults (bf16 + grad ckpt): "
                         f"**{bo['tokens_per_s'] / rows['trl-default']['tokens_per_s']:.2f}x**")
        lines.append(f"- E={E}: " + "; ".join(parts))
        for prec in ("fp32", "bf16"):  # one precision's llama4dpo settings train the same weights, same data
            same = [r for r in ours.values() if r.get("losses") and SETTINGS[r["setting"]]["precision"] == prec]
            if len(same) < 2:
                continue
            # against the first compiled one where there is one: CUDA graphs should replay its very kernels
            base = next((r for r in same if SETTINGS[r["setting"]].get("compile")), same[0])
            diffs = ", ".join(f"{r['setting']} {max(abs(a - b) for a, b in zip(r['losses'], base['losses'])):.1e}"
                              for r in same if r is not base)
            first = ", ".join(f"{r['setting']} {r['losses'][0]:.6f}" for r in same)
            lines.append(f"  - same training, step by step (step i trains on the same batch in every setting; "
                         f"compiled ones count their untimed first steps): loss (summed over the step's pairs) at "
                         f"the first step {first}; max |loss - {base['setting']}'s loss| over the steps both ran: "
                         f"{diffs}")
    return lines


if __name__ == "__main__":
    main()
