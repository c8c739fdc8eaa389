"""A real full disk and a real read-only folder: small tmpfs mounts (root only; skipped with the reason
elsewhere). Every write error is one line naming the path and the cause; the last good checkpoint survives,
and resuming after space is freed ends bitwise equal to a run that never failed."""

import errno
import os
import subprocess
import uuid

import pytest
from safetensors.torch import load_file

from llama4dpo.checkpoint import verify_manifest
from llama4dpo.checkpoint import state as state_module
from llama4dpo.checkpoint.state import checkpoint_dirs
from llama4dpo.train.trainer import Trainer

from _attack import one_line_error, pretrain

STEPS = ["train.max_steps=8", "train.save_every=4"]


@pytest.fixture()
def small_disk(tmp_path):
    """A 32 MiB tmpfs of its own, unmounted after the test."""
    where = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(where)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def fill(where, ballast) -> None:
    """Take every free byte of the file system holding `where`."""
    with open(ballast, "wb", buffering=0) as f:
        block = b"\0" * (1 << 20)
        try:
            while True:
                f.write(block)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
        try:
            while True:  # the last partial megabyte, by smaller writes
                f.write(b"\0" * 4096)
                f.flush()
        except OSError:
            pass


@pytest.mark.parametrize("full_before", ["weights", "optimizer"])  # safetensors' error, then torch.save's
def test_a_real_full_disk_is_one_line_and_resume_is_bitwise_equal(small_disk, tmp_path, monkeypatch, capsys,
                                                                   full_before):
    assert pretrain(tmp_path / "reference", *STEPS) == 0
    run, ballast = small_disk / "run", small_disk / "ballast"
    real_save, real_write = Trainer.save, state_module.write_model_files

    def save_on_a_full_disk(self):
        if self.step == 8 and full_before == "weights":
            fill(small_disk, ballast)
        return real_save(self)

    def write_then_fill(directory, *args, **kwargs):
        real_write(directory, *args, **kwargs)
        if "step-0000008" in directory.name and full_before == "optimizer":
            fill(small_disk, ballast)

    monkeypatch.setattr(Trainer, "save", save_on_a_full_disk)
    monkeypatch.setattr(state_module, "write_model_files", write_then_fill)
    assert pretrain(run, *STEPS) == 2
    err = one_line_error(capsys)
    assert f"could not write checkpoint {run / 'checkpoints' / 'step-0000008'}" in err
    assert "No space left on device" in err and "Last good checkpoint:" in err and "step-0000004" in err
    assert [c.name for c in checkpoint_dirs(run)] == ["step-0000004"]
    verify_manifest(checkpoint_dirs(run)[0], required=True)
    assert not list((run / "checkpoints").glob(".*"))  # no temporary left behind
    assert not (run / "final").exists()

    monkeypatch.undo()
    ballast.unlink()  # space freed: resume
    assert pretrain(run, *STEPS) == 0
    ours, theirs = (load_file(str(r / "final" / "model.safetensors")) for r in (run, tmp_path / "reference"))
    assert ours.keys() == theirs.keys() and all((ours[k] == theirs[k]).all() for k in ours)


def test_a_read_only_run_directory_is_one_line(small_disk, capsys):
    run = small_disk / "run"
    assert pretrain(run, *STEPS) == 0
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    assert pretrain(run, "train.max_steps=12", "train.save_every=4") == 2  # resuming needs to write
    err = one_line_error(capsys)
    assert str(run) in err and "Read-only file system" in err
    assert pretrain(small_disk / "fresh", *STEPS) == 2  # a new run cannot even make its folder
    err = one_line_error(capsys)
    assert str(small_disk / "fresh") in err and "Read-only file system" in err


@pytest.mark.parametrize("command", ["export-hf", "import-hf"])
def test_export_and_import_onto_a_full_disk_are_one_line(small_disk, tmp_path, command, capsys):
    from llama4dpo.cli import main

    assert pretrain(tmp_path / "run", "train.max_steps=2", "train.save_every=2") == 0
    source = tmp_path / "run" / "final"
    if command == "import-hf":
        assert main(["export-hf", str(source), str(tmp_path / "hf")]) == 0
        source = tmp_path / "hf"
    fill(small_disk, small_disk / "ballast")
    out = small_disk / "out"
    assert main([command, str(source), str(out)]) == 2
    err = one_line_error(capsys)
    assert str(out) in err and "No space left on device" in err
    assert not out.exists() and [p.name for p in small_disk.iterdir()] == ["ballast"]  # no temporary left
