"""Model forward + backward alone: llama4dpo's LlamaModel vs transformers' Llama4ForCausalLM, same weights.

Cross-entropy on 2 x pairs rows of random tokens (the DPO step's row count), backward, no optimizer; each side
after warm-up, median over the calls during which other processes were (nearly) idle (harness.quiet_median_time).
Checks once, in fp32 and eval mode, that both models give the same logits.

    python benchmarks/fwd_bwd.py                 # CPU: the 15m preset at 4, 8, 16 experts, fp32 and bf16 autocast
    python benchmarks/fwd_bwd.py --quick         # smoke mode: tiny preset, fp32, 1 warm-up + 2 calls
    python benchmarks/fwd_bwd.py --device cuda   # one GPU: the 100m preset, bf16 autocast (gpu.sh runs it)
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import harness
import workload

HEADING = "## Model forward + backward alone: llama4dpo vs transformers (`benchmarks/fwd_bwd.py`)"


def fwd_bwd(ckpt, hf_dir, device, precision, rows, seq, vocab, warmup, repeat, has_hf) -> dict:
    import torch
    import torch.nn.functional as F
    from llama4dpo import load_model

    ids = torch.randint(3, vocab, (rows, seq), generator=torch.Generator().manual_seed(1)).to(device)

    def step(forward, params):
        def run():
            with harness.autocast(precision, device):
                logits = forward(ids)
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            for p in params:
                p.grad = None
        return run

    ours = load_model(ckpt, device).train()
    res = {"ours_s": harness.quiet_median_time(step(ours, list(ours.parameters())), warmup, repeat, device)}
    if has_hf:
        hf = workload.load_hf(hf_dir, device).train()
        res["hf_s"] = harness.quiet_median_time(step(lambda x: hf(input_ids=x).logits, list(hf.parameters())),
                                                warmup, repeat, device)
        if precision == "fp32":  # same weights -> same logits (checked once, in eval mode)
            with torch.no_grad():
                ours.eval(), hf.eval()
                res["max_logit_diff"] = (ours(ids[:2]) - hf(input_ids=ids[:2]).logits).abs().max().item()
        del hf
    res["tokens"] = rows * seq
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.add_common_args(p, workload.PRESETS)
    p.add_argument("--precisions", default=None, help="comma list of fp32, bf16 (default: both on CPU, bf16 on "
                   "GPU, fp32 in --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per side (default 2, 1 in --quick)")
    p.add_argument("--repeat", type=int, default=None, help="timed calls per side (default 5, 2 in --quick)")
    args = p.parse_args()
    precisions = (args.precisions or ("fp32" if args.quick else "bf16" if args.device.startswith("cuda")
                                      else "fp32,bf16")).split(",")
    if any(x not in ("fp32", "bf16") for x in precisions):
        p.error(f"--precisions takes fp32 and/or bf16, not {args.precisions!r}")
    mach, work = harness.setup(args)
    import torch
    t0 = time.perf_counter()
    can = harness.check_env(args.device)
    P = workload.PRESETS[args.preset]
    experts = [int(e) for e in args.experts.split(",")] if args.experts else P["experts"][:1 if args.quick else None]
    res = dict(cmd=harness.command("fwd_bwd.py"), date=str(datetime.date.today()), machine=mach,
               versions=can["versions"], preset=args.preset, device=args.device, threads=torch.get_num_threads(),
               load_start=os.getloadavg()[0], rows=2 * P["pairs"], seq=P["seq"], models={}, fwdbwd=[], peak={})
    if not args.skip_peak:
        res["peak"] = harness.measure_peak(args.device, args.quick)
    warmup = args.warmup or (1 if args.quick else 2)
    repeat = args.repeat or (2 if args.quick else 5)
    res.update(warmup=warmup, repeat=repeat)
    for prec in precisions:
        for E in experts:
            ckpt, hf_dir, res["models"][E] = workload.build_checkpoints(args.preset, E, work)
            r = fwd_bwd(ckpt, hf_dir, args.device, prec, 2 * P["pairs"], P["seq"], res["models"][E]["vocab"],
                        warmup, repeat, can["hf"])
            r.update(experts=E, precision=prec)
            res["fwdbwd"].append(r)
            print(f"fwd+bwd E={E} {prec}: ours {r['ours_s'] * 1e3:.1f} ms, transformers "
                  f"{harness.fmt(r.get('hf_s') and r['hf_s'] * 1e3, 1)} ms, max |logit diff| "
                  f"{r.get('max_logit_diff', '-')}", flush=True)
    res["load_end"], res["wall_s"] = os.getloadavg()[0], time.perf_counter() - t0
    harness.finish(args, res, render(res))


def render(res: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in res["versions"].items() if k == "transformers" and v)
    lines = [HEADING, "", f"`{res['cmd']}` - {res['date']}, {res['machine']}; {versions}. Preset {res['preset']}: "
             f"{res['rows']} rows x {res['seq']} random tokens, cross-entropy, backward, no optimizer; warm-up "
             f"{res['warmup']} + median of {res['repeat']} calls per side. Whole run: {res['wall_s']:.0f} s.", ""]
    lines += workload.describe_models(res["models"])
    if res["peak"]:
        lines += ["", "Measured matmul peak (same run): " + ", ".join(harness.flops_str(k, v)
                                                                      for k, v in res["peak"].items()) + "."]
    rows = []
    for r in res["fwdbwd"]:
        n = res["models"][r["experts"]]["flop_params"]
        rows.append([r["experts"], r["precision"], f"{r['tokens']:,}", f"{r['ours_s'] * 1e3:,.1f}",
                     harness.fmt(r.get("hf_s") and r["hf_s"] * 1e3, 1),
                     f"{r['hf_s'] / r['ours_s']:.2f}x" if "hf_s" in r else "-",
                     harness.mfu(6 * n * r["tokens"] / r["ours_s"], res["peak"], r["precision"]),
                     f"{r['max_logit_diff']:.1e}" if "max_logit_diff" in r else "-"])
    lines += ["", harness.markdown_table(
        ["experts", "precision", "tokens", "llama4dpo (ms)", "transformers (ms)", "speed-up", "llama4dpo MFU",
         "max abs logit diff (fp32)"], rows, "|---:|---|---:|---:|---:|---:|---:|---:|")]
    lines += ["", "MFU: 6 x N x tokens / time, N = active parameters without the input embedding, against the matmul "
              "peak of that precision measured above; transformers runs every expert on every token, so its "
              "time grows with the expert count while ours follows the routed tokens."]
    if not res["device"].startswith("cuda"):
        lines += ["", harness.shared_machine_note(res)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
