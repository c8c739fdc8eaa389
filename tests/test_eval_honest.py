"""Issue #22: `eval --data FILE` scores every valid pair of FILE and says what it read; long prompts are
truncated to their end, never skipped; data.max_length above the model's context is one line; info and
export-hf take a run directory."""

import dataclasses
import json
import re

import pytest

from llama4dpo.checkpoint import load_config
from llama4dpo.cli import main
from llama4dpo.config import DataConfig
from llama4dpo.data import collate_preference, collate_preference_shared, load_preference_data, training_texts
from llama4dpo.errors import UserError
from llama4dpo.tokenizer import CharTokenizer

N_PAIRS = 300
BAD_LINES = {3: "{not json", 10: "[1, 2]", 25: "", 77: None}  # line number -> text (None: identical responses)
TRAINED_MAX_SAMPLES = 50  # the checkpoint's own data.max_samples, which must not shorten the scored file


def transcript(i: int) -> str:
    """A multi-turn HH-RLHF style prompt of a few hundred characters (tiny's max_length is 96)."""
    turns = [f"\n\nHuman: Question {i}.{t}: what is {i} plus {t}? Please explain the steps."
             f"\n\nAssistant: It is {i + t}, since adding {t} to {i} gives {i + t}." for t in range(3)]
    return "".join(turns) + f"\n\nHuman: And {i} times two?\n\nAssistant:"


def hh_lines() -> list[str]:
    """N_PAIRS valid pairs with the BAD_LINES in between (1-based line numbers)."""
    good = iter(json.dumps({"chosen": transcript(i) + f" {2 * i}.", "rejected": transcript(i) + " I am not sure."})
                for i in range(N_PAIRS))
    lines = []
    for n in range(1, N_PAIRS + len(BAD_LINES) + 1):
        if n not in BAD_LINES:
            lines.append(next(good))
        elif BAD_LINES[n] is None:
            lines.append(json.dumps({"chosen": transcript(n) + " Same.", "rejected": transcript(n) + " Same."}))
        else:
            lines.append(BAD_LINES[n])
    return lines


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_honest") / "pre"
    assert main(["pretrain", "--config", "tiny", "--data", "builtin:assistant", "--quiet", "--out", str(out),
                 "train.max_steps=2", f"data.max_samples={TRAINED_MAX_SAMPLES}"]) == 0
    return out


@pytest.fixture(scope="module")
def held(tmp_path_factory):
    path = tmp_path_factory.mktemp("held") / "held.jsonl"
    path.write_text("\n".join(hh_lines()) + "\n", encoding="utf-8")
    return path


def evaluate(run, held, tmp_path, capsys, *extra):
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(run), "--data", str(held), "--out", str(out), *extra]) == 0
    return json.loads(out.read_text()), capsys.readouterr().out


def test_eval_scores_every_valid_pair_and_reports_the_data(run, held, tmp_path, capsys):
    results, printed = evaluate(run, held, tmp_path, capsys, "--ref", str(run))
    report = results["data_report"]
    assert results["pairs"] == report["kept"] == N_PAIRS  # every valid pair, no eval split
    assert report["read"] == N_PAIRS + len(BAD_LINES) - 1  # (the blank line is no record)
    assert report["skipped"] == {"malformed_json": 2, "identical_responses": 1}
    assert report["truncated_prompts"] == N_PAIRS  # every prompt is longer than max_prompt_length, none skipped
    # the console shows the same counts, before the table
    assert f"{report['read']} records read, {report['kept']} kept" in printed
    assert "skipped 2 malformed_json (lines 3, 10)" in printed and "skipped 1 identical_responses (lines 77)" in printed
    assert f": {report['truncated_prompts']} prompts," in printed
    assert printed.index("records read") < printed.index("reward_accuracy")


def test_eval_max_samples_reads_only_the_first_records(run, held, tmp_path, capsys):
    results, printed = evaluate(run, held, tmp_path, capsys, "--max-samples", "40")
    report = results["data_report"]
    assert report["read"] == 40 and report["skipped"] == {"malformed_json": 2}  # lines 3 and 10 (25 is blank)
    assert results["pairs"] == report["kept"] == 38
    assert "40 records read, 38 kept" in printed


def test_eval_max_samples_is_validated_by_argparse(run, held, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(run), "--data", str(held), "--max-samples", "0"])
    assert e.value.code == 2 and "argument --max-samples" in capsys.readouterr().err


def test_eval_on_builtin_scores_held_out_pairs_and_generates(run, tmp_path, capsys):
    results, printed = evaluate(run, "builtin:assistant", tmp_path, capsys, "--ref", str(run), "--limit", "2",
                                "--max-new-tokens", "4", "--max-samples", "10")
    assert results["pairs"] == results["data_report"]["kept"] == 10 and results["prompts"] == 2
    assert 0 <= results["win_rate"] <= 1 and "10 records read, 10 kept" in printed


@pytest.fixture()
def tiny_data(held, run):
    cfg = dataclasses.replace(load_config(run / "final").data, max_samples=None)  # tiny's lengths, the whole file
    return cfg, CharTokenizer.train(training_texts(str(held), cfg))  # every character in the vocabulary


def test_long_prompts_are_truncated_to_their_end_not_skipped(held, tiny_data):
    cfg, tok = tiny_data
    data = load_preference_data(str(held), cfg, tok)
    report = data.report
    assert "prompt_too_long" not in report.skipped and report.kept == N_PAIRS
    assert report.truncated_prompts == N_PAIRS and "prompt_too_long" not in report.summary()
    examples = list(data.train) + list(data.eval)
    for ex in examples:
        text = tok.decode(ex["prompt_ids"])
        assert ex["prompt_ids"][0] == tok.bos_id and len(ex["prompt_ids"]) == cfg.max_prompt_length
        assert text.endswith("times two?\n\nAssistant:")  # the latest turn survives
        assert len(ex["prompt_ids"]) + len(ex["chosen_ids"]) <= cfg.max_length
    # both responses continue the same (truncated) prompt: the plain and the prefix-shared layouts agree
    batch, shared = collate_preference(examples[:4], tok.pad_id), collate_preference_shared(examples[:4], tok.pad_id)
    for i, ex in enumerate(examples[:4]):
        P = len(ex["prompt_ids"])
        assert batch["input_ids"][i, :P].tolist() == batch["input_ids"][4 + i, :P].tolist() == ex["prompt_ids"]
        assert shared["input_ids"][i, :P].tolist() == ex["prompt_ids"] and (shared["segment_ids"][i, :P] == 0).all()


@pytest.mark.parametrize("command", ["sft", "dpo"])
def test_sft_and_dpo_keep_long_prompts(run, held, tmp_path, command):
    out = tmp_path / command
    assert main([command, "--config", "tiny", "--init", str(run), "--data", str(held), "--out", str(out), "--quiet",
                 "train.max_steps=1", "train.eval_batches=1"]) == 0
    report = (out / "data_report.txt").read_text()
    assert f"{N_PAIRS} kept" in report and "prompt_too_long" not in report
    assert re.search(rf": {N_PAIRS} prompts,", report)


def test_max_length_above_the_context_is_one_line(run, held, tiny_data, capsys):
    cfg, tok = tiny_data
    assert main(["eval", "--model", str(run), "--data", str(held), "data.max_length=200"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.max_length=200" in err and "max_position_embeddings=128" in err
    with pytest.raises(UserError) as e:
        load_preference_data(str(held), DataConfig(max_length=200, max_prompt_length=64), tok, context=128)
    assert "\n" not in str(e.value) and "data.max_length=200" in str(e.value)
    assert load_preference_data(str(held), cfg, tok, context=cfg.max_length).report.kept == N_PAIRS  # equal: fine


@pytest.mark.parametrize("command", ["sft", "dpo"])
def test_sft_and_dpo_refuse_max_length_above_the_context(run, held, tmp_path, capsys, command):
    assert main([command, "--config", "tiny", "--init", str(run), "--data", str(held), "--out", str(tmp_path / "r"),
                 "--quiet", "data.max_length=200"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.max_length=200" in err and "max_position_embeddings=128" in err
    assert not (tmp_path / "r").exists()


def test_info_and_export_hf_accept_a_run_directory(run, tmp_path, capsys):
    assert main(["info", str(run)]) == 0
    out = capsys.readouterr().out
    assert "parameters (total)" in out and str(run / "final") in out  # the checkpoint it resolved to
    assert main(["export-hf", str(run), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "model.safetensors").is_file()
