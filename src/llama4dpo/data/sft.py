"""SFT data: demonstrations (prompt, response) as tokenised `datasets.Dataset`s with columns prompt_ids and
response_ids (`collate_sft` makes them rows of prompt + response, the loss on the response alone).

A preference source gives its chosen responses; `builtin:NAME` gives its task's demonstrations (the mixed-quality
corpus the SFT reference imitates), with the ideal answers on its held-out prompts as the eval split. Reading,
checking, the split, truncation and the data report are the preference pipeline's (`preference.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import DataConfig
from .preference import load_preference_data
from .report import DataReport


@dataclass
class SFTData:
    train: "datasets.Dataset"  # noqa: F821  columns prompt_ids, response_ids
    eval: "datasets.Dataset"  # noqa: F821
    report: DataReport
    eval_prompts: list[str]


def load_sft_data(source: str, cfg: DataConfig, tokenizer, *, strict: bool | None = None) -> SFTData:
    pairs = load_preference_data(source, cfg, tokenizer, strict=strict, sft=True)
    return SFTData(train=_demonstrations(pairs.train), eval=_demonstrations(pairs.eval), report=pairs.report,
                   eval_prompts=pairs.eval_prompts)


def _demonstrations(ds):
    """A pair's prompt and chosen response, the rejected one dropped."""
    return ds.remove_columns(["rejected_ids"]).rename_column("chosen_ids", "response_ids")
