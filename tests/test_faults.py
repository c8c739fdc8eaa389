"""Fault injection: real `llama4dpo pretrain` and `dpo` runs killed with SIGKILL on a seeded schedule -
mid-step, mid-evaluation, mid-checkpoint-write and at timed random moments - and resumed each time.

After every kill: the latest checkpoint verifies against its manifest and loads. At the end: final weights
bitwise equal to an uninterrupted run, and metrics.jsonl with every logged step exactly once.
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llama4dpo import load_model
from llama4dpo.checkpoint import verify_manifest
from llama4dpo.cli import main
from llama4dpo.metrics import TIMING_KEYS, read_metrics
from llama4dpo.checkpoint.state import checkpoint_dirs

STEPS, SAVE, EVAL, LOG = 40, 4, 6, 2
ARGS = ["--config", "tiny", "--data", "builtin:assistant", "--quiet", f"train.max_steps={STEPS}",
        f"train.save_every={SAVE}", f"train.eval_every={EVAL}", f"train.log_every={LOG}", "train.keep_last=3"]
KILLS = 10  # hook kills per command; with the timed kills, more than 20 across this file


def schedule(seed: int, n: int) -> list[str]:
    """n fault points at strictly increasing steps: step:N anywhere, save:N / eval:N where they happen."""
    rng = random.Random(seed)
    candidates = [("step", s) for s in range(1, STEPS)]
    candidates += [("save", s) for s in range(SAVE, STEPS, SAVE)] + [("eval", s) for s in range(EVAL, STEPS, EVAL)]
    chosen, used = [], set()
    for kind, step in rng.sample(candidates, len(candidates)):
        if step not in used and len(chosen) < n:
            chosen.append((step, kind))
            used.add(step)
    return [f"{kind}:{step}" for step, kind in sorted(chosen)]


def run(args, fault=None, kill_after=None):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    env.pop("LLAMA4DPO_FAULT", None)
    if fault:
        env["LLAMA4DPO_FAULT"] = fault
    proc = subprocess.Popen([sys.executable, "-m", "llama4dpo", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out + err


def check_latest_checkpoint_loads(run_dir: Path):
    ckpts = checkpoint_dirs(run_dir)
    if ckpts:
        verify_manifest(ckpts[-1], required=True)
        load_model(ckpts[-1])


def logged_steps_ok(rows):
    train = [r["step"] for r in rows if "loss" in r]
    evals = [r["step"] for r in rows if "eval_loss" in r]
    assert train == list(range(LOG, STEPS + 1, LOG)), train
    assert evals == [0] + list(range(EVAL, STEPS + 1, EVAL)) + ([STEPS] if STEPS % EVAL else []), evals


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    root = tmp_path_factory.mktemp("init")
    common = ["--config", "tiny", "--data", "builtin:assistant", "--quiet"]
    assert main(["pretrain", *common, "--out", str(root / "pre"), "train.max_steps=20"]) == 0
    assert main(["sft", *common, "--out", str(root / "sft"), "--init", str(root / "pre"), "train.max_steps=10"]) == 0
    return root / "sft"


@pytest.mark.parametrize("command, seed, timed", [("pretrain", 11, 2), ("dpo", 23, 2)])
def test_killed_again_and_again_resumes_to_the_same_weights(sft, tmp_path, command, seed, timed):
    args = [command, *ARGS] + (["--init", str(sft)] if command == "dpo" else [])
    start = time.perf_counter()
    rc, log = run(args + ["--out", str(tmp_path / "straight")])
    duration = time.perf_counter() - start
    assert rc == 0, log
    target = tmp_path / "killed"
    kills = 0
    for point in schedule(seed, KILLS):
        rc, log = run(args + ["--out", str(target)], fault=point)
        assert rc == -9, f"{point}: {log}"
        kills += 1
        check_latest_checkpoint_loads(target)
        assert not (target / "final").exists()
    rng = random.Random(seed)
    for _ in range(timed):  # then SIGKILL at random moments: start-up, training, evaluating or writing
        rc, log = run(args + ["--out", str(target)], kill_after=rng.uniform(0.3, 0.9) * duration)
        assert rc in (0, -9), log
        check_latest_checkpoint_loads(target)
    rc, log = run(args + ["--out", str(target)])
    assert rc == 0, log
    assert kills >= KILLS
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(target / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = read_metrics(tmp_path / "straight" / "metrics.jsonl"), read_metrics(target / "metrics.jsonl")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]  # noqa: E731
    assert strip(ra) == strip(rb)
    logged_steps_ok(rb)


def test_schedule_covers_every_kind_of_moment():
    points = schedule(11, KILLS) + schedule(23, KILLS)
    assert {p.split(":")[0] for p in points} == {"step", "save", "eval"}
    assert len(points) == 2 * KILLS
