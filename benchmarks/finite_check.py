"""What the trainer's finiteness check of the updated weights costs a DPO step (issue target: <= 2%).

After each optimizer step the Trainer sums |w| over all parameters (one fused _foreach_norm per dtype,
left on the device and read with the next step's metrics) so that a NaN/inf weight stops the run before
anything is evaluated or written. This times the same DPO step (15M preset, 8 pairs x 128 tokens, frozen
reference, as in dpo_speed.py) with the check and with it switched off, alternating the two in one process,
and reports medians, plus the check alone.

    python benchmarks/finite_check.py                 # writes the section "finite_check" of BENCHMARKS.md
    python benchmarks/finite_check.py --no-write --rounds 2 --steps 2 --preset 15m --experts 4
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import functools
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402

from _report import machine, markdown_table, write_section  # noqa: E402
from dpo_speed import PAD, PRESETS, _collate_preference, build_checkpoints, make_examples  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="15m", choices=sorted(PRESETS))
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--rounds", type=int, default=15, help="alternations of the two settings")
    p.add_argument("--steps", type=int, default=4, help="timed steps per setting per round")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = p.parse_args()
    if args.rounds * args.steps < 2:
        p.error("--rounds x --steps must be at least 2 (a median and a spread)")

    from llama4dpo import Config, load_model
    from llama4dpo.config import DPOConfig, TrainConfig
    from llama4dpo.train import trainer as trainer_module
    from llama4dpo.train.batches import ExampleBatches
    from llama4dpo.train.objectives import Preference

    P = PRESETS[args.preset]
    work = Path(tempfile.mkdtemp(prefix="finite_check_"))
    atexit.register(shutil.rmtree, work, True)
    ckpt, _, info = build_checkpoints(args.preset, args.experts, work)
    total_steps = 3 + 2 * args.rounds * args.steps
    cfg = Config.load_json(ckpt / "config.json")
    cfg.train = TrainConfig(batch_size=P["pairs"], device="cpu", lr=1e-6, warmup_steps=0,
                            max_steps=total_steps + 1, weight_decay=0.0)
    cfg.dpo = DPOConfig()
    examples = make_examples(P["pairs"] * (total_steps + 1), P["seq"], cfg.model.vocab_size, 0)
    batches = ExampleBatches(examples, functools.partial(_collate_preference(False), pad_id=PAD), P["pairs"], 1, 0)
    model = load_model(ckpt).train()
    objective = Preference(cfg.dpo, reference=load_model(ckpt).requires_grad_(False))
    trainer = trainer_module.Trainer(cfg, model, objective, batches, None, work / "run", device=torch.device("cpu"),
                                     show_progress=False)
    check = trainer_module.weights_sum
    settings = {"with the check": check, "without": lambda m: None}

    for _ in range(3):  # warm-up
        trainer.train_step()
    times = {name: [] for name in settings}
    for r in range(args.rounds):
        for name in (list(settings) if r % 2 == 0 else list(settings)[::-1]):  # alternate which goes first
            trainer_module.weights_sum = settings[name]
            for _ in range(args.steps):
                t = time.perf_counter()
                trainer.train_step()
                times[name].append(time.perf_counter() - t)
    trainer_module.weights_sum = check
    alone = []
    for _ in range(50):
        t = time.perf_counter()
        float(check(model))
        alone.append(time.perf_counter() - t)

    on, off = (statistics.median(times[n]) for n in settings)
    q = statistics.quantiles(times["without"], n=4)
    spread = (q[2] - q[0]) / off  # the noise a difference of medians has to be read against
    direct = statistics.median(alone)
    rows = [[f"{args.preset}, E={args.experts}, fp32, frozen reference", f"{info['total_params'] / 1e6:.1f}M",
             f"{on * 1e3:.1f}", f"{off * 1e3:.1f}", f"{100 * (on / off - 1):+.1f}%", f"{100 * spread:.1f}%",
             f"{direct * 1e3:.2f} ({100 * direct / off:.2f}%)"]]
    table = markdown_table(["DPO step (CPU, 8 pairs x 128 tokens)", "params", "ms with check", "ms without",
                            "difference of medians", "steps' spread (IQR / median)",
                            "check alone, ms (share of step)"], rows)
    body = (f"### Finiteness check of the updated weights\n\n`python benchmarks/finite_check.py` — "
            f"{datetime.date.today()}, {machine()}; medians of {len(times['without'])} steps per setting, "
            f"the two alternating in one process. The difference of medians is to be read against the steps' "
            f"own spread on this shared machine; the check alone (median of 50 calls) is its direct cost."
            f"\n\n{table}")
    print(body)
    if not args.no_write:
        write_section("finite_check", body)


if __name__ == "__main__":
    main()
