"""Where does a llama4dpo DPO step spend its time? torch.profiler over steady-state `Trainer.train_step()` calls.

Same model, data and step as benchmarks/dpo_speed.py (15M preset, 8 pairs x 128 tokens, frozen reference).

    python benchmarks/profile_dpo_step.py --precision fp32 --experts 8
    python benchmarks/profile_dpo_step.py --precision bf16 --experts 8 --shapes      # group ops by input shape
    python benchmarks/profile_dpo_step.py --precision fp32 --trace /tmp/step.json   # chrome://tracing file

Prints the top ops by self CPU time, then the time per module region (record_function labels are not in the
model, so regions are reconstructed from the autograd graph: forward ops are grouped under the nn.Module that
ran them with `with_modules`/stack when available).
"""

from __future__ import annotations

import argparse
import atexit
import functools
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from dpo_speed import PAD, PRESETS, _collate_preference, build_checkpoints, make_examples  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="15m", choices=sorted(PRESETS))
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--preref", action="store_true", help="precomputed reference log-probs")
    p.add_argument("--compile", action="store_true", help="train.compile=true (6 more warm-up steps: compiling)")
    p.add_argument("--compile-mode", default="default", help="train.compile_mode, e.g. reduce-overhead (CUDA graphs)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="profiled steps")
    p.add_argument("--rows", type=int, default=30)
    p.add_argument("--shapes", action="store_true", help="group by input shapes")
    p.add_argument("--trace", default=None, help="write a chrome trace here")
    p.add_argument("--regions", action="store_true",
                   help="instead of the op table: wall time per region of the step (no profiler), median of --steps")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from llama4dpo import Config, load_model
    from llama4dpo.config import DPOConfig, TrainConfig
    from llama4dpo.train.batches import ExampleBatches
    from llama4dpo.train.objectives import Preference, precompute_reference_logps
    from llama4dpo.train.trainer import Trainer, autocast

    P = PRESETS[args.preset]
    work = Path(tempfile.mkdtemp(prefix="profile_dpo_"))
    atexit.register(shutil.rmtree, work, True)  # ~120 MB of checkpoints a run
    ckpt, _, info = build_checkpoints(args.preset, args.experts, work)
    device = torch.device(args.device)
    n = args.warmup + args.steps
    cfg = Config.load_json(ckpt / "config.json")
    cfg.train = TrainConfig(batch_size=P["pairs"], precision=args.precision, device=args.device, lr=1e-6,
                            warmup_steps=0, max_steps=n + 6, weight_decay=0.0, compile=args.compile,
                            compile_mode=args.compile_mode)
    cfg.dpo = DPOConfig(precompute_ref=args.preref)
    if args.compile:
        args.warmup += 6  # torch.compile compiles, and recompiles for new shapes, in the first steps
        n += 6
    examples = make_examples(P["pairs"] * n, P["seq"], cfg.model.vocab_size, 0)
    batches = ExampleBatches(examples, functools.partial(_collate_preference(cfg.dpo.share_prompt), pad_id=PAD),
                             P["pairs"], 1, 0)
    model = load_model(ckpt, device).train()
    ref = load_model(ckpt, device).requires_grad_(False)
    if args.preref:
        with autocast(cfg.train, device):
            objective = Preference(cfg.dpo, reference_logps=precompute_reference_logps(ref, batches.fixed(),
                                                                                       len(examples), device))
    else:
        objective = Preference(cfg.dpo, reference=ref)
    trainer = Trainer(cfg, model, objective, batches, None, work / "run", device=device, show_progress=False)
    if args.regions:
        return regions(trainer, model, objective, args)
    for _ in range(args.warmup):
        trainer.train_step()
    times = []
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=args.shapes) as prof:
        for _ in range(args.steps):
            t = time.perf_counter()
            with record_function("train_step"):
                trainer.train_step()
            times.append(time.perf_counter() - t)
    print(f"{args.preset} E={args.experts} {args.precision}{' preref' if args.preref else ''}"
          f"{' compile ' + args.compile_mode if args.compile else ''}: "
          f"{info['total_params'] / 1e6:.1f}M params; profiled step times {[round(t, 3) for t in times]} s "
          f"(profiler overhead included), {torch.get_num_threads()} threads")
    ka = prof.key_averages(group_by_input_shape=args.shapes)
    if cuda:  # is the card or the host behind? kernel time against wall time
        # kernels alone, as the table's "Self CUDA time total" counts them (labels and CPU ops carry their kernels')
        busy = sum(e.self_device_time_total for e in ka if e.device_type == torch.autograd.DeviceType.CUDA
                   and not getattr(e, "is_user_annotation", False)) / 1e3 / args.steps
        print(f"GPU busy {busy:.1f} ms a step (kernels' own time) of {1e3 * sum(times) / len(times):.1f} ms wall")
    print(ka.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=args.rows,
                   max_name_column_width=60,
                   max_shapes_column_width=70))
    if args.trace:
        prof.export_chrome_trace(args.trace)
        print(f"trace: {args.trace}")


def regions(trainer, model, objective, args):
    """Wall time of each part of Trainer.train_step, by wrapping the callables it uses (no profiler overhead)."""
    import statistics
    from collections import defaultdict

    acc = defaultdict(float)

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[name] += time.perf_counter() - t
        return wrapper

    if getattr(objective, "reference", None) is not None:
        objective.reference.forward = timed("reference forward (no grad)", objective.reference.forward)
    model.forward = timed("policy forward", model.forward)
    orig_backward = torch.Tensor.backward
    torch.Tensor.backward = timed("backward", orig_backward)
    torch.nn.utils.clip_grad_norm_ = timed("clip_grad_norm_", torch.nn.utils.clip_grad_norm_)
    trainer.optimizer.step = timed("AdamW step", trainer.optimizer.step)
    trainer.optimizer.zero_grad = timed("zero_grad", trainer.optimizer.zero_grad)
    trainer.train_batches = timed("batch (collate)", trainer.train_batches)
    per_step = defaultdict(list)
    for i in range(args.warmup + args.steps):
        acc.clear()
        t = time.perf_counter()
        trainer.train_step()
        total = time.perf_counter() - t
        if i >= args.warmup:
            per_step["step total"].append(total)
            for k, v in acc.items():
                per_step[k].append(v)
            per_step["other (loss, log-probs, metrics, ...)"].append(total - sum(acc.values()))
    torch.Tensor.backward = orig_backward
    total = statistics.median(per_step["step total"])
    print(f"{args.preset} E={args.experts} {args.precision}{' preref' if args.preref else ''}, "
          f"{torch.get_num_threads()} threads: median of {args.steps} steps")
    print("| region | ms | share |\n|---|---:|---:|")
    for k, v in sorted(per_step.items(), key=lambda kv: -statistics.median(kv[1])):
        m = statistics.median(v)
        print(f"| {k} | {m * 1e3:,.1f} | {100 * m / total:.0f}% |")


if __name__ == "__main__":
    main()
