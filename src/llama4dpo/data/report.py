"""What happened to every record: skips counted by reason (with where they were), truncation counted.

Bad input never crashes a run and is never dropped silently. Each bad record is skipped with one of
these reasons, and `DataReport.summary()` prints the counts and the first few locations before training:

    malformed_json       a JSONL line (or JSON record) that does not parse, or is not an object
    missing_field        a required field is absent (prompt for explicit; chosen, rejected)
    null_field           a required field is null (or a CSV row with too few cells)
    non_string_field     a text field that is a number, list, ... (message lists only in conversational)
    empty_field          a prompt or response that is empty or whitespace after normalisation
    bad_messages         conversational: not a list of {"role": user|assistant|system, "content": str}
    no_assistant_turn    the transcripts share no "Assistant:" turn / the last message is not the assistant's
    mismatched_prompts   conversational: chosen and rejected continue different conversations
    identical_responses  chosen == rejected after normalisation (no preference to learn)
    prompt_too_long      no response token fits after the prompt (only if max_prompt_length >= max_length,
                         which the config refuses: a long prompt is truncated to its end, never skipped)
    bad_transcript       with a chat template: an HH transcript with text before its first turn marker
    template_not_prefix  with a chat template: its render of the prompt (with the generation prompt) is not
                         a prefix of its render of the conversation with the answer
    template_error       with a chat template: the template failed on the conversation (e.g. raise_exception)
    special_token_in_text  with a chat template: a text holds one of the model's special (control) tokens
    bad_label            unpaired (KTO): a label that is not true/false (or 1/0)

In strict mode the first bad record is a one-line `UserError` instead.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..errors import UserError

REASONS = ("malformed_json", "missing_field", "null_field", "non_string_field", "empty_field", "bad_messages",
           "no_assistant_turn", "mismatched_prompts", "identical_responses", "prompt_too_long",
           "bad_transcript", "template_not_prefix", "template_error", "special_token_in_text", "bad_label")
SHOW_FIRST = 5  # locations remembered per reason


class Skip(Exception):
    """Raised by record parsers; caught by `DataReport.skip`'s caller. `detail` is a short phrase."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


@dataclass
class DataReport:
    source: str
    format: str = ""
    unit: str = "line"               # "line" (1-based, JSONL/CSV) or "record" (0-based index: JSON/parquet/hub)
    strict: bool = False
    records: int = 0                 # records read, good and bad
    skipped: Counter = field(default_factory=Counter)
    first: dict[str, list[int]] = field(default_factory=dict)  # reason -> first SHOW_FIRST locations
    n_train: int = 0
    n_eval: int = 0
    split: bool = True               # False: no train/eval split, every kept pair is scored (`llama4dpo eval`)
    max_length: int | None = None
    max_prompt_length: int | None = None
    truncated_prompts: int = 0       # prompts cut to their last max_prompt_length tokens
    truncated_chosen: int = 0        # responses cut to fit max_length (their eos is lost)
    truncated_rejected: int = 0
    unknown_chars: int = 0           # characters of the kept pairs outside the tokenizer's vocabulary (-> <unk>)

    def where(self, loc: int) -> str:
        return f"{self.source} line {loc}" if self.unit == "line" else f"{self.source} record {loc}"

    def skip(self, reason: str, loc: int, detail: str = "") -> None:
        """Count one bad record; in strict mode raise the one-line error instead."""
        if self.strict:
            why = f"{reason} ({detail})" if detail else reason
            raise UserError(f"{self.where(loc)}: {why}; bad records are errors because data.strict=true "
                            "(set it to false to skip and count them)")
        self.skipped[reason] += 1
        self.first.setdefault(reason, [])
        if len(self.first[reason]) < SHOW_FIRST:
            self.first[reason].append(loc)

    @property
    def kept(self) -> int:
        return self.n_train + self.n_eval

    def to_dict(self) -> dict:
        """The counts as JSON (`llama4dpo eval --out`): the same numbers `summary` prints."""
        return {"source": self.source, "format": self.format, "read": self.records, "kept": self.kept,
                "train": self.n_train, "eval": self.n_eval,
                "skipped": {r: self.skipped[r] for r in REASONS if self.skipped[r]},
                "max_length": self.max_length, "max_prompt_length": self.max_prompt_length,
                "truncated_prompts": self.truncated_prompts, "truncated_chosen": self.truncated_chosen,
                "truncated_rejected": self.truncated_rejected, "unknown_chars": self.unknown_chars}

    def summary(self) -> str:
        """A few lines for the console / log, printed before training (or scoring) starts."""
        n_skip = sum(self.skipped.values())
        use = f"{self.n_train} train / {self.n_eval} eval" if self.split else "all scored, no train/eval split"
        lines = [f"data {self.source} ({self.format}): {self.records} records read, {self.kept} kept ({use}), "
                 f"{n_skip} skipped"]
        for reason in REASONS:
            if self.skipped[reason]:
                more = ", ..." if self.skipped[reason] > len(self.first[reason]) else ""
                locs = ", ".join(map(str, self.first[reason])) + more
                lines.append(f"  skipped {self.skipped[reason]} {reason} ({self.unit}s {locs})")
        if self.max_length is not None:
            kinds = ("completions", "KL completions") if self.format.startswith("unpaired") else ("chosen", "rejected")
            lines.append(f"  truncation (max_length={self.max_length}, max_prompt_length={self.max_prompt_length}: "
                         f"prompts keep their end, responses their start): {self.truncated_prompts} prompts, "
                         f"{self.truncated_chosen} {kinds[0]} and {self.truncated_rejected} {kinds[1]} responses cut "
                         "(a cut response loses its eos)")
        if self.unknown_chars:
            lines.append(f"  {self.unknown_chars} characters outside the tokenizer's vocabulary mapped to <unk>")
        return "\n".join(lines)
