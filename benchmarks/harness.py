"""The benchmarks' harness: timing (medians, the quiet-step detector), subprocess workers, the environment check,
the measured matmul peak, the command-line flags every benchmark shares, and `finish`: print the report and
replace the script's own section of BENCHMARKS.md (report.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SRC = ROOT / "src"
for _p in (str(SRC), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)


def _stub_tqdm() -> None:
    """The trainer imports tqdm for its progress bar, which benchmarks never show: where tqdm is missing (a
    bare GPU machine), a stand-in module lets it import."""
    try:
        import tqdm.auto  # noqa: F401
    except ImportError:
        import types
        mod, auto = types.ModuleType("tqdm"), types.ModuleType("tqdm.auto")

        class tqdm:  # noqa: N801
            def __init__(self, *a, **k):
                pass

            def __getattr__(self, name):
                return lambda *a, **k: None
        auto.tqdm = mod.tqdm = tqdm
        mod.auto = auto
        sys.modules["tqdm"], sys.modules["tqdm.auto"] = mod, auto


_stub_tqdm()


# ---- environment -------------------------------------------------------------------------------------------
def package_status() -> dict[str, str | None]:
    """Version of each package a benchmark can use, None where it is missing."""
    import importlib
    out = {}
    for name in ("torch", "safetensors", "numpy", "tqdm", "transformers", "trl", "datasets", "accelerate",
                 "tokenizers", "psutil"):
        try:
            out[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception:  # noqa: BLE001 - a broken install counts as missing
            out[name] = None
    return out


def check_env(device: str, need: tuple[str, ...] = ("torch", "safetensors", "numpy", "datasets")) -> dict:
    """Print what is present and what each side needs; exit 3 when llama4dpo itself cannot run; return which
    sides can: {"ours", "hf" (transformers), "trl"} and the versions."""
    st = package_status()
    print("packages: " + ", ".join(f"{k} {v}" if v else f"{k} MISSING" for k, v in st.items()), flush=True)
    missing = [k for k in need if not st[k]]
    if missing:
        print(f"ERROR: llama4dpo needs {', '.join(missing)} here (pip install {' '.join(missing)}); nothing can be "
              "measured.", flush=True)
        sys.exit(3)
    if not st["tqdm"]:
        print("NOTE: tqdm is missing: a stub stands in (the trainer imports it for its progress bar only).")
    can = {"ours": True, "hf": bool(st["transformers"]), "versions": st,
           "trl": all(st[k] for k in ("transformers", "trl", "datasets", "accelerate", "tokenizers"))}
    if not can["hf"]:
        print("NOTE: transformers is missing: only llama4dpo is measured (pip install transformers for the "
              "comparison).", flush=True)
    else:
        import transformers
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    if device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            print(f"ERROR: --device {device} but torch {torch.__version__} sees no CUDA device "
                  f"(a CPU-only build? torch.version.cuda={torch.version.cuda}).", flush=True)
            sys.exit(3)
        print(f"device: {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}", flush=True)
    return can


# ---- measurement -------------------------------------------------------------------------------------------
def rss_bytes() -> int:
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def sync(device) -> None:
    if str(device).startswith("cuda"):
        import torch
        torch.cuda.synchronize()


def autocast(precision: str, device: str):
    import contextlib
    import torch
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


QUIET = 0.25  # a step is "quiet" when other processes used less than this many cores during it


class StepClock:
    """Wall time of each interval between ticks, and how many cores OTHER processes used meanwhile (the shared
    machine's load: /proc/stat's busy time less this process's own, as `train.threads=auto` reads it; 0 off
    Linux)."""

    def __init__(self, device="cpu"):
        self.device, self.times, self.others = device, [], []
        self.start()

    def start(self):
        from llama4dpo.runtime.threads import Reading
        self.reading = Reading()
        self.reading.begin()

    def tick(self):
        sync(self.device)
        self.reading.end(0)
        self.times.append(self.reading.wall)
        self.others.append(self.reading.cores_used)
        self.start()


def quiet_median(times: list[float], others: list[float], min_quiet: int = 3) -> tuple[float, int]:
    """Median over the steps during which other processes were (nearly) idle when there are at least
    `min_quiet` of them, else over all steps; returns (median, number of quiet steps)."""
    quiet = [t for t, o in zip(times, others) if o < QUIET]
    return statistics.median(quiet if len(quiet) >= min_quiet else times), len(quiet)


def quiet_median_time(fn, warmup: int, repeat: int, device="cpu") -> float:
    """Median wall seconds of fn() after warm-up, over its quiet calls when at least half are quiet."""
    for _ in range(warmup):
        fn()
    clock = StepClock(device)
    for _ in range(repeat):
        clock.start()
        fn()
        clock.tick()
    return quiet_median(clock.times, clock.others, min_quiet=max(2, repeat // 2))[0]


def median_time(fn, *, warmup: int = 3, repeat: int = 10) -> float:
    """Median wall seconds of fn() after warm-up (plain: every call counts)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_peak(device: str, dtypes: list[str], sizes: list[int]) -> dict[str, float]:
    """Best achieved FLOP/s of square matmuls per dtype (the machine's measured peak for the MFU columns)."""
    import torch
    out = {}
    for name in dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        best = 0.0
        for n in sizes:
            a = torch.randn(n, n, device=device).to(dtype)
            b = torch.randn(n, n, device=device).to(dtype)
            best = max(best, 2 * n**3 / quiet_median_time(lambda: a @ b, warmup=2, repeat=5, device=device))
        out[name] = best
    return out


def measure_peak(device: str, quick: bool) -> dict[str, float]:
    cuda = device.startswith("cuda")
    sizes = [512, 1024] if quick else [4096, 8192] if cuda else [1024, 2048]
    peak = matmul_peak(device, ["bf16"] if cuda else ["fp32", "bf16"], sizes)
    print("matmul peak: " + ", ".join(flops_str(k, v) for k, v in peak.items()), flush=True)
    return peak


def flops_str(name: str, v: float) -> str:
    return f"{name} {v / 1e12:,.1f} TFLOP/s" if v >= 1e12 else f"{name} {v / 1e9:,.1f} GFLOP/s"


def mfu(flops: float, peak: dict, precision: str) -> str:
    pk = peak.get(precision) or peak.get("bf16")
    if not pk:
        return "-"
    x = 100 * flops / pk
    return f"{x:.1f}%" if x >= 1 else f"{x:.2f}%" if x >= 0.01 else f"{x:.1e}%"


def fmt(x, nd=0) -> str:
    return "-" if x is None else f"{x:,.{nd}f}"


# ---- subprocess workers ------------------------------------------------------------------------------------
def run_worker(script: Path, spec: dict, timeout: float) -> dict:
    """Run `python SCRIPT --worker SPEC` in a fresh process (its own memory peak); its last `RESULT {json}` line
    is the result, else an error naming the tail of its output."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), str(HERE), os.environ.get("PYTHONPATH", "")]),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1", WANDB_DISABLED="true")
    t = time.perf_counter()
    head = {k: spec[k] for k in ("setting", "experts") if k in spec}
    try:
        p = subprocess.run([sys.executable, str(script), "--worker", json.dumps(spec)], capture_output=True,
                           text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(head, error=f"timed out after {timeout:.0f} s")
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT "):]), wall_s=time.perf_counter() - t)
    tail = (p.stderr or p.stdout).strip().splitlines()[-15:]
    return dict(head, error=" | ".join(tail)[-1500:])


def worker_main(fn, spec_json: str) -> None:
    import warnings
    warnings.filterwarnings("ignore")
    print("RESULT " + json.dumps(fn(json.loads(spec_json))), flush=True)


# ---- command line shared by the benchmark scripts ------------------------------------------------------------
def add_common_args(p: argparse.ArgumentParser, presets) -> None:
    p.add_argument("--preset", choices=sorted(presets), default=None, help="15m (CPU default), 100m (GPU), tiny")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, or auto")
    p.add_argument("--experts", default=None, help="comma list of expert counts (default: the preset's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--quick", action="store_true", help="smoke mode: tiny model, fewest steps, 1 thread; writes "
                   "nothing to BENCHMARKS.md")
    p.add_argument("--skip-peak", action="store_true", help="do not measure the matmul peak (no MFU column)")
    p.add_argument("--workdir", default=None, help="keep the checkpoints here (reused by the next script given "
                   "the same folder) instead of a temporary folder")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    p.add_argument("--json", default=None, help="also write all results as JSON here")
    p.add_argument("--md", default=None, help="also write the markdown report here")


def setup(args) -> tuple[str, Path]:
    """Threads, device and preset from the common flags; returns (machine description, work folder)."""
    import atexit
    import shutil
    import tempfile
    import torch
    if args.quick and args.threads is None:
        args.threads = 1  # smoke mode: one thread keeps it fast and steady on a loaded machine
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device.startswith("cuda")
    args.preset = args.preset or ("tiny" if args.quick else "100m" if cuda else "15m")
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="l4d_bench_"))
        atexit.register(shutil.rmtree, work, True)  # checkpoints: ~120 MB (15m) to ~4 GB (100m) a run
    mach = (torch.cuda.get_device_name(0) if cuda else f"CPU {os.cpu_count()} cores, {torch.get_num_threads()} "
            "torch threads") + f", torch {torch.__version__}"
    return mach, work


def command(script: str) -> str:
    """This run's command line, without the output flags (--json, --md, --no-write, --workdir)."""
    skip = {"--json", "--md", "--workdir", "--keep"}
    argv, cmd = sys.argv[1:], []
    while argv:
        a = argv.pop(0)
        if a in skip:
            argv.pop(0) if argv else None
        elif a != "--no-write" and not any(a.startswith(o + "=") for o in skip):
            cmd.append(a if a else '""')
    return " ".join([f"python benchmarks/{script}"] + cmd)


def machine() -> str:
    import torch
    return f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def markdown_table(header: list[str], rows: list[list], align: str | None = None) -> str:
    lines = ["| " + " | ".join(header) + " |", align or "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def shared_machine_note(res: dict) -> str:
    return (f"The machine is shared ({os.cpu_count()} cores; 1-minute load average {res['load_start']:.1f} at the "
            f"start, {res['load_end']:.1f} at the end of this run): absolute numbers drift between runs, the ratios "
            f"are measured side by side in one run. With {res['threads']} torch threads.")


def finish(args, results: dict, report: str) -> None:
    """Print the report; write --json / --md; replace this script's section of BENCHMARKS.md unless --no-write,
    --quick, or a GPU run (GPU numbers go into the GPU section, through gpu.sh)."""
    print("\n" + report, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str) + "\n")
    if args.md:
        Path(args.md).write_text(report + "\n")
    if args.no_write or args.quick:
        return
    if not args.device.startswith("cpu"):
        print("not written to BENCHMARKS.md: GPU numbers go into its GPU section (bash benchmarks/gpu.sh)", flush=True)
        return
    from report import write_section
    write_section(report)
    print(f"replaced the section {report.splitlines()[0]!r} of BENCHMARKS.md", flush=True)
