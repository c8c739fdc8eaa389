"""Where does a llama4dpo DPO step spend its time? torch.profiler over steady-state steps of `llama4dpo dpo`.

The same recipe, model and data as benchmarks/dpo_speed.py's llama4dpo side (15m preset, 8 pairs x 128 tokens,
frozen reference unless --preref): the CLI's recipe, the profiler around its training loop's steps.

    python benchmarks/profile_dpo_step.py --precision fp32 --experts 8
    python benchmarks/profile_dpo_step.py --precision bf16 --experts 8 --shapes      # group ops by input shape
    python benchmarks/profile_dpo_step.py --precision fp32 --trace /tmp/step.json   # chrome://tracing file
    python benchmarks/profile_dpo_step.py --preset tiny --experts 4 --warmup 1 --steps 1 --rows 5   # quick
    python benchmarks/profile_dpo_step.py --ckpt WORK/dense-ours --shape 150,110,90 --regions     # SmolLM2 (*)

(*) the checkpoint benchmarks/dense_speed.py builds (--workdir WORK keeps it), with its HH-like pair lengths.

Prints the top ops by self CPU (or CUDA) time; --regions instead: wall time per part of the step (no profiler).
Prints only (no table in BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import workload


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="15m", choices=sorted(workload.PRESETS))
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
    p.add_argument("--ckpt", default=None, help="profile this checkpoint (e.g. dense_speed.py's) instead of a preset's")
    p.add_argument("--shape", default=None, help="prompt,chosen,rejected token counts of every pair (e.g. 150,110,90)")
    p.add_argument("--pairs", type=int, default=None, help="pairs a step (default: the preset's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile:
        args.warmup += 6  # torch.compile compiles, and recompiles for new shapes, in the first steps

    P = workload.PRESETS.get(args.preset, workload.PRESETS["15m"])
    work = Path(tempfile.mkdtemp(prefix="profile_dpo_"))
    atexit.register(shutil.rmtree, work, True)  # ~120 MB of checkpoints a run
    if args.ckpt:
        from llama4dpo.checkpoint import load_config
        ckpt, args.preset = Path(args.ckpt), "checkpoint"
        workload.PRESETS["checkpoint"] = dict(config=None, pairs=8, seq=128)  # (the model is the checkpoint's)
        mc = load_config(ckpt).model
        info = dict(vocab=mc.vocab_size, total_params=sum(p.numel() for p in load_model_params(ckpt)))
    else:
        ckpt, _, info = workload.build_checkpoints(args.preset, args.experts, work)
    n = args.warmup + args.steps
    shape = [int(x) for x in args.shape.split(",")] if args.shape else None
    pairs = args.pairs or P["pairs"]
    examples = workload.make_examples(pairs * n, P["seq"], info["vocab"], 0, shape)
    data = workload.write_pairs(examples, work / "pairs.jsonl")
    cfg = workload.load_config(args.preset, workload.dpo_overrides(pairs, P["seq"], n, args.device, 0, shape) + [
        f"train.precision={args.precision}", f"dpo.precompute_ref={str(args.preref).lower()}",
        f"train.compile={str(args.compile).lower()}", f"train.compile_mode={args.compile_mode}"])
    label = (f"{args.ckpt or args.preset} E={args.experts} {args.precision}{' preref' if args.preref else ''}"
             f"{' compile ' + args.compile_mode if args.compile else ''}")
    hook = Regions(args, label) if args.regions else Profiled(args, label, info, torch.device(args.device))
    workload.run_dpo_recipe(cfg, data, work / "run", ckpt, hook)


def load_model_params(ckpt):
    from llama4dpo import load_model
    return list(load_model(ckpt).parameters())


class Profiled:
    """The step hook: plain warm-up steps, then --steps steps under torch.profiler; prints its table."""

    def __init__(self, args, label, info, device):
        self.args, self.label, self.info, self.device = args, label, info, device
        self.k, self.times, self.prof = 0, [], None

    def __call__(self, trainer, step):
        args, self.k = self.args, self.k + 1
        if self.k <= args.warmup:
            return step()
        if self.prof is None:
            cuda = self.device.type == "cuda"
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            self.prof = profile(activities=activities, record_shapes=args.shapes)
            self.prof.__enter__()
        t = time.perf_counter()
        with record_function("train_step"):
            out = step()
        self.times.append(time.perf_counter() - t)
        if len(self.times) == args.steps:
            self.prof.__exit__(None, None, None)
            self.report()
            raise workload.StopRun
        return out

    def report(self):
        args, times, prof = self.args, self.times, self.prof
        cuda = self.device.type == "cuda"
        print(f"{self.label}: {self.info['total_params'] / 1e6:.1f}M params; profiled step times "
              f"{[round(t, 3) for t in times]} s (profiler overhead included), {torch.get_num_threads()} threads")
        ka = prof.key_averages(group_by_input_shape=args.shapes)
        if cuda:  # is the card or the host behind? kernel time against wall time
            # kernels alone, as the table's "Self CUDA time total" counts them (labels and CPU ops carry their kernels')
            busy = sum(e.self_device_time_total for e in ka if e.device_type == torch.autograd.DeviceType.CUDA
                       and not getattr(e, "is_user_annotation", False)) / 1e3 / args.steps
            print(f"GPU busy {busy:.1f} ms a step (kernels' own time) of {1e3 * sum(times) / len(times):.1f} ms wall")
        print(ka.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=args.rows,
                       max_name_column_width=60, max_shapes_column_width=70))
        if args.trace:
            prof.export_chrome_trace(args.trace)
            print(f"trace: {args.trace}")


class Regions:
    """The step hook for --regions: wall time of each part of the step, by wrapping the callables the trainer
    uses (no profiler overhead); prints the median of --steps steps after --warmup."""

    def __init__(self, args, label):
        from collections import defaultdict
        self.args, self.label, self.k = args, label, 0
        self.acc, self.per_step = defaultdict(float), defaultdict(list)

    def timed(self, name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.acc[name] += time.perf_counter() - t
        return wrapper

    def wrap(self, trainer):
        timed = self.timed
        reference = getattr(trainer.objective, "reference", None)
        if reference is not None:
            reference.forward = timed("reference forward (no grad)", reference.forward)
        trainer.model.forward = timed("policy forward", trainer.model.forward)
        self.backward = torch.Tensor.backward
        torch.Tensor.backward = timed("backward", self.backward)
        torch.nn.utils.clip_grad_norm_ = timed("clip_grad_norm_", torch.nn.utils.clip_grad_norm_)
        trainer.optimizer.step = timed("AdamW step", trainer.optimizer.step)
        trainer.optimizer.zero_grad = timed("zero_grad", trainer.optimizer.zero_grad)
        trainer.train_batches = timed("batch (collate)", trainer.train_batches)

    def __call__(self, trainer, step):
        import statistics
        if self.k == 0:
            self.wrap(trainer)
        self.k += 1
        self.acc.clear()
        t = time.perf_counter()
        out = step()
        total = time.perf_counter() - t
        if self.k <= self.args.warmup:
            return out
        self.per_step["step total"].append(total)
        for k, v in self.acc.items():
            self.per_step[k].append(v)
        self.per_step["other (loss, log-probs, metrics, ...)"].append(total - sum(self.acc.values()))
        if self.k < self.args.warmup + self.args.steps:
            return out
        torch.Tensor.backward = self.backward
        total = statistics.median(self.per_step["step total"])
        print(f"{self.label}, {torch.get_num_threads()} threads: median of {self.args.steps} steps")
        print("| region | ms | share |\n|---|---:|---:|")
        for k, v in sorted(self.per_step.items(), key=lambda kv: -statistics.median(kv[1])):
            m = statistics.median(v)
            print(f"| {k} | {m * 1e3:,.1f} | {100 * m / total:.0f}% |")
        raise workload.StopRun


if __name__ == "__main__":
    main()
