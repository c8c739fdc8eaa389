"""Unpaired feedback for KTO: records of (prompt, completion, label), each completion desirable or not.

    data = load_unpaired_data("feedback.jsonl", cfg.data, tokenizer)   # {"prompt", "completion", "label": bool}
    data = load_unpaired_data("pairs.jsonl", cfg.data, tokenizer)      # with data.unpair=true: any paired source,
                                                                       # chosen -> desirable, rejected -> not

Each example is stored as a pair row whose "chosen" is its completion and whose "rejected" is the KL completion:
the completion of the previous example of its split (in order, wrapping), so that KTO's reference point
KL(pi || pi_ref) is estimated on mismatched (prompt, completion) pairs as TRL's KTOTrainer does, and the
prefix-shared collator computes the prompt once for both. A `label` column says desirable (True) or not. The
tokenisation, truncation, eval split (whole prompts) and report are the preference pipeline's (preference.py);
bad records are skipped and counted by reason (a label that is not a boolean: bad_label).
"""

from __future__ import annotations

from ..config import DataConfig
from ..errors import UserError
from .formats import detect_unpaired_format, extract_completion
from .preference import PreferenceData, check_context, extract_records, read_pairs, split_by_prompt, tokenized
from .report import DataReport
from .sources import builtin_name, read_records


def load_unpaired_data(source: str, cfg: DataConfig, tokenizer, *, strict: bool | None = None,
                       context: int | None = None) -> PreferenceData:
    check_context(cfg, context)
    if cfg.unpair or builtin_name(source) is not None:
        cols, report = _unpaired_pairs(source, cfg, strict, tokenizer)
    else:
        cols, report = _read_unpaired(source, cfg, strict, tokenizer)
    if not cols["prompt"]:
        skipped = ", ".join(f"{n} {reason}" for reason, n in report.skipped.items())
        raise UserError(f"{source}: no usable unpaired examples in {report.records} records ({skipped or 'empty'})")
    cols["rejected"] = _kl_completions(cols["prompt"], cols["chosen"], cols["is_eval"])
    return tokenized(cols, report, source, cfg, tokenizer)


def _read_unpaired(source: str, cfg: DataConfig, strict: bool | None, tokenizer) -> tuple[dict, DataReport]:
    strict = cfg.strict if strict is None else strict
    raw = read_records(source, split=cfg.split, max_samples=cfg.max_samples)
    fmt = detect_unpaired_format(raw, cfg.format)
    report = DataReport(source, f"unpaired {fmt}", unit=raw.unit, strict=strict, records=len(raw.rows))
    cols = extract_records(raw, report, lambda rec: extract_completion(rec, fmt, tokenizer),
                           ("prompt", "chosen", "label"))  # ("chosen": the completion; see the module docstring)
    n_eval = cfg.eval_samples if cfg.eval_samples is not None else round(cfg.eval_fraction * len(cols["prompt"]))
    cols["is_eval"] = split_by_prompt(cols["prompt"], n_eval, cfg.seed)
    return cols, report


def _unpaired_pairs(source: str, cfg: DataConfig, strict: bool | None, tokenizer) -> tuple[dict, DataReport]:
    """A paired source unpaired: each good pair gives its chosen response as a desirable example and its rejected
    one as an undesirable example, next to each other (in the same split)."""
    pairs, report = read_pairs(source, cfg, strict=strict, tokenizer=tokenizer)
    report.format = f"unpaired {report.format}"
    cols: dict[str, list] = {"prompt": [], "chosen": [], "label": [], "loc": [], "is_eval": []}
    for prompt, chosen, rejected, loc, is_eval in zip(*(pairs[k] for k in ("prompt", "chosen", "rejected", "loc",
                                                                            "is_eval"))):
        for completion, label in ((chosen, True), (rejected, False)):
            for key, value in zip(cols, (prompt, completion, label, loc, is_eval)):
                cols[key].append(value)
    return cols, report


def _kl_completions(prompts: list[str], completions: list[str], is_eval: list[bool]) -> list[str]:
    """Each example's mismatched completion: that of the nearest previous example of its own split (wrapping
    around) with another prompt (the previous one where every prompt is the same)."""
    out = list(completions)
    for split in (False, True):
        rows = [i for i, e in enumerate(is_eval) if e == split]
        for k, i in enumerate(rows):
            j = rows[k - 1]
            for back in range(1, len(rows)):
                if prompts[rows[k - back]] != prompts[i]:
                    j = rows[k - back]
                    break
            out[i] = completions[j]
    return out
