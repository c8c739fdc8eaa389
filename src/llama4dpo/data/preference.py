"""Preference data: source -> checked texts -> train/eval split -> tokenised `datasets.Dataset`s.

    data = load_preference_data("hh.jsonl", cfg.data, tokenizer)
    print(data.report.summary())                   # counts of skipped records by reason, truncation
    batch = collate_preference([data.train[i] for i in idx], tokenizer.pad_id)

`data.train` and `data.eval` are `datasets.Dataset`s with the columns prompt_ids, chosen_ids and
rejected_ids (lists of ints, see `prepare.py`); `data.train[i]` is a dict the collators accept. SFT data
(`sft.py`) is read by the same pipeline and keeps prompt + chosen.

The eval split is deterministic: whole prompts are held out (no prompt is in both splits, even when a
data set has several pairs per prompt), picked by a hash of (seed, prompt text) until
`eval_samples` (or `eval_fraction` of the pairs) is reached. `builtin:NAME` sources bring their own
split: the task's training pairs, and pairs on its held-out prompts for eval.

With `split=False` (`llama4dpo eval --data FILE`: the file is the held-out set) there is no split: every
kept pair is in `data.eval` and `data.train` is empty. A builtin source then gives its held-out pairs only
(its training pairs are what the model learnt from). `data.max_samples` keeps the first records either way.

Length: a prompt longer than `max_prompt_length` keeps its end, responses are cut to fit `max_length`
(see `prepare.py`); records are never dropped for length. `context` (the model's
max_position_embeddings) makes a `max_length` the model cannot attend over a one-line error.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..config import DataConfig
from ..errors import UserError
from .builtin import get_task
from .chat import ASSISTANT, has_template, parse_transcript
from .formats import detect_format, extract_pair, render_pair
from .prepare import FLAG_COLUMNS, column, tokenize_pairs
from .report import DataReport, Skip
from .sources import RawRecords, builtin_name, read_records


@dataclass
class PreferenceData:
    train: "datasets.Dataset"  # noqa: F821  columns prompt_ids, chosen_ids, rejected_ids
    eval: "datasets.Dataset"  # noqa: F821
    report: DataReport
    eval_prompts: list[str]                               # held-out prompt texts, for generation
    score: Callable[[str, str], float] | None = None      # a builtin task's ground-truth reward


def read_pairs(source: str, cfg: DataConfig, *, strict: bool | None = None,
               raw: RawRecords | None = None, sft: bool = False, split: bool = True,
               tokenizer=None) -> tuple[dict, DataReport]:
    """Checked texts of every good record: {"prompt", "chosen", "rejected", "loc", "is_eval": [...]}.
    Bad records are counted in the report (or raise in strict mode). `raw`: records already read.
    Without `split`, every pair is marked eval (a builtin source gives its held-out pairs only).
    `tokenizer`: the model's; with a chat template the texts are rendered by it (see `formats.extract_pair`)."""
    strict = cfg.strict if strict is None else strict
    name = builtin_name(source)
    if name is not None:
        cols, report = _builtin_pairs(source, name, cfg, strict, sft, split)
        return (_builtin_templated(cols, report, tokenizer) if has_template(tokenizer) else cols), report
    raw = raw if raw is not None else read_records(source, split=cfg.split, max_samples=cfg.max_samples)
    fmt = detect_format(raw, cfg.format)
    report = DataReport(source, fmt, unit=raw.unit, strict=strict, records=len(raw.rows))
    cols = extract_records(raw, report, lambda rec: extract_pair(rec, fmt, tokenizer), ("prompt", "chosen", "rejected"))
    n = len(cols["prompt"])
    if split:
        n_eval = cfg.eval_samples if cfg.eval_samples is not None else round(cfg.eval_fraction * n)
        cols["is_eval"] = split_by_prompt(cols["prompt"], n_eval, cfg.seed)
    else:
        cols["is_eval"] = [True] * n
    return cols, report


def extract_records(raw: RawRecords, report: DataReport, extract: Callable, keys: tuple[str, ...]) -> dict:
    """Columns `keys` + loc of every record `extract` accepts; a record it refuses (`Skip`) is counted in the
    report (strict mode: raised as a one-line error)."""
    cols: dict[str, list] = {key: [] for key in (*keys, "loc")}
    for loc, rec in raw.rows:
        try:
            if isinstance(rec, Skip):
                raise rec
            values = extract(rec)
        except Skip as s:
            report.skip(s.reason, loc, s.detail)
            continue
        for key, value in zip(cols, (*values, loc)):
            cols[key].append(value)
    return cols


def _builtin_pairs(source: str, name: str, cfg: DataConfig, strict: bool, sft: bool,
                   split: bool = True) -> tuple[dict, DataReport]:
    task = get_task(name, cfg.seed, cfg.builtin_size)
    if not split:  # scoring only: the held-out pairs (the training pairs are what the model learnt from)
        train, heldout = [], task.heldout_pairs[:cfg.max_samples]
    elif sft:
        # SFT demonstrations are the task's mixed-quality corpus (a), so the SFT model is the mediocre
        # reference that DPO improves on; its eval split scores the ideal answers on held-out prompts.
        train = [{"prompt": p, "chosen": r, "rejected": r} for p, r in task.corpus[:cfg.max_samples]]
        heldout = task.heldout_pairs
    else:
        train, heldout = task.pairs[:cfg.max_samples], task.heldout_pairs
    pairs = train + heldout
    report = DataReport(source, "builtin", unit="record", strict=strict, records=len(pairs))
    cols = {key: [p[key] for p in pairs] for key in ("prompt", "chosen", "rejected")}
    cols["loc"] = list(range(len(pairs)))
    cols["is_eval"] = [i >= len(train) for i in range(len(pairs))]
    return cols, report


def _builtin_templated(cols: dict, report: DataReport, tokenizer) -> dict:
    """A builtin task's HH-rendered pairs re-rendered with the tokenizer's chat template."""
    out: dict[str, list] = {k: [] for k in cols}
    for i, prompt in enumerate(cols["prompt"]):
        context = parse_transcript(prompt[:-len(ASSISTANT)]) if prompt.endswith(ASSISTANT) else None
        try:
            if context is None:
                raise Skip("bad_transcript", "not an HH prompt")
            rendered = render_pair(tokenizer, context, cols["chosen"][i].strip(), cols["rejected"][i].strip())
        except Skip as s:
            report.skip(s.reason, cols["loc"][i], s.detail)
            continue
        for key, value in zip(("prompt", "chosen", "rejected"), rendered):
            out[key].append(value)
        out["loc"].append(cols["loc"][i])
        out["is_eval"].append(cols["is_eval"][i])
    return out


def split_by_prompt(prompts: list[str], n_eval: int, seed: int) -> list[bool]:
    """Mark whole prompts as eval, in the order of a seeded hash of their text, while they fit in n_eval
    pairs (exactly n_eval unless prompts with several pairs get in the way); at least one prompt always
    stays in training."""
    counts = Counter(prompts)
    order = sorted(counts, key=lambda p: hashlib.blake2b(f"{seed}\0{p}".encode(), digest_size=8).digest())
    held, total = set(), 0
    for p in order[:-1]:
        if total + counts[p] <= n_eval:
            held.add(p)
            total += counts[p]
        if total >= n_eval:
            break
    return [p in held for p in prompts]


def check_context(cfg: DataConfig, context: int | None) -> None:
    """data.max_length above the model's context (model.max_position_embeddings) is a one-line error: the
    model would be trained or scored on positions it was not built for."""
    if context is not None and cfg.max_length > context:
        raise UserError(f"data.max_length={cfg.max_length} is longer than the model's context "
                        f"model.max_position_embeddings={context}; set data.max_length <= {context} "
                        "(and data.max_prompt_length below it)")


def load_preference_data(source: str, cfg: DataConfig, tokenizer, *, strict: bool | None = None,
                         sft: bool = False, split: bool = True, context: int | None = None) -> PreferenceData:
    """Read, check, split and tokenise a preference source (a file, a hub name or `builtin:NAME`).
    Raises a one-line UserError when the source is unusable or no good pair is left. With `sft`, a
    builtin task gives its demonstrations instead of its pairs (files: SFT uses prompt + chosen).
    `split=False`: no eval split, every kept pair is in `eval` (for scoring). `context`: the model's
    max_position_embeddings, checked against data.max_length before anything is read."""
    check_context(cfg, context)
    cols, report = read_pairs(source, cfg, strict=strict, sft=sft, split=split, tokenizer=tokenizer)
    if not cols["prompt"]:
        skipped = ", ".join(f"{n} {reason}" for reason, n in report.skipped.items())
        raise UserError(f"{source}: no usable preference pairs in {report.records} records ({skipped or 'empty'})")
    return tokenized(cols, report, source, cfg, tokenizer, split)


def tokenized(cols: dict, report: DataReport, source: str, cfg: DataConfig, tokenizer, split: bool = True):
    """Checked texts (read_pairs' columns, and any extra one such as KTO's label) tokenised, truncated and split."""
    import datasets

    ds = tokenize_pairs(datasets.Dataset.from_dict(cols), tokenizer, cfg.max_length, cfg.max_prompt_length,
                        cfg.num_proc)
    keep = _count_truncation(ds, report, cfg)
    is_eval = column(ds, "is_eval")
    ds = ds.remove_columns(list(FLAG_COLUMNS) + ["loc", "is_eval"])
    train_rows, eval_rows = np.flatnonzero(keep & ~is_eval), np.flatnonzero(keep & is_eval)
    if len(train_rows if split else eval_rows) == 0:
        raise UserError(f"{source}: no pairs left after removing {int((~keep).sum())} where no response token "
                        f"fits (data.max_prompt_length={cfg.max_prompt_length} >= data.max_length={cfg.max_length})")
    report.n_train, report.n_eval, report.split = len(train_rows), len(eval_rows), split
    name = builtin_name(source)
    task = get_task(name, cfg.seed, cfg.builtin_size) if name is not None else None
    eval_prompts = task.heldout_prompts if task else list(dict.fromkeys(cols["prompt"][i] for i in eval_rows))
    return PreferenceData(train=_select(ds, train_rows), eval=_select(ds, eval_rows), report=report,
                          eval_prompts=eval_prompts, score=task.score if task else None)


def _count_truncation(ds, report: DataReport, cfg: DataConfig) -> np.ndarray:
    """Count truncation of the kept pairs in the report; skip (and count) those where no response token fits.
    Returns the mask of kept rows."""
    too_long = column(ds, "prompt_too_long")
    for loc in column(ds, "loc")[too_long]:
        report.skip("prompt_too_long", int(loc), f"no response token fits: max_prompt_length="
                    f"{cfg.max_prompt_length} >= max_length={cfg.max_length}")
    keep = ~too_long
    report.max_length, report.max_prompt_length = cfg.max_length, cfg.max_prompt_length
    report.truncated_prompts = int(column(ds, "prompt_truncated")[keep].sum())
    report.truncated_chosen = int(column(ds, "chosen_truncated")[keep].sum())
    report.truncated_rejected = int(column(ds, "rejected_truncated")[keep].sum())
    report.unknown_chars = int(column(ds, "unknown_chars")[keep].sum())
    return keep


def _select(ds, rows: np.ndarray):
    return ds if len(rows) == len(ds) else ds.select(rows.tolist())
