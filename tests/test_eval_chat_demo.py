"""eval (JSON keys), generate and chat through the CLI and their I/O functions, and a quick demo run."""

import json
from pathlib import Path

import pytest

from llama4dpo.checkpoint import load_model, load_tokenizer
from llama4dpo.cli import main
from llama4dpo.generate import Sampling
from llama4dpo.repl import chat_session

TINY = ["--config", "tiny", "--data", "builtin:assistant", "--quiet"]
EVAL_KEYS = {"pairs", "reward_accuracy", "reward_margin", "rewards_chosen", "rewards_rejected", "logps_chosen",
             "logps_rejected", "dpo_loss", "prompts", "samples_per_prompt", "reward_policy", "reward_reference",
             "win_rate", "kl", "kl_median", "examples"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert main(["pretrain", *TINY, "--out", str(root / "pre"), "train.max_steps=30"]) == 0
    assert main(["sft", *TINY, "--out", str(root / "sft"), "--init", str(root / "pre"), "train.max_steps=10"]) == 0
    assert main(["dpo", *TINY, "--out", str(root / "dpo"), "--init", str(root / "sft"), "train.max_steps=10"]) == 0
    return root


def test_eval_json_has_the_documented_keys(runs, capsys):
    out = runs / "eval.json"
    assert main(["eval", "--model", str(runs / "dpo"), "--ref", str(runs / "sft"), "--data", "builtin:assistant",
                 "--out", str(out), "--limit", "4", "--max-new-tokens", "12"]) == 0
    results = json.loads(out.read_text())
    assert EVAL_KEYS <= set(results)
    assert 0 <= results["reward_policy"] <= 1 and 0 <= results["win_rate"] <= 1 and 0 <= results["reward_accuracy"] <= 1
    assert results["prompts"] == 4 and results["pairs"] > 0
    assert "win_rate" in capsys.readouterr().out  # the human-readable table


def test_eval_without_reference_reports_log_probs(runs, tmp_path):
    out = tmp_path / "e.json"
    assert main(["eval", "--model", str(runs / "dpo"), "--data", "builtin:assistant", "--out", str(out)]) == 0
    assert {"pairs", "logps_chosen", "logps_rejected", "logp_accuracy"} <= set(json.loads(out.read_text()))


def test_generate_one_prompt_streams_and_file_batches(runs, tmp_path, capsys):
    assert main(["generate", "--model", str(runs / "dpo"), "--prompt", "What is 3 + 4?", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    prompts = tmp_path / "p.txt"
    prompts.write_text("What is 3 + 4?\nReverse the word lamp.\n")
    assert main(["generate", "--model", str(runs / "dpo"), "--prompts-file", str(prompts), "--max-new-tokens", "8",
                 "--temperature", "0.8", "--top-p", "0.9", "--seed", "1"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_generate_bf16_weights_and_compile_flags_reach_decoding(runs, tmp_path, capsys, monkeypatch):
    import torch

    import llama4dpo.generate as gen_module
    seen, real = [], gen_module.generate_ids

    def spy(model, prompts, s, **kw):
        seen.append((next(model.parameters()).dtype, kw.get("compile")))
        return real(model, prompts, s, **{**kw, "compile": False})  # (compiling is the slow test's job)
    monkeypatch.setattr(gen_module, "generate_ids", spy)
    prompts = tmp_path / "p.txt"
    prompts.write_text("What is 3 + 4?\nReverse the word lamp.\n")
    assert main(["generate", "--model", str(runs / "dpo"), "--prompts-file", str(prompts), "--max-new-tokens", "6",
                 "--dtype", "bf16", "--compile"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert seen == [(torch.bfloat16, True)]


def test_generate_bad_settings_are_one_line_errors(runs, capsys):
    with pytest.raises(SystemExit) as e:  # argparse refuses it before any model loads
        main(["generate", "--model", str(runs / "dpo"), "--prompt", "hi", "--top-p", "0"])
    assert e.value.code == 2 and "argument --top-p" in capsys.readouterr().err


def scripted(lines):
    it = iter(lines)

    def read_line(prompt):
        item = next(it, EOFError)
        if isinstance(item, type) and issubclass(item, BaseException):
            raise item
        return item
    return read_line


def test_chat_handles_empty_input_reset_and_end_of_file(runs):
    model, tok = load_model(runs / "dpo" / "final"), load_tokenizer(runs / "dpo" / "final")
    out = []
    rc = chat_session(model, tok, scripted(["", "What is 3 + 4?", "/reset", "Reverse the word lamp."]),
                      out.append, Sampling(max_new_tokens=10))
    text = "".join(out)
    assert rc == 0
    assert "(empty message" in text and "(conversation cleared)" in text
    assert text.count("assistant>") == 2 and text.rstrip().endswith("bye")


def test_chat_ctrl_c_and_quit(runs):
    model, tok = load_model(runs / "dpo" / "final"), load_tokenizer(runs / "dpo" / "final")
    out = []
    assert chat_session(model, tok, scripted([KeyboardInterrupt]), out.append, Sampling(max_new_tokens=4)) == 0
    assert "interrupted" in "".join(out)
    out = []
    assert chat_session(model, tok, scripted(["/quit"]), out.append, Sampling(max_new_tokens=4)) == 0


def test_demo_quick_writes_summary(tmp_path):
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    for key in ("reward_reference", "reward_policy", "win_rate", "kl", "reward_accuracy", "seconds"):
        assert isinstance(summary[key], float), key
    assert (tmp_path / "demo" / "dpo" / "plots" / "rewards_accuracies.png").is_file()


def test_kl_per_answer_is_zero_against_itself_and_not_against_another_model():
    from llama4dpo import Config, LlamaModel
    from llama4dpo.evaluate import kl_per_answer
    from llama4dpo.tokenizer import CharTokenizer

    tok = CharTokenizer.train(["abc def ghi?"])
    cfg = Config.load("tiny", [f"model.vocab_size={tok.vocab_size}"]).model
    a, b = LlamaModel(cfg).init_weights(seed=0).eval(), LlamaModel(cfg).init_weights(seed=1).eval()
    prompts = ["abc", "def?", "g"]
    same = kl_per_answer(a, a, tok, prompts, 6)
    assert len(same) == 3 and all(abs(x) < 1e-5 for x in same)
    other = kl_per_answer(a, b, tok, prompts, 6)
    assert len(other) == 3 and all(abs(x) > 1e-3 for x in other)
