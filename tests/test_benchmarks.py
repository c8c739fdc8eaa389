"""The GPU benchmark script keeps working: its CPU smoke mode runs the whole comparison on a tiny model."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def test_gpu_script_smoke_mode_runs_and_prints_the_tables(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--smoke"], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for heading in ("### DPO training step", "### Model forward + backward alone", "### Generation"):
        assert heading in r.stdout
    assert "llama4dpo Trainer" in r.stdout
    assert (tmp_path / "gpu_dpo_speed.md").is_file() and (tmp_path / "gpu_dpo_speed.json").is_file()


def test_decode_bound_runs_and_counts_the_experts_it_read():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode_bound.py"), "--new-tokens", "2",
                        "--repeat", "1", "--no-write"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| 1 | llama4dpo |" in r.stdout and "| 8 | transformers |" in r.stdout
    # batch 1, top-1: each MoE layer of a decode step reads exactly one expert's weights
    assert "(1.00 experts per MoE layer per step)" in r.stdout


@pytest.mark.slow
def test_decode_check_finds_compiled_decoding_exact_in_fp32():
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode_check.py"), "--steps", "4", "--experts", "4"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    fp32 = next(line for line in r.stdout.splitlines() if line.startswith("torch.float32"))
    assert "argmax agrees 4/4" in fp32 and "tokens equal 1.00" in fp32, r.stdout


@pytest.mark.parametrize("flag", [["--repeat", "0"], ["--weights", "fp16"]])
def test_generation_benchmark_refuses_a_bad_flag_in_one_line(flag):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "generation.py"), *flag],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"generation.py: error: {flag[0]}")


def test_finite_check_times_the_step_with_and_without_the_check():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "finite_check.py"), "--rounds", "1", "--steps", "2",
                        "--experts", "4", "--no-write"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    row = next(line for line in r.stdout.splitlines() if line.startswith("| 15m, E=4"))
    assert len(row.split("|")) == 9 and "%)" in row


@pytest.mark.slow
def test_lora_speed_quick_mode_compares_lora_with_full_dpo_and_trl_peft():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lora_speed.py"), "--quick"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith(("| tiny-dense |", "| tiny |"))]
    assert rows and not any("failed" in row for row in rows), r.stdout[-3000:]
    for row in ("| tiny-dense | llama4dpo full DPO (fp32) |", "| tiny-dense | llama4dpo LoRA (fp32) |",
                "| tiny | llama4dpo full DPO (fp32) |", "| tiny | llama4dpo LoRA (fp32) |"):
        assert any(line.startswith(row) for line in rows), row
    assert "tiny: llama4dpo LoRA (fp32) / llama4dpo full DPO (fp32): peak memory" in r.stdout
    if importlib.util.find_spec("peft") and importlib.util.find_spec("trl"):
        assert any(line.startswith("| tiny-dense | TRL + PEFT LoRA (fp32) |") for line in rows)
        assert "tiny-dense: llama4dpo LoRA vs TRL + PEFT LoRA, each at its fastest" in r.stdout


@pytest.mark.slow
def test_dense_benchmark_smoke_mode_measures_both_sides(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dense_speed.py"), "--quick", "--skip-peak",
                        "--settings", "ours-fp32,trl-fp32", "--batches", "1", "--weights", "fp32",
                        "--json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "### DPO training step" in r.stdout and "### Greedy generation" in r.stdout
    assert "| llama4dpo Trainer (fp32) |" in r.stdout and "| TRL DPOTrainer (fp32) |" in r.stdout
    assert "- both fp32: tokens/s **" in r.stdout and "- batch 1, each at its fastest" in r.stdout
    assert "### Where a compiled decoding step's time goes" in r.stdout and "| weight products" in r.stdout


@pytest.mark.slow
def test_threads_benchmark_smoke_mode_compares_auto_with_fixed_counts():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "threads_load.py"), "--quick",
                        "--workloads", "demo-pretrain"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "one busy process beside it: auto **" in r.stdout and "quiet: auto **" in r.stdout
