"""Pretraining data: corpora from every kind of source, and a token stream sampled reproducibly."""

import gzip

import pytest
import torch

from llama4dpo.config import DataConfig
from llama4dpo.data import TokenStream, load_text_corpus, load_token_streams, training_texts, write_records
from llama4dpo.data.report import DataReport
from llama4dpo.errors import UserError
from llama4dpo.tokenizer import CharTokenizer

CFG = DataConfig(block_size=8, eval_fraction=0.0)


def test_windows_are_contiguous_and_reproducible():
    stream = TokenStream(torch.arange(100), block_size=8)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    batch = stream.get_batch(4, g)
    x = batch["input_ids"]
    assert x.shape == (4, 9) and x.dtype == torch.long and batch["labels"] is x
    assert (x[:, 1:] - x[:, :-1] == 1).all()  # windows of consecutive tokens
    assert batch["attention_mask"].shape == x.shape and batch["attention_mask"].all()
    nxt = stream.get_batch(4, g)["input_ids"]
    g.set_state(state)  # the trainer resumes by restoring the generator state
    assert torch.equal(stream.get_batch(4, g)["input_ids"], x)
    assert torch.equal(stream.get_batch(4, g)["input_ids"], nxt)
    starts = torch.cat([stream.get_batch(64, g)["input_ids"][:, 0] for _ in range(20)])
    assert starts.min() == 0 and starts.max() == 100 - 9  # every window start reachable, none overflows


def test_from_texts_wraps_each_document_in_bos_eos():
    tok = CharTokenizer(list("ab"))
    stream = TokenStream.from_texts(["ab", "ba"], tok, block_size=2)
    assert stream.tokens.tolist() == [1, 4, 5, 2, 1, 5, 4, 2]
    with pytest.raises(UserError, match="fewer than block_size"):
        TokenStream.from_texts(["ab"], tok, block_size=8)


def test_text_sources(tmp_path):
    txt = tmp_path / "c.txt.gz"
    with gzip.open(txt, "wt") as f:
        f.write("hello\r\nworld \ufb01")
    assert load_text_corpus(str(txt), CFG) == ["hello\nworld fi"]
    recs = [{"text": "one"}, {"text": None}, {"text": "two"}, {"text": 3}, {"other": "x"}, {"text": " "}]
    path = str(write_records(recs, tmp_path / "t.jsonl"))
    report = DataReport(path)
    assert load_text_corpus(path, CFG, report=report) == ["one", "two"]
    assert report.first == {"null_field": [2], "non_string_field": [4], "missing_field": [5], "empty_field": [6]}
    with pytest.raises(UserError, match="line 2: null_field"):
        load_text_corpus(path, DataConfig(strict=True))
    assert training_texts(path, CFG) == ["one", "two"]


def test_preference_set_as_corpus_and_tokenizer_texts(tmp_path):
    path = str(write_records([{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}],
                             tmp_path / "hh.json"))
    assert load_text_corpus(path, CFG) == ["\n\nHuman: a\n\nAssistant: b"]
    assert training_texts(path, CFG) == ["\n\nHuman: a\n\nAssistant:", " b", " c"]
    other = str(write_records([{"question": "q"}], tmp_path / "q.jsonl"))
    with pytest.raises(UserError, match="found fields: question"):
        load_text_corpus(other, CFG)


def test_builtin_streams_and_eval_split():
    cfg = DataConfig(block_size=32, eval_fraction=0.1, builtin_size=300)
    tok = CharTokenizer.train(training_texts("builtin:assistant", cfg))
    train, ev = load_token_streams("builtin:assistant", cfg, tok)
    full = TokenStream.from_texts(load_text_corpus("builtin:assistant", cfg), tok, 32)
    assert len(train) + len(ev) == len(full) and len(ev) == int(0.1 * len(full))
    assert torch.equal(torch.cat([train.tokens, ev.tokens]), full.tokens)
    assert tok.unk_id not in full.tokens.tolist()
    no_eval = DataConfig(block_size=32, eval_fraction=0.0, builtin_size=300)
    _, none = load_token_streams("builtin:assistant", no_eval, tok)
    assert none is None
