"""Command-line and data edges found by an attack (issue #21): each bad input is argparse's usage error or
one `error:` line, exit 2 - never a traceback, never an exit 0 that did nothing."""

import json

import pytest

from llama4dpo.cli import main
from llama4dpo.data import DataReport
from llama4dpo.data.prepare import tokenize_batch
from llama4dpo.tokenizer import CharTokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("attack") / "run"
    assert main(["pretrain", "--config", "tiny", "--data", "builtin:assistant", "--quiet", "--out", str(out),
                 "train.max_steps=2"]) == 0
    return str(out)


def one_error_line(capsys, *words):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


# Each was accepted (-1: 46 prompts, nothing printed, exit 0), reached a traceback (batch 0, seed 10**30) or
# failed only after the model was loaded.
BAD_FLAGS = [
    ("--batch-size", "-1"), ("--batch-size", "0"), ("--max-new-tokens", "0"), ("--max-new-tokens", "-3"),
    ("--temperature", "-1"), ("--temperature", "nan"), ("--temperature", "inf"), ("--top-k", "-1"),
    ("--top-p", "0"), ("--top-p", "1.5"), ("--top-p", "nan"), ("--seed", "-1"), ("--seed", str(10**30)),
    ("--seed", str(2**63)),
]


@pytest.mark.parametrize("flag,value", BAD_FLAGS)
def test_generate_rejects_bad_numbers_in_argparse(ckpt, capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", ckpt, "--prompt", "hi", flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err and err.strip().splitlines()[-1].startswith("llama4dpo generate: error:")


@pytest.mark.parametrize("argv", [
    ["chat", "--max-new-tokens", "0"], ["chat", "--seed", str(10**30)], ["chat", "--top-p", "2"],
    ["eval", "--data", "builtin:assistant", "--limit", "0"],
    ["eval", "--data", "builtin:assistant", "--max-new-tokens", "-1"],
], ids=lambda a: " ".join(a[:1] + a[-2:]))
def test_chat_and_eval_reject_bad_numbers_in_argparse(ckpt, capsys, argv):
    with pytest.raises(SystemExit) as e:
        main([argv[0], "--model", ckpt, *argv[1:]])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert argv[-2] in err and "Traceback" not in err


@pytest.mark.parametrize("kind", ["missing", "directory", "binary"])
def test_bad_prompts_file_is_one_line(ckpt, tmp_path, capsys, kind):
    path = tmp_path / "prompts.txt"
    if kind == "directory":
        path.mkdir()
    elif kind == "binary":
        path.write_bytes(b"hello\n\xff\xfe\x00\x81 binary\n")
    assert main(["generate", "--model", ckpt, "--prompts-file", str(path)]) == 2
    one_error_line(capsys, str(path), {"missing": "not found", "directory": "directory", "binary": "UTF-8"}[kind])


@pytest.mark.parametrize("indent", [None, 2], ids=["one-line", "pretty"])
@pytest.mark.parametrize("command", ["eval", "pretrain"])
def test_json_array_named_jsonl_says_so(ckpt, tmp_path, capsys, indent, command):
    path = tmp_path / "pairs.jsonl"
    records = [{"prompt": "q", "chosen": "good", "rejected": "bad"}] * 3
    path.write_text(json.dumps(records, indent=indent), encoding="utf-8")
    argv = (["eval", "--model", ckpt, "--data", str(path)] if command == "eval" else
            ["pretrain", "--config", "tiny", "--data", str(path), "--quiet", "--out", str(tmp_path / "run")])
    assert main(argv) == 2
    one_error_line(capsys, str(path), "JSON array", ".json")


def test_generate_notes_characters_outside_the_vocabulary(ckpt, capsys):
    # (the extreme good values of every numeric flag still parse)
    assert main(["generate", "--model", ckpt, "--prompt", "hi \u2603\u2603\u2603", "--max-new-tokens", "1",
                 "--temperature", "0.7", "--top-k", "0", "--top-p", "1", "--seed", str(2**63 - 1),
                 "--batch-size", "1"]) == 0
    err = capsys.readouterr().err
    assert err == "note: 3 characters outside the tokenizer's vocabulary mapped to <unk>\n", err


def test_char_tokenizer_counts_unknown_characters():
    tok = CharTokenizer.train(["abc"])
    assert tok.encode_batch(["abz", "<unk>?"]) == [[4, 5, 3], [3] * 6]
    assert tok.unknown_chars == 7
    tok.encode("cab")
    assert tok.unknown_chars == 7


def test_preference_report_counts_unknown_characters():
    tok = CharTokenizer.train(["abc "])
    out = tokenize_batch({"prompt": ["a ?"], "chosen": ["b!!"], "rejected": ["c"]}, tok, 64, 32)
    assert out["unknown_chars"] == [3]
    report = DataReport("pairs.jsonl", "explicit", unknown_chars=3)
    assert "3 characters outside the tokenizer's vocabulary mapped to <unk>" in report.summary()
