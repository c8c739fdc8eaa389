"""Every preference format in every container: exact prompt/response splits and masks on worked examples."""

import pytest
import torch

from llama4dpo.config import DataConfig
from llama4dpo.data import (IGNORE_INDEX, collate_preference, load_preference_data, read_pairs, training_texts,
                            write_records)
from llama4dpo.errors import UserError
from llama4dpo.tokenizer import BPETokenizer, CharTokenizer

CONTAINERS = ["jsonl", "json", "parquet", "csv", "jsonl.gz", "json.gz", "csv.gz", "parquet.gz"]
CFG = DataConfig(eval_fraction=0.0)

Q = "\n\nHuman: What is 2+2?\n\nAssistant:"
TWO_TURNS = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye\n\nAssistant:"

# format -> (records with one schema, so parquet can hold them; expected (prompt, chosen, rejected) texts)
CASES = {
    "explicit": (
        [{"prompt": Q, "chosen": " 4.", "rejected": " 5."},
         {"prompt": "Say hi", "chosen": " hi", "rejected": " bye"}],
        [(Q, " 4.", " 5."), ("Say hi", " hi", " bye")]),
    "hh": (
        [{"chosen": Q + " 4.", "rejected": Q + " 5."},
         {"chosen": TWO_TURNS + " See you.", "rejected": TWO_TURNS + " Go."},
         # responses sharing a prefix stay whole: the cut is at the marker, not where the texts diverge
         {"chosen": "\n\nHuman: Hi\n\nAssistant: Sure.", "rejected": "\n\nHuman: Hi\n\nAssistant: Sure thing."},
         # diverging before the last turn: the prompt ends at the last *shared* Assistant turn
         {"chosen": "\n\nHuman: Hi\n\nAssistant: A\n\nHuman: x\n\nAssistant: y",
          "rejected": "\n\nHuman: Hi\n\nAssistant: B"}],
        [(Q, " 4.", " 5."), (TWO_TURNS, " See you.", " Go."),
         ("\n\nHuman: Hi\n\nAssistant:", " Sure.", " Sure thing."),
         ("\n\nHuman: Hi\n\nAssistant:", " A\n\nHuman: x\n\nAssistant: y", " B")]),
    "conversational": (  # UltraFeedback-binarized: a prompt string, repeated as the first message
        [{"prompt": "What is 2+2?",
          "chosen": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
          "rejected": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "5."}]},
         {"prompt": "Hi",
          "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                     {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you."}],
          "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                       {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Go."}]}],
        [(Q, " 4.", " 5."), (TWO_TURNS, " See you.", " Go.")]),
}


def triples(cols):
    return list(zip(cols["prompt"], cols["chosen"], cols["rejected"]))


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("fmt", list(CASES))
def test_format_in_container(tmp_path, fmt, container):
    records, expected = CASES[fmt]
    path = write_records(records, tmp_path / f"prefs.{container}")
    cols, report = read_pairs(str(path), CFG)
    assert report.format == fmt
    assert triples(cols) == expected
    assert sum(report.skipped.values()) == 0
    assert report.unit == ("line" if container.split(".")[0] in ("jsonl", "csv") else "record")


@pytest.mark.parametrize("fmt", list(CASES))
def test_format_override(tmp_path, fmt):
    records, expected = CASES[fmt]
    path = write_records(records, tmp_path / "prefs.jsonl")
    cols, report = read_pairs(str(path), DataConfig(eval_fraction=0.0, format=fmt))
    assert report.format == fmt and triples(cols) == expected


def test_conversational_variants(tmp_path):
    """TRL's layout (prompt as messages, responses as one assistant message), no prompt at all, and a
    system message; turn markers typed inside a message cannot create a turn."""
    sys_user = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    records = [
        {"prompt": sys_user, "chosen": [{"role": "assistant", "content": "Hello."}],
         "rejected": [{"role": "assistant", "content": "Go away."}]},
        {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
         "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go."}]},
        {"chosen": [{"role": "user", "content": "Say\n\nAssistant: no"}, {"role": "assistant", "content": "ok"}],
         "rejected": [{"role": "user", "content": "Say\n\nAssistant: no"}, {"role": "assistant", "content": "no"}]},
    ]
    cols, _ = read_pairs(str(write_records(records, tmp_path / "c.jsonl")), CFG)
    assert triples(cols) == [
        ("\n\nSystem: Be brief.\n\nHuman: Hi\n\nAssistant:", " Hello.", " Go away."),
        ("\n\nHuman: Hi\n\nAssistant:", " Hello.", " Go."),
        ("\n\nHuman: Say\nAssistant: no\n\nAssistant:", " ok", " no"),
    ]


def test_csv_conversational_reads_json_strings(tmp_path):
    """CSV cannot hold lists: message lists are JSON strings in the cells, and are parsed back."""
    path = write_records(CASES["conversational"][0], tmp_path / "c.csv")
    assert '"[{""role"": ""user""' in path.read_text()
    cols, report = read_pairs(str(path), CFG)
    assert report.format == "conversational" and triples(cols) == CASES["conversational"][1]


@pytest.mark.parametrize("tok_kind", ["char", "bpe"])
@pytest.mark.parametrize("fmt", list(CASES))
def test_masks_select_exactly_the_response(tmp_path, fmt, tok_kind):
    records, expected = CASES[fmt]
    path = str(write_records(records, tmp_path / "prefs.parquet"))
    texts = training_texts(path, CFG)
    tok = CharTokenizer.train(texts) if tok_kind == "char" else BPETokenizer.train(texts, vocab_size=300)
    data = load_preference_data(path, CFG, tok)
    assert len(data.train) == len(expected) and len(data.eval) == 0
    batch = collate_preference([data.train[i] for i in range(len(data.train))], tok.pad_id)
    B = len(expected)
    for i, (prompt, chosen, rejected) in enumerate(expected):
        for row, response in ((i, chosen), (B + i, rejected)):
            ids = [1] + tok.encode(prompt) + tok.encode(response) + [2]
            n, n_p = len(ids), 1 + len(tok.encode(prompt))
            assert batch["input_ids"][row, :n].tolist() == ids
            assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
            labels = batch["labels"][row]
            assert (labels[:n_p] == IGNORE_INDEX).all() and (labels[n:] == IGNORE_INDEX).all()
            assert labels[n_p:n].tolist() == tok.encode(response) + [tok.eos_id]
            assert tok.decode(labels[labels != IGNORE_INDEX].tolist()) == response


def test_worked_hh_example_exact_ids(tmp_path):
    """One HH pair, by hand: a char tokenizer's ids are 4 + the rank of the character among those seen."""
    path = str(write_records([{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}],
                             tmp_path / "hh.jsonl"))
    cfg = DataConfig(eval_fraction=0.0, max_length=64, max_prompt_length=32)
    tok = CharTokenizer(sorted(set("".join(training_texts(path, cfg)))))
    enc = {c: i for i, c in enumerate(tok.itos)}
    data = load_preference_data(path, cfg, tok)
    batch = collate_preference([data.train[0]], tok.pad_id)
    prompt = [1] + [enc[c] for c in "\n\nHuman: a\n\nAssistant:"]
    assert batch["input_ids"].tolist() == [prompt + [enc[" "], enc["b"], 2], prompt + [enc[" "], enc["c"], 2]]
    assert batch["labels"].tolist() == [[-100] * len(prompt) + [enc[" "], enc["b"], 2],
                                        [-100] * len(prompt) + [enc[" "], enc["c"], 2]]


def test_max_samples_and_deterministic_split(tmp_path):
    records = [{"prompt": f"q{i // 2}", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(200)]
    path = str(write_records(records, tmp_path / "p.jsonl"))
    cfg = DataConfig(eval_fraction=0.1, seed=3)
    a, _ = read_pairs(path, cfg)
    b, _ = read_pairs(path, cfg)
    assert a["is_eval"] == b["is_eval"] and sum(a["is_eval"]) == 20
    eval_prompts = {p for p, e in zip(a["prompt"], a["is_eval"]) if e}
    train_prompts = {p for p, e in zip(a["prompt"], a["is_eval"]) if not e}
    assert not eval_prompts & train_prompts  # both pairs of a prompt land in the same split
    c, _ = read_pairs(path, DataConfig(eval_fraction=0.1, seed=4))
    assert c["is_eval"] != a["is_eval"]
    d, report = read_pairs(path, DataConfig(max_samples=7, eval_samples=2))
    assert len(d["prompt"]) == 7 and report.records == 7 and 1 <= sum(d["is_eval"]) <= 2  # whole prompts only
    single = str(write_records(records[::2], tmp_path / "single.jsonl"))  # one pair per prompt: exact counts
    e, _ = read_pairs(single, DataConfig(eval_samples=13))
    assert sum(e["is_eval"]) == 13


def test_json_file_holding_json_lines(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text('{"prompt": "a", "chosen": " b", "rejected": " c"}\n'
                    '{"prompt": "d", "chosen": " e", "rejected": " f"}\n')
    cols, report = read_pairs(str(path), CFG)
    assert triples(cols) == [("a", " b", " c"), ("d", " e", " f")] and report.unit == "line"


def test_hub_name_offline_is_one_line_error():
    with pytest.raises(UserError) as e:
        read_pairs("no-such-user/no-such-dataset", CFG)
    assert "\n" not in str(e.value) and "no-such-user/no-such-dataset" in str(e.value)


def test_missing_file_and_bad_suffix(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_pairs(str(tmp_path / "nope.jsonl"), CFG)
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(UserError, match="unsupported"):
        read_pairs(str(tmp_path / "x.xml"), CFG)


def test_batch_dtypes():
    batch = collate_preference([{"prompt_ids": [1], "chosen_ids": [5, 2], "rejected_ids": [6, 2]}], 0)
    assert all(t.dtype == torch.long for t in batch.values())
