"""The model-side CLI: info, export-hf, import-hf, and one-line errors for a user's mistakes."""

import subprocess
import sys

import pytest
import torch

from llama4dpo import Config, LlamaModel, load_model, save_model
from llama4dpo.cli import main


@pytest.fixture()
def ckpt(tmp_path):
    cfg = Config.load("configs/tiny.toml", ["model.vocab_size=40"])
    model = LlamaModel(cfg.model).init_weights(seed=0)
    return save_model(tmp_path / "ckpt", model, cfg), model


def test_info_reports_counts(ckpt, capsys):
    path, model = ckpt
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    total, active = model.num_params()
    assert f"{total:,}" in out and f"{active:,}" in out and "4 routed (top-1)" in out


def test_save_load_round_trip(ckpt):
    path, model = ckpt
    loaded = load_model(path)
    x = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    assert loaded(x).shape == (2, 9, 40)


def test_export_import_cli_round_trip(ckpt, tmp_path):
    path, model = ckpt
    assert main(["export-hf", str(path), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "model.safetensors").is_file()
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back = load_model(tmp_path / "back")
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


@pytest.mark.parametrize("argv, message", [
    (["info", "no/such/dir"], "no such checkpoint directory"),
    (["export-hf", "no/such/dir", "out"], "no such checkpoint directory"),
    (["import-hf", ".", "out"], "no config.json"),
])
def test_user_mistakes_are_one_line_errors(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_corrupt_weights_are_one_line_error(ckpt, capsys):
    path, _ = ckpt
    (path / "model.safetensors").write_bytes(b"garbage")
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and ("corrupted" in err or "truncated" in err)


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "llama4dpo", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "export-hf" in out.stdout and "info" in out.stdout
