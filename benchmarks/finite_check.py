"""What the trainer's finiteness check of the updated weights costs a DPO step (issue target: <= 2%).

After each optimizer step the Trainer sums |w| over all parameters (`weights_sum`: left on the device and read
with the next step's metrics) so that a NaN/inf weight stops the run before anything is evaluated or written.
This runs `llama4dpo dpo`'s recipe (15m preset, 8 pairs x 128 tokens, fp32, frozen reference, as dpo_speed.py's
ours-fp32) and times its steps with the check and with it switched off, alternating the two within the one run,
and reports medians, plus the check alone.

    python benchmarks/finite_check.py                 # replaces its section of BENCHMARKS.md
    python benchmarks/finite_check.py --no-write --rounds 1 --steps 2 --experts 4     # quick
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import harness
import workload

HEADING = "## Finiteness check of the updated weights (`benchmarks/finite_check.py`)"
WARMUP = 3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="15m", choices=sorted(workload.PRESETS))
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--rounds", type=int, default=15, help="alternations of the two settings")
    p.add_argument("--steps", type=int, default=4, help="timed steps per setting per round")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = p.parse_args()
    if args.rounds * args.steps < 2:
        p.error("--rounds x --steps must be at least 2 (a median and a spread)")

    P = workload.PRESETS[args.preset]
    work = Path(tempfile.mkdtemp(prefix="finite_check_"))
    atexit.register(shutil.rmtree, work, True)
    ckpt, _, info = workload.build_checkpoints(args.preset, args.experts, work)
    total = WARMUP + 2 * args.rounds * args.steps
    examples = workload.make_examples(P["pairs"] * total, P["seq"], info["vocab"], 0)
    data = workload.write_pairs(examples, work / "pairs.jsonl")
    cfg = workload.load_config(args.preset, workload.dpo_overrides(P["pairs"], P["seq"], total, "cpu", 0)
                               + ["train.precision=fp32"])
    names = ("with the check", "without")
    times = {n: [] for n in names}
    alone = []
    state = {"k": 0, "check": None}

    def on_step(trainer, step):
        module = sys.modules[type(trainer).__module__]  # the trainer's module: its weights_sum is the check
        check = state["check"] = state["check"] or module.weights_sum
        k, state["k"] = state["k"], state["k"] + 1
        if k < WARMUP:
            return step()
        r, j = divmod(k - WARMUP, 2 * args.steps)
        name = (names if r % 2 == 0 else names[::-1])[j // args.steps]  # alternate which goes first
        module.weights_sum = check if name == names[0] else (lambda m: None)
        try:
            t = time.perf_counter()
            out = step()
            times[name].append(time.perf_counter() - t)
        finally:
            module.weights_sum = check
        if k + 1 == total:
            for _ in range(50):
                t = time.perf_counter()
                float(check(trainer.model))
                alone.append(time.perf_counter() - t)
            raise workload.StopRun
        return out
    workload.run_dpo_recipe(cfg, data, work / "run", ckpt, on_step)

    on, off = (statistics.median(times[n]) for n in names)
    q = statistics.quantiles(times["without"], n=4) if len(times["without"]) > 1 else [off, off, off]
    spread = (q[2] - q[0]) / off  # the noise a difference of medians has to be read against
    direct = statistics.median(alone)
    rows = [[f"{args.preset}, E={args.experts}, fp32, frozen reference", f"{info['total_params'] / 1e6:.1f}M",
             f"{on * 1e3:.1f}", f"{off * 1e3:.1f}", f"{100 * (on / off - 1):+.1f}%", f"{100 * spread:.1f}%",
             f"{direct * 1e3:.2f} ({100 * direct / off:.2f}%)"]]
    table = harness.markdown_table([f"DPO step (CPU, {P['pairs']} pairs x {P['seq']} tokens)", "params",
                                    "ms with check", "ms without", "difference of medians",
                                    "steps' spread (IQR / median)", "check alone, ms (share of step)"], rows)
    body = (f"{HEADING}\n\n`python benchmarks/finite_check.py` - {datetime.date.today()}, {harness.machine()}; "
            f"`llama4dpo dpo`'s recipe, medians of {len(times['without'])} steps per setting, the two alternating "
            f"in one run. The difference of medians is to be read against the steps' own spread on this shared "
            f"machine; the check alone (median of 50 calls) is its direct cost.\n\n{table}")
    print(body)
    if not args.no_write:
        from report import write_section
        write_section(body)


if __name__ == "__main__":
    main()
