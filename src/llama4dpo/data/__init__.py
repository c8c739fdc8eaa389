"""Data: sources -> checked texts -> tokenised examples -> batches.

    sources.py     read records from a file (.jsonl/.json/.csv/.parquet, .gz), a hub dataset or builtin:NAME
    formats.py     detect explicit / hh / conversational and extract (prompt, chosen, rejected)
    chat.py        the one chat template (HH convention), shared with generation
    report.py      bad records skipped and counted by reason; truncation counts
    prepare.py     tokenisation and the truncation policy (long prompts keep their end, never dropped)
    preference.py  load_preference_data: the whole pipeline for preference pairs, with the eval split
                   (or none: every pair scored, for `llama4dpo eval`)
    unpaired.py    load_unpaired_data: KTO's (prompt, completion, label) examples, with their KL completions
    sft.py         load_sft_data: demonstrations (prompt, response) for SFT, through the same pipeline
    batches.py     examples or a token stream as the Trainer's deterministic, resumable batches
    collate.py     padded [chosen; rejected] (DPO) and prompt + chosen (SFT) batches
    lm.py          pretraining corpora as a token stream sampled in block_size windows
    builtin.py     builtin:assistant, a generated task with a ground-truth reward
"""

from .builtin import TASKS, Task, get_task
from .chat import ASSISTANT, HUMAN, SYSTEM, render_prompt, render_response, render_transcript, split_transcripts
from .collate import IGNORE_INDEX, collate_preference, collate_preference_shared, collate_sft, preference_collator
from .formats import FORMATS, detect_format, extract_pair
from .lm import TokenStream, load_text_corpus, load_token_streams, training_texts
from .preference import PreferenceData, check_context, load_preference_data, read_pairs
from .prepare import prepare_pair, truncate_pair
from .report import REASONS, DataReport
from .sft import SFTData, load_sft_data
from .unpaired import load_unpaired_data
from .sources import read_records, write_records

__all__ = [
    "load_unpaired_data",
    "TASKS", "Task", "get_task",
    "ASSISTANT", "HUMAN", "SYSTEM", "render_prompt", "render_response", "render_transcript", "split_transcripts",
    "IGNORE_INDEX", "collate_preference", "collate_preference_shared", "collate_sft", "preference_collator",
    "FORMATS", "detect_format", "extract_pair",
    "TokenStream", "load_text_corpus", "load_token_streams", "training_texts",
    "PreferenceData", "check_context", "load_preference_data", "read_pairs",
    "prepare_pair", "truncate_pair",
    "REASONS", "DataReport", "SFTData", "load_sft_data",
    "read_records", "write_records",
]
