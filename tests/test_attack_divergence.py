"""A run that diverges stops with one line and publishes nothing non-finite: no final/, and every checkpoint
on disk holds finite tensors only (each guard tested on its own: the weights after an update, eval metrics,
and the write itself)."""

import pytest
import torch
from safetensors.torch import load_file

from llama4dpo.checkpoint.state import checkpoint_dirs
from llama4dpo.train.trainer import Trainer

from _attack import one_line_error, pretrain

EXPLODE = ["train.lr=1e39", "train.warmup_steps=0"]


def all_finite(ckpt) -> bool:
    weights = load_file(str(ckpt / "model.safetensors"))
    optim = torch.load(ckpt / "optimizer.pt", weights_only=True)["optimizer"]["state"]
    tensors = [*weights.values(), *(t for s in optim.values() for t in s.values())]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def test_an_exploding_update_publishes_no_final_model(tmp_path, capsys):
    run = tmp_path / "run"
    assert pretrain(run, *EXPLODE, "train.max_steps=1") == 2
    err = one_line_error(capsys)
    assert "non-finite weights after step 1" in err and "Last good checkpoint: none" in err
    assert not (run / "final").exists() and not checkpoint_dirs(run)


@pytest.mark.parametrize("lr", [["train.lr=1e39", "train.warmup_steps=0"], ["train.lr=1e9", "train.warmup_steps=2"]])
def test_with_save_every_step_every_checkpoint_on_disk_is_finite(tmp_path, capsys, lr):
    run = tmp_path / "run"
    assert pretrain(run, *lr, "train.max_steps=6", "train.save_every=1") == 2
    err = one_line_error(capsys)
    assert "non-finite" in err
    saved = checkpoint_dirs(run)
    assert all(all_finite(c) for c in saved)
    named = err.split("Last good checkpoint: ")[1].split(".")[0].split()[0]
    assert named == (str(saved[-1]) if saved else "none")
    assert not (run / "final").exists()


def test_a_non_finite_eval_loss_stops_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Trainer, "check_weights", lambda self: None)  # let the NaN weights reach the eval
    monkeypatch.setattr(Trainer, "_stop_if_nonfinite_weights", lambda self, total: None)
    assert pretrain(tmp_path / "run", *EXPLODE, "train.max_steps=2", "train.eval_every=1") == 2
    err = one_line_error(capsys)
    assert "non-finite eval_" in err and "at step 1" in err


def test_no_checkpoint_is_written_with_a_non_finite_tensor(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Trainer, "check_weights", lambda self: None)  # only the writer's own check is left
    monkeypatch.setattr(Trainer, "_stop_if_nonfinite_weights", lambda self, total: None)
    monkeypatch.setattr(Trainer, "evaluate", lambda self: {})
    run = tmp_path / "run"
    assert pretrain(run, *EXPLODE, "train.max_steps=1") == 2
    err = one_line_error(capsys)
    assert "holds NaN or inf" in err and "not written" in err
    assert not checkpoint_dirs(run) and not (run / "final").exists()
    assert not (run / "checkpoints").exists() or not list((run / "checkpoints").iterdir())  # no temporary left
