"""KTO end to end through the real CLI on unpaired feedback written here: bad rows counted by reason (or, with
--strict, the first one a one-line error), each example's KL row a mismatched completion, the loss at start
1 - sigma(0) weighted, a precomputed reference equal to the live one, and a paired source unpaired on request."""

import json
import math
import random
from pathlib import Path

import pytest

from llama4dpo.cli import main
from llama4dpo.config import Config
from llama4dpo.data import load_unpaired_data
from llama4dpo.metrics import read_metrics
from llama4dpo.tokenizer import build_tokenizer

TINY = str(Path(__file__).parent.parent / "configs" / "tiny.toml")
COMMON = ["--config", TINY, "--quiet", "train.batch_size=4", "dpo.loss_type=kto"]
BAD = [({"prompt": "What is 1 + 1?", "completion": "2", "label": "maybe"}, "bad_label"),
       ({"prompt": "What is 1 + 1?", "completion": "  ", "label": True}, "empty_field"),
       ({"prompt": "What is 1 + 1?", "label": False}, "missing_field"),
       ({"prompt": "What is 1 + 1?", "completion": 2, "label": True}, "non_string_field")]


def feedback(path: Path, n: int = 60, bad: bool = True) -> Path:
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        good = rng.random() < 0.5
        rows.append({"prompt": f"What is {a} + {b}?", "completion": f"The answer is {a + b + (0 if good else 1)}.",
                     "label": good})
    if bad:
        rows[5:5] = [r for r, _ in BAD]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def base(tiny_base):
    return tiny_base


def test_unpaired_records_bad_rows_and_mismatched_kl_completions(tmp_path):
    tok = build_tokenizer("char", ["What is 0123456789 + ? The answer is ."], 0)
    data = load_unpaired_data(str(feedback(tmp_path / "f.jsonl")), Config.load(TINY).data, tok)
    assert data.report.skipped == {reason: 1 for _, reason in BAD}
    assert data.report.n_train + data.report.n_eval == 60
    differ = [ex["chosen_ids"] != ex["rejected_ids"] for ex in data.train]  # the KL row: another's completion
    assert sum(differ) >= 0.7 * len(differ)  # (two prompts may share an answer text)
    labels = [ex["label"] for ex in data.train]
    assert any(labels) and not all(labels)


def test_kl_completions_come_from_another_prompt_of_the_same_split():
    from llama4dpo.data.unpaired import _kl_completions
    got = _kl_completions(["a", "a", "b", "c"], ["1", "2", "3", "4"], [False, False, False, True])
    assert got == ["3", "3", "2", "4"]  # the nearest previous with another prompt, wrapping; alone: its own


def test_strict_stops_at_the_first_bad_row(base, tmp_path, capsys):
    assert main(["dpo", *COMMON, "--init", str(base), "--data", str(feedback(tmp_path / "f.jsonl")),
                 "--out", str(tmp_path / "run"), "--strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad_label" in err[0] and "line 6" in err[0]


def test_kto_trains_from_an_unpaired_file(base, tmp_path):
    data = str(feedback(tmp_path / "f.jsonl"))
    runs = {}
    for name, extra in (("live", []), ("cached", ["dpo.precompute_ref=true"])):
        assert main(["dpo", *COMMON, "--init", str(base), "--data", data, "--out", str(tmp_path / name),
                     "train.max_steps=4", "train.log_every=1", "train.lr=3e-3", "dpo.desirable_weight=1.5",
                     "dpo.undesirable_weight=0.5", *extra]) == 0
        runs[name] = [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r]
    first = runs["live"][0]
    share = first["desirable"]  # at step 1 every log-ratio and z0 are 0: each loss is its weight x (1 - sigma(0))
    assert first["loss"] == pytest.approx(0.5 * (1.5 * share + 0.5 * (1 - share)), abs=1e-6)
    assert first["kl"] == 0.0 and all(math.isfinite(r["loss"]) for r in runs["live"])
    assert [r["loss"] for r in runs["live"]] == pytest.approx([r["loss"] for r in runs["cached"]], abs=1e-5)
    assert runs["live"][-1]["loss"] != first["loss"]


def test_a_paired_source_unpaired_on_request(base, tmp_path):
    assert main(["dpo", *COMMON, "--init", str(base), "--data", "builtin:assistant", "data.builtin_size=120",
                 "data.unpair=true", "--out", str(tmp_path / "run"), "train.max_steps=2", "train.log_every=1"]) == 0
    report = (tmp_path / "run" / "data_report.txt").read_text()
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert rows and 0 < rows[0]["desirable"] < 1 and "kept" in report


def test_a_paired_file_without_unpair_is_a_one_line_error(base, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go."}) + "\n")
    assert main(["dpo", *COMMON, "--init", str(base), "--data", str(pairs), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.unpair=true" in err[0]


def test_conversational_unpaired_records(tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}],
             "completion": [{"role": "assistant", "content": f"The answer is {i + 1}."}], "label": i % 2 == 0}
            for i in range(8)]
    rows.append({"prompt": [{"role": "user", "content": "Hi?"}], "completion": [{"role": "user", "content": "x"}],
                 "label": True})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = build_tokenizer("char", ["What is 0123456789 + ? The answer is .\n\nHuman: Assistant:"], 0)
    data = load_unpaired_data(str(path), Config.load(TINY, ["data.eval_samples=2"]).data, tok)
    assert data.report.format == "unpaired conversational" and data.report.skipped == {"no_assistant_turn": 1}
    assert data.report.n_train == 6 and data.report.n_eval == 2
    assert "Assistant:" in tok.decode(data.train[0]["prompt_ids"])
