"""Attacks on checkpoints: crafted training state that passes torch.load(weights_only=True) and a rewritten
manifest, symbolic links, weights that are not finite floats, a tokenizer larger than the model.

A crafted file is refused with one line (exit 2) before any of it reaches the model or the optimizer."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama4dpo.checkpoint import write_manifest
from llama4dpo.cli import main
from llama4dpo.checkpoint.state import checkpoint_dirs

from _attack import one_line_error, pretrain


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("attack") / "run"
    assert pretrain(run) == 0  # checkpoints at steps 2 and 4, and final/
    return run


@pytest.fixture()
def run(trained, tmp_path):
    """A copy of the trained run whose only checkpoint is its latest (the one each test plants)."""
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    for old in checkpoint_dirs(copy)[:-1]:
        shutil.rmtree(old)
    return copy


def plant(ckpt, name, content) -> None:
    """Replace one file and rewrite the manifest to match, as an attacker with write access would."""
    path = ckpt / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, dict) and name.endswith(".json"):
        path.write_text(json.dumps(content))
    else:
        torch.save(content, path)
    (ckpt / "manifest.json").unlink()
    write_manifest(ckpt)


def resume_cli(run, *extra):
    """Resume in a separate process: memory corruption must not take the test runner down with it."""
    return subprocess.run([sys.executable, "-m", "llama4dpo", "pretrain", "--config", "tiny", "--quiet",
                           "--data", "builtin:assistant", "--out", str(run), "train.max_steps=6",
                           "train.save_every=2", *extra], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("moment, message", [
    (lambda shape: torch.zeros(3), "exp_avg has shape (3,)"),  # the fused CPU kernel would write past it
    (lambda shape: torch.zeros(1).expand(shape), "exp_avg is not a contiguous tensor"),  # right shape, 4 bytes
])
def test_a_crafted_exp_avg_is_refused_before_the_fused_adamw(run, moment, message):
    latest = checkpoint_dirs(run)[-1]
    blob = torch.load(latest / "optimizer.pt", weights_only=True)
    name = "embed_tokens.weight"
    entry = blob["optimizer"]["state"][name]
    entry["exp_avg"] = moment(entry["exp_avg"].shape)
    plant(latest, "optimizer.pt", blob)
    result = resume_cli(run)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert f"{name}.{message}" in result.stderr


def _optimizer_blob(run):
    return torch.load(checkpoint_dirs(run)[-1] / "optimizer.pt", weights_only=True)


def _edit_state(blob, key, value):
    first = next(iter(blob["optimizer"]["state"].values()))
    first[key] = value
    return blob


def _drop_state(blob, key):
    del next(iter(blob["optimizer"]["state"].values()))[key]
    return blob


CRAFTED_OPTIMIZER = {
    "not a dict": lambda b: torch.zeros(2),
    "no rng": lambda b: {"optimizer": b["optimizer"]},
    "garbled rng": lambda b: {**b, "rng_cpu": torch.zeros(7)},
    "rng of floats": lambda b: {**b, "rng_cpu": b["rng_cpu"].float()},
    "rng not contiguous": lambda b: {**b, "rng_cpu": torch.stack([b["rng_cpu"], b["rng_cpu"]], 1)[:, 0]},
    "missing moment": lambda b: _drop_state(b, "exp_avg"),
    "amsgrad's extra moment": lambda b: _edit_state(b, "max_exp_avg_sq", next(iter(
        b["optimizer"]["state"].values()))["exp_avg_sq"].clone()),
    "more updates than steps": lambda b: _edit_state(b, "step", torch.tensor(50.0)),
    "fractional step": lambda b: _edit_state(b, "step", torch.tensor(1.5)),
    "no state": lambda b: {**b, "optimizer": {"param_groups": b["optimizer"]["param_groups"]}},
    "unknown parameter": lambda b: {**b, "optimizer": {**b["optimizer"], "state": {"x.weight": {}}}},
    "integer moment": lambda b: _edit_state(b, "exp_avg_sq", torch.zeros(1, dtype=torch.int64)),
    "NaN moment": lambda b: _edit_state(b, "exp_avg", torch.full_like(
        next(iter(b["optimizer"]["state"].values()))["exp_avg"], float("nan"))),
    "negative step": lambda b: _edit_state(b, "step", torch.tensor(-5.0)),
    "groups swapped": lambda b: {**b, "optimizer": {**b["optimizer"], "param_groups":
                                                    b["optimizer"]["param_groups"][::-1]}},
}


@pytest.mark.parametrize("case", sorted(CRAFTED_OPTIMIZER))
def test_crafted_optimizer_state_is_one_line(run, case, capsys):
    plant(checkpoint_dirs(run)[-1], "optimizer.pt", CRAFTED_OPTIMIZER[case](_optimizer_blob(run)))
    assert pretrain(run, "train.max_steps=6") == 2
    assert "optimizer.pt" in one_line_error(capsys)


def test_hyperparameters_come_from_the_config_not_the_file(run, capsys):
    """A string lr or NaN betas in optimizer.pt is not used: the run's config (which a resume cannot change)
    sets them, so the crafted values cannot crash the step or poison the weights."""
    blob = _optimizer_blob(run)
    blob["optimizer"]["param_groups"] = [{**g, "lr": "fast", "betas": (float("nan"), 2.0), "amsgrad": True}
                                         for g in blob["optimizer"]["param_groups"]]
    plant(checkpoint_dirs(run)[-1], "optimizer.pt", blob)
    assert pretrain(run, "train.max_steps=6") == 0
    weights = load_file(str(run / "final" / "model.safetensors"))
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())


def test_an_unreadable_reference_cache_is_recomputed(tmp_path):
    from llama4dpo.train.recipes import _read_cache, _write_cache

    cache = tmp_path / "ref_logps_train.safetensors"
    _write_cache(cache, {"sums": torch.zeros(3), "counts": torch.ones(3)}, "k1")
    assert _read_cache(cache, "k1") and not _read_cache(cache, "k2")
    cache.write_bytes(cache.read_bytes()[:20])  # truncated (a full disk in an older version)
    assert not _read_cache(cache, "k1")
    assert not list(tmp_path.glob(".*"))  # no temporary left beside it


@pytest.mark.parametrize("step", [10_000_000, -100, "4", 3, None])
def test_tampered_trainer_state_step_is_refused(run, step, capsys):
    latest = checkpoint_dirs(run)[-1]
    state = json.loads((latest / "trainer_state.json").read_text())
    plant(latest, "trainer_state.json", {**state, "step": step})
    assert pretrain(run, "train.max_steps=6") == 2
    assert "trainer_state.json says step" in one_line_error(capsys)
    assert [p.name for p in (run / "checkpoints").iterdir()] == [latest.name]  # no step--000095 written


def test_tampered_metric_window_is_refused(run, capsys):
    latest = checkpoint_dirs(run)[-1]
    state = json.loads((latest / "trainer_state.json").read_text())
    plant(latest, "trainer_state.json", {**state, "window": {"loss": "lots"}})
    assert pretrain(run, "train.max_steps=6") == 2
    assert "metric window" in one_line_error(capsys)


def test_a_checkpoint_past_max_steps_is_refused_not_silently_done(run, capsys):
    latest = checkpoint_dirs(run)[-1]
    state = json.loads((latest / "trainer_state.json").read_text())
    renamed = latest.parent / "step-9999999"
    latest.rename(renamed)
    plant(renamed, "trainer_state.json", {**state, "step": 9999999})
    assert pretrain(run, "train.max_steps=6") == 2
    assert "past train.max_steps=6" in one_line_error(capsys)


def test_foreign_names_under_checkpoints_are_ignored(run):
    weird = run / "checkpoints" / "step--000095"
    shutil.copytree(checkpoint_dirs(run)[-1], weird)
    assert pretrain(run, "train.max_steps=6") == 0
    assert [c.name for c in checkpoint_dirs(run)] == ["step-0000004", "step-0000006"]


def test_resume_refuses_a_checkpoint_without_manifest_and_says_how_to_trust_it(run, capsys):
    (checkpoint_dirs(run)[-1] / "manifest.json").unlink()
    assert pretrain(run, "train.max_steps=6") == 2
    err = one_line_error(capsys)
    assert "no manifest.json" in err and "llama4dpo manifest" in err
    assert main(["manifest", str(checkpoint_dirs(run)[-1])]) == 0  # the user vouches for it
    assert pretrain(run, "train.max_steps=6") == 0


def test_a_symlink_in_a_checkpoint_is_refused(tmp_path, trained, capsys):
    ckpt = tmp_path / "final"
    shutil.copytree(trained / "final", ckpt)
    secret = tmp_path / "id_ed25519"
    secret.write_text("PRIVATE KEY")
    (ckpt / "tokenizer.json").unlink()
    (ckpt / "tokenizer.json").symlink_to(secret)
    (ckpt / "manifest.json").unlink()  # a checkpoint without a manifest still loads for inference
    for argv in (["info", str(ckpt)], ["generate", "--model", str(ckpt), "--prompt", "hi", "--max-new-tokens", "2"]):
        assert main(argv) == 2
        assert "symbolic link" in one_line_error(capsys)


@pytest.mark.parametrize("bad", ["int64", "bool", "nan", "inf"])
def test_weights_must_be_finite_floats(tmp_path, trained, bad, capsys, monkeypatch):
    ckpt = tmp_path / "final"
    shutil.copytree(trained / "final", ckpt)
    sd = load_file(str(ckpt / "model.safetensors"))
    w = sd["norm.weight"]
    sd["norm.weight"] = {"int64": w.long(), "bool": w > 0, "nan": w.clone().fill_(float("nan")),
                         "inf": w.clone().fill_(float("inf"))}[bad]
    save_file(sd, str(ckpt / "model.safetensors"))
    (ckpt / "manifest.json").unlink()
    write_manifest(ckpt)
    assert main(["info", str(ckpt)]) == 2
    assert "norm.weight" in one_line_error(capsys)
    if bad in ("nan", "inf"):  # the flag that lets a diverged model be inspected
        monkeypatch.setenv("LLAMA4DPO_ALLOW_NONFINITE", "1")
        assert main(["info", str(ckpt)]) == 0


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, trained, capsys):
    ckpt = tmp_path / "final"
    shutil.copytree(trained / "final", ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["model"]["vocab_size"] -= 5  # (weights cut to match: the model is consistent, its tokenizer is not)
    (ckpt / "config.json").write_text(json.dumps(config))
    sd = load_file(str(ckpt / "model.safetensors"))
    sd = {k: v[:-5] if k in ("embed_tokens.weight", "lm_head.weight") else v for k, v in sd.items()}
    save_file(sd, str(ckpt / "model.safetensors"))
    (ckpt / "manifest.json").unlink()
    assert main(["generate", "--model", str(ckpt), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    assert "more than the model's vocab_size" in one_line_error(capsys)
