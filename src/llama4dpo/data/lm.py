"""Language-model (pretraining) data: a text corpus as one token stream, sampled in random windows.

Corpus sources (`load_text_corpus`):
    builtin:NAME            the task's corpus (a): transcripts of mixed quality
    file.txt[.gz]           the whole file is one document
    .jsonl/.json/.csv/.parquet or a hub name
                            the `text` field of every record; a preference set instead gives its
                            prompt + chosen transcripts (so a model can be pretrained on HH-RLHF itself)

Each document becomes [bos] + encode(doc) + [eos]; the documents are concatenated into one stream and
a batch is `batch_size` windows of block_size + 1 tokens at uniformly random offsets (nanoGPT's
sampler). The loss shifts by one, so input_ids and labels are the same tensor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..errors import UserError
from .builtin import get_task
from .chat import normalize_text
from .preference import read_pairs
from .report import DataReport, Skip
from .sources import RawRecords, builtin_name, file_kind, open_binary, read_records

TEXT_FIELD = "text"


def load_text_corpus(source: str, cfg: DataConfig, *, report: DataReport | None = None,
                     tokenizer=None) -> list[str]:
    """The documents of a corpus source (see the module docstring), NFKC-normalised (not for a `tokenizer`
    whose `applies_nfkc` is False). Records without a usable text are counted in `report` by reason (strict
    mode: the first is an error)."""
    nfkc = tokenizer is None or tokenizer.applies_nfkc
    name = builtin_name(source)
    if name is not None:
        return get_task(name, cfg.seed, cfg.builtin_size).corpus_texts
    if file_kind(source) == "txt":
        if not Path(source).is_file():
            raise UserError(f"corpus file not found: {source}")
        with open_binary(Path(source)) as f:
            return [normalize_text(f.read().decode("utf-8", errors="replace"), nfkc)]
    raw = read_records(source, split=cfg.split, max_samples=cfg.max_samples)
    if TEXT_FIELD in raw.fields():
        return _texts(raw, cfg, report, nfkc)
    pairs, _ = read_pairs(source, cfg, raw=raw, tokenizer=tokenizer)  # not a preference set either: one-line error
    return [p + c for p, c in zip(pairs["prompt"], pairs["chosen"])]


def training_texts(source: str, cfg: DataConfig) -> list[str]:
    """All text a tokenizer for `source` should be trained on: a corpus' documents, or a preference set's
    prompts and both responses (for builtin:NAME: its corpus and training pairs, not the held-out prompts)."""
    name = builtin_name(source)
    if name is not None:
        task = get_task(name, cfg.seed, cfg.builtin_size)
        return task.corpus_texts + [p[k] for p in task.pairs for k in ("prompt", "chosen", "rejected")]
    if file_kind(source) == "txt":
        return load_text_corpus(source, cfg)
    raw = read_records(source, split=cfg.split, max_samples=cfg.max_samples)
    if TEXT_FIELD in raw.fields():
        return _texts(raw, cfg, None)
    pairs, _ = read_pairs(source, cfg, raw=raw)
    return pairs["prompt"] + pairs["chosen"] + pairs["rejected"]


def _texts(raw: RawRecords, cfg: DataConfig, report: DataReport | None, nfkc: bool = True) -> list[str]:
    report = report if report is not None else DataReport(raw.source, "text", unit=raw.unit, strict=cfg.strict)
    report.format, report.records = "text", len(raw.rows)
    texts = []
    for loc, rec in raw.rows:
        value = rec.get(TEXT_FIELD) if isinstance(rec, dict) else None
        if isinstance(value, str) and value.strip():
            texts.append(normalize_text(value, nfkc))
            continue
        reason = (rec.reason if isinstance(rec, Skip) else "missing_field" if TEXT_FIELD not in rec
                  else "null_field" if value is None else "non_string_field" if not isinstance(value, str)
                  else "empty_field")
        report.skip(reason, loc, TEXT_FIELD)
    report.n_train = len(texts)
    return texts


class TokenStream:
    """A 1-D token stream; `get_batch` samples windows and is reproducible from the generator's state."""

    def __init__(self, tokens, block_size: int):
        self.tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int32))  # int32 halves memory; cast per batch
        self.block_size = block_size
        if len(self.tokens) < block_size + 1:
            raise UserError(f"the corpus has {len(self.tokens)} tokens, fewer than block_size + 1 = {block_size + 1}; "
                            "lower data.block_size or add text")

    @classmethod
    def from_texts(cls, texts: list[str], tokenizer, block_size: int, chunk: int = 1000) -> "TokenStream":
        parts = [np.asarray(ids, dtype=np.int32) for i in range(0, len(texts), chunk)
                 for ids in tokenizer.encode_batch(texts[i:i + chunk], bos=True, eos=True)]
        return cls(np.concatenate(parts) if parts else np.zeros(0, np.int32), block_size)

    def __len__(self) -> int:
        return len(self.tokens)

    def get_batch(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """input_ids = labels: LongTensor [batch_size, block_size + 1]; attention_mask all ones."""
        starts = torch.randint(0, len(self.tokens) - self.block_size, (batch_size,), generator=generator)
        idx = starts[:, None] + torch.arange(self.block_size + 1)  # (B, T+1)
        x = self.tokens[idx].long()
        return {"input_ids": x, "labels": x, "attention_mask": torch.ones_like(x)}


def load_token_streams(source: str, cfg: DataConfig, tokenizer) -> tuple[TokenStream, TokenStream | None]:
    """(train, eval) streams: the last `eval_fraction` of the tokens is held out for eval loss; no eval
    stream when that tail is shorter than one window."""
    full = TokenStream.from_texts(load_text_corpus(source, cfg, tokenizer=tokenizer), tokenizer, cfg.block_size)
    n_eval = int(len(full) * cfg.eval_fraction)
    if n_eval < cfg.block_size + 1 or len(full) - n_eval < cfg.block_size + 1:
        return full, None
    return (TokenStream(full.tokens[:-n_eval], cfg.block_size),
            TokenStream(full.tokens[-n_eval:], cfg.block_size))
