"""Attacks on run directories: --overwrite aimed at what is not a run, concurrent runs, stale locks.

Every refusal is one line, and the folder it names hashes the same before and after."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llama4dpo.cli import main
from llama4dpo.checkpoint import run_dir as run_dir_module

from _attack import one_line_error, pretrain, tree_hash


@pytest.fixture()
def no_deletion(monkeypatch):
    """A safety net for tests that aim --overwrite at real folders (/, home): if the refusal failed, nothing
    is locked or removed there anyway, and the test fails."""
    def refuse(*a, **k):
        raise AssertionError("--overwrite went ahead")
    monkeypatch.setattr(run_dir_module, "lock_run_dir", refuse)
    monkeypatch.setattr(run_dir_module, "remove_run_files", refuse)


def test_overwrite_refuses_the_root(no_deletion, capsys):
    before = sorted(os.listdir("/"))
    assert pretrain("/", "--overwrite") == 2
    assert "root of the file system" in one_line_error(capsys)
    assert sorted(os.listdir("/")) == before


def test_overwrite_refuses_the_home_folder(tmp_path, monkeypatch, no_deletion, capsys):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("secret")
    monkeypatch.setenv("HOME", str(home))
    before = tree_hash(home)
    assert pretrain(home, "--overwrite") == 2
    assert "home folder" in one_line_error(capsys)
    assert tree_hash(home) == before


@pytest.mark.parametrize("out", [".", "..", "../.."])
def test_overwrite_refuses_the_working_folder_and_its_parents(tmp_path, monkeypatch, capsys, out):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    (work / "paper.tex").write_text("draft")
    monkeypatch.chdir(work)
    before = tree_hash(tmp_path)
    assert pretrain(out, "--overwrite") == 2
    assert "working folder" in one_line_error(capsys)
    assert tree_hash(tmp_path) == before


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    out = tmp_path / "project"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = tree_hash(out)
    assert pretrain(out, "--overwrite") == 2
    assert "holds no llama4dpo run" in one_line_error(capsys)
    assert tree_hash(out) == before


def test_overwrite_refuses_a_model_checkpoint(tmp_path, capsys):
    assert pretrain(tmp_path / "run") == 0
    final = tmp_path / "run" / "final"  # config.json beside weights: a checkpoint, not a run
    before = tree_hash(final)
    assert pretrain(final, "--overwrite") == 2
    one_line_error(capsys)
    assert tree_hash(final) == before


def test_overwrite_refuses_a_run_holding_the_data(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 300)
    run = tmp_path / "run"
    assert pretrain(run, data=corpus) == 0
    (run / "corpus.txt").write_bytes(corpus.read_bytes())  # the user keeps the data inside the run folder
    before = tree_hash(run)
    assert pretrain(run, "--overwrite", data=run / "corpus.txt") == 2
    assert "holds --data" in one_line_error(capsys)
    assert tree_hash(run) == before


def test_overwrite_refuses_a_run_holding_the_init_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert pretrain(run) == 0
    before = tree_hash(run)
    assert main(["sft", *["--config", "tiny", "--quiet"], "--data", "builtin:assistant", "--init", str(run / "final"),
                 "--out", str(run), "--overwrite", "train.max_steps=2"]) == 2
    assert "holds --init" in one_line_error(capsys)
    assert tree_hash(run) == before


def test_overwrite_removes_only_the_runs_own_files(tmp_path):
    run = tmp_path / "run"
    assert pretrain(run) == 0
    (run / "notes.txt").write_text("mine")
    (run / "extra").mkdir()
    (run / "extra" / "keep.bin").write_bytes(b"\1\2")
    assert pretrain(run, "--overwrite", "train.seed=3") == 0
    assert (run / "notes.txt").read_text() == "mine" and (run / "extra" / "keep.bin").read_bytes() == b"\1\2"
    assert (run / "final" / "model.safetensors").is_file() and not (run / ".lock").exists()


# ---- the lock ------------------------------------------------------------------------------------------------
HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, b"pid %d on testhost" % os.getpid())
print("held", flush=True)
time.sleep(60)
"""


def test_a_live_run_is_never_joined_or_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    assert pretrain(run) == 0
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = tree_hash(run)
        for extra in ([], ["--overwrite"]):
            assert pretrain(run, "train.max_steps=6", *extra) == 2
            err = one_line_error(capsys)
            assert "another run is using this directory" in err and f"pid {holder.pid}" in err
            assert tree_hash(run) == before
    finally:
        holder.kill()
        holder.wait()
    assert pretrain(run, "train.max_steps=6") == 0  # its holder gone, the lock is stale: taken over


def test_a_stale_lock_file_is_taken_over(tmp_path):
    run = tmp_path / "run"
    assert pretrain(run) == 0
    (run / ".lock").write_text("pid 4194000 on somewhere\n")  # left by a killed run: no process holds it
    assert pretrain(run, "train.max_steps=6") == 0


def test_two_concurrent_runs_into_one_directory(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "llama4dpo", "pretrain", "--config", "tiny", "--quiet", "--data", "builtin:assistant",
           "--out", str(out), "train.max_steps=100000", "train.save_every=50", "train.log_every=10"]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists() and time.time() < deadline:  # the first one is training
            time.sleep(0.1)
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert first.poll() is None  # (still training: the refusal was the lock's)
        assert second.returncode == 2
        assert second.stderr.startswith("error: ") and second.stderr.count("\n") == 1
        assert f"another run is using this directory (pid {first.pid} on" in second.stderr
        while '"tokens_per_s"' not in (out / "metrics.jsonl").read_text() and time.time() < deadline + 120:
            time.sleep(0.1)  # (a loaded machine: let the first run log a step before it is stopped)
    finally:
        first.kill()
        first.wait()
    rows = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"tokens_per_s"' in line]
    steps = [int(r.split('"step": ')[1].split(",")[0]) for r in rows]
    assert steps and steps == sorted(set(steps))  # each step logged once, by the one run


def test_a_symlinked_lock_file_is_refused_and_its_target_untouched(tmp_path, capsys):
    run = tmp_path / "run"
    assert pretrain(run) == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (run / ".lock").symlink_to(victim)
    assert pretrain(run, "train.max_steps=6") == 2
    assert "lock file" in one_line_error(capsys)
    assert victim.read_text() == "precious"


def test_resume_with_overwrite_is_refused_before_anything_is_removed(tmp_path, capsys):
    run = tmp_path / "run"
    assert pretrain(run) == 0
    before = tree_hash(run)
    assert pretrain(run, "--resume", "--overwrite") == 2
    assert "contradict" in one_line_error(capsys)
    assert tree_hash(run) == before


@pytest.mark.parametrize("content", ["{", "[1, 2]"])
def test_a_damaged_run_json_is_one_line(tmp_path, capsys, content):
    run = tmp_path / "run"
    assert pretrain(run) == 0
    (run / "run.json").write_text(content)
    assert pretrain(run, "train.max_steps=6") == 2
    assert "run.json" in one_line_error(capsys)
    assert pretrain(run, "--overwrite", "train.max_steps=6") == 0  # which --overwrite still recognises


def test_a_refused_second_call_leaves_the_first_calls_lock(tmp_path, capsys):
    run = tmp_path / "run"
    assert pretrain(run) == 0
    run_dir_module.lock_run_dir(run)  # this process holds it, as a run in progress would
    try:
        assert pretrain(run, "train.max_steps=6") == 2
        assert "already in use by this process" in one_line_error(capsys)
        assert run_dir_module.holds_run_dir(run) and (run / ".lock").exists()
    finally:
        run_dir_module.release_run_dir(run)
    assert not run_dir_module.holds_run_dir(run)
