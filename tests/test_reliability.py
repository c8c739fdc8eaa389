"""Checkpoint integrity, safe loading, disk full, run-directory rules, determinism."""

import errno
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llama4dpo import load_model
from llama4dpo.checkpoint import verify_manifest
from llama4dpo.cli import main
from llama4dpo.errors import UserError
from llama4dpo.checkpoint import state as state_module
from llama4dpo.checkpoint.state import checkpoint_dirs

COMMON = ["--config", "tiny", "--data", "builtin:assistant", "--quiet"]


def pretrain(out, *extra):
    return main(["pretrain", *COMMON, "--out", str(out), "train.max_steps=8", "train.save_every=4", *extra])


@pytest.fixture()
def run(tmp_path):
    assert pretrain(tmp_path / "run") == 0
    return tmp_path / "run"


def test_every_checkpoint_has_a_manifest_that_verifies(run):
    for ckpt in [*checkpoint_dirs(run), run / "final"]:
        manifest = json.loads((ckpt / "manifest.json").read_text())
        assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(manifest["files"])
        verify_manifest(ckpt, required=True)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_file_is_a_one_line_error_naming_it(run, damage, capsys):
    f = run / "final" / "model.safetensors"
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        f.write_bytes(data[:-10] + bytes([data[-10] ^ 1]) + data[-9:])
    else:
        f.unlink()
    assert main(["info", str(run / "final")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "model.safetensors" in err


def test_resume_skips_a_corrupted_latest_checkpoint_with_a_warning(run, capsys):
    latest = checkpoint_dirs(run)[-1]
    (latest / "optimizer.pt").write_bytes(b"\0" * 100)
    capsys.readouterr()
    assert pretrain(run, "train.max_steps=12") == 0
    captured = capsys.readouterr()
    assert "skipping damaged checkpoint" in captured.err and "optimizer.pt" in captured.err
    assert "resumed from" in captured.out and "step-0000004" in captured.out


def test_malicious_pickle_in_training_state_is_refused(run, tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    latest = checkpoint_dirs(run)[-1]
    (latest / "optimizer.pt").write_bytes(pickle.dumps({"optimizer": Evil()}))
    # An attacker can also rewrite the manifest: loading must still refuse to unpickle the object.
    from llama4dpo.checkpoint import write_manifest
    (latest / "manifest.json").unlink()
    write_manifest(latest)
    for ckpt in checkpoint_dirs(run)[:-1]:  # leave only the planted checkpoint
        import shutil
        shutil.rmtree(ckpt)
    assert pretrain(run, "train.max_steps=12") == 2
    assert "cannot load training state" in capsys.readouterr().err
    assert not marker.exists()


def test_disk_full_during_checkpoint_leaves_previous_intact(tmp_path, monkeypatch, capsys):
    real_save = torch.save
    calls = {"n": 0}

    def flaky_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint write hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(state_module.torch, "save", flaky_save)
    assert pretrain(tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "could not write checkpoint" in err and "No space left on device" in err and "step-0000004" in err
    ckpts = checkpoint_dirs(tmp_path / "run")
    assert [c.name for c in ckpts] == ["step-0000004"]
    verify_manifest(ckpts[0], required=True)
    assert not list((tmp_path / "run" / "checkpoints").glob(".*tmp*"))


def test_non_empty_foreign_directory_is_refused(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert pretrain(tmp_path / "out") == 2
    assert "holds no llama4dpo run" in capsys.readouterr().err
    assert pretrain(tmp_path / "out", "--overwrite") == 2  # not ours to delete, even when asked
    assert "holds no llama4dpo run" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_resume_with_incompatible_config_names_the_difference(run, capsys):
    assert pretrain(run, "model.hidden_size=64") == 2
    err = capsys.readouterr().err
    assert "model.hidden_size: 32 in the run, 64 now" in err and err.count("\n") == 1


def test_resume_with_other_data_or_init_is_refused(run, tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("some other text " * 200)
    assert main(["pretrain", "--config", "tiny", "--data", str(corpus), "--quiet", "--out", str(run),
                 "train.max_steps=8", "train.save_every=4"]) == 2
    assert "data:" in capsys.readouterr().err


def test_same_seed_same_weights(tmp_path):
    assert pretrain(tmp_path / "a") == 0 and pretrain(tmp_path / "b") == 0
    a = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = pretrain(tmp_path / "c", "train.seed=7")
    assert c == 0
    assert not torch.equal(a["embed_tokens.weight"], load_file(str(tmp_path / "c" / "final" / "model.safetensors"))["embed_tokens.weight"])


def test_zero_valid_pairs_is_a_clear_error(tmp_path, capsys, run):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "x", "rejected": "x"}\n{"prompt": "b", "chosen": null, "rejected": "y"}\n')
    assert main(["dpo", *COMMON[:2], "--data", str(bad), "--quiet", "--init", str(run), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "no usable preference pairs" in err and "identical_responses" in err


def test_out_of_memory_names_the_settings_to_lower(tmp_path, monkeypatch, capsys):
    from llama4dpo.train.trainer import Trainer

    def oom(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "train_step", oom)
    assert pretrain(tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory at step 1") and "train.batch_size" in err and err.count("\n") == 1
