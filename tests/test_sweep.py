"""`llama4dpo sweep` end to end on a tiny model: a 2 x 2 grid writes results.jsonl and frontier.png, computes the
reference table once for all runs, and a SIGKILLed sweep continues without redoing its finished runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llama4dpo.cli import main
from llama4dpo.sweep import split_grid
from llama4dpo.train import recipes

TINY = str(Path(__file__).parent.parent / "configs" / "tiny.toml")
GRID = ["dpo.loss_type=[sigmoid,ipo]", "dpo.beta=[0.1,0.5]"]


@pytest.fixture
def base(tiny_base):
    return tiny_base


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_a_2x2_grid_shares_one_reference_table(base, tmp_path, monkeypatch, capsys):
    calls = []
    real = recipes.precompute_reference_logps

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(recipes, "precompute_reference_logps", counting)
    assert main(["sweep", "--init", str(base), "--out", str(tmp_path / "sweep"), "--quick", "--quiet", *GRID]) == 0
    assert len(calls) == 2  # the train and eval tables, once, for the four runs
    rows = rows_of(tmp_path / "sweep")
    runs = {r["run"] for r in rows}
    assert runs == {f"loss_type={t},beta={b}" for t in ("sigmoid", "ipo") for b in ("0.1", "0.5")}
    assert all(len([r for r in rows if r["run"] == run]) >= 3 for run in runs)  # a curve per run
    assert {r["beta"] for r in rows} == {0.1, 0.5} and {r["loss_type"] for r in rows} == {"sigmoid", "ipo"}
    assert all(0 <= r["reward"] <= 1 and r["prompts"] == 8 for r in rows)
    assert (tmp_path / "sweep" / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "| run | step | reward |" in out and "4 runs" in out


def test_a_killed_sweep_continues_without_redoing_finished_runs(base, tmp_path):
    args = [sys.executable, "-m", "llama4dpo", "sweep", "--init", str(base), "--out", str(tmp_path / "sweep"),
            "--quick", "--quiet", *GRID]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "LLAMA4DPO_FAULT": "sweep_run:2"}
    killed = subprocess.run(args, env=env, capture_output=True, text=True)
    assert killed.returncode == -9
    before = rows_of(tmp_path / "sweep")
    assert len({r["run"] for r in before}) == 2
    finished = {r["run"]: (tmp_path / "sweep" / "runs" / r["run"] / "metrics.jsonl").stat().st_mtime_ns for r in before}
    env.pop("LLAMA4DPO_FAULT")
    again = subprocess.run(args, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "2 done already" in again.stdout
    after = rows_of(tmp_path / "sweep")
    assert after[:len(before)] == before and len({r["run"] for r in after}) == 4
    for run, mtime in finished.items():  # not trained again
        assert (tmp_path / "sweep" / "runs" / run / "metrics.jsonl").stat().st_mtime_ns == mtime


def test_list_fields_are_values_and_other_lists_are_axes():
    fixed, axes = split_grid(["lora.targets=[attention,mlp]", "dpo.beta=[0.1, 0.3]", "train.lr=1e-4"])
    assert fixed == ["lora.targets=[attention,mlp]", "train.lr=1e-4"] and axes == [("dpo.beta", ["0.1", "0.3"])]


@pytest.mark.parametrize("args, message", [
    (["dpo.loss_type=[sigmoid,kto]"], "unpaired"),
    (["dpo.beta=[]"], "holds no value"),
])
def test_bad_grids_are_one_line_errors(base, tmp_path, capsys, args, message):
    assert main(["sweep", "--init", str(base), "--out", str(tmp_path / "s"), "--quick", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_a_source_without_a_reward_is_refused_before_training(base, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Hi {i}?", "chosen": "Hello.", "rejected": "Go."}) + "\n"
                             for i in range(20)))
    assert main(["sweep", "--init", str(base), "--data", str(pairs), "--out", str(tmp_path / "s"), "--quick"]) == 2
    assert "no program-computed reward" in capsys.readouterr().err
    assert not (tmp_path / "s" / "runs").exists()


def test_a_sweep_runs_under_torchrun(base, tmp_path):
    """Two processes train every run (DDP); the first evaluates and writes each run's rows once."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
    env.pop("LLAMA4DPO_FAULT", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "llama4dpo",
           "sweep", "--init", str(base), "--out", str(tmp_path / "sweep"), "--quick", "--quiet",
           "dpo.beta=[0.1,0.5]", "train.device=cpu"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = rows_of(tmp_path / "sweep")
    assert {r["run"] for r in rows} == {"beta=0.1", "beta=0.5"}
    assert len(rows) == len({(r["run"], r["step"]) for r in rows})  # each point written once
    assert done.stdout.count("| run | step | reward |") == 1


def test_a_run_whose_rows_were_cut_is_redone_and_written_once(base, tmp_path):
    args = ["sweep", "--init", str(base), "--out", str(tmp_path / "sweep"), "--quick", "--quiet", "dpo.beta=[0.1,0.5]"]
    assert main(args) == 0
    rows = rows_of(tmp_path / "sweep")
    cut = [r for r in rows if r["run"] == "beta=0.1"][:-1] + [r for r in rows if r["run"] == "beta=0.5"]
    (tmp_path / "sweep" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cut))
    assert main(args) == 0
    again = rows_of(tmp_path / "sweep")
    assert sorted((r["run"], r["step"]) for r in again) == sorted((r["run"], r["step"]) for r in rows)
