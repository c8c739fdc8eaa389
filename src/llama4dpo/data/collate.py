"""Collators: prepared examples -> padded batches of torch tensors (the Hugging Face conventions).

    input_ids       LongTensor [N, T]  prompt + response ids, right-padded with pad_id
    attention_mask  LongTensor [N, T]  1 on real tokens, 0 on padding
    labels          LongTensor [N, T]  input_ids on response tokens (eos included), -100 on prompt and padding

labels are NOT shifted: the loss scores log p(labels[t] | input_ids[:t]), shifting by one itself. Position 0
is always the prompt's bos, so no response token is lost to the shift.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

IGNORE_INDEX = -100


def pad_sequences(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int,
                  pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """(prompt_ids, response_ids) per row -> input_ids / attention_mask / labels, padded to the longest row."""
    T = max((len(p) + len(r) for p, r in pairs), default=0)
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(pairs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(pairs), T), dtype=torch.long)
    for i, (p, r) in enumerate(pairs):
        n_p, n = len(p), len(p) + len(r)
        input_ids[i, :n] = torch.tensor(list(p) + list(r), dtype=torch.long)
        labels[i, n_p:n] = input_ids[i, n_p:n]
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_preference(examples: Sequence[Mapping], pad_id: int,
                       pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """B prepared pairs -> one [chosen; rejected] batch of N = 2B rows: rows 0..B-1 are prompt + chosen,
    rows B..2B-1 prompt + rejected (one forward pass scores both; the loss splits at B).

    Worked example (pad_id=0, bos=1, eos=2):

        examples = [{"prompt_ids": [1, 5, 6], "chosen_ids": [7, 2],     "rejected_ids": [8, 9, 2]},
                    {"prompt_ids": [1, 5],    "chosen_ids": [7, 7, 2],  "rejected_ids": [9, 2]}]

        input_ids      = [[1, 5, 6, 7, 2, 0],       # chosen 0
                          [1, 5, 7, 7, 2, 0],       # chosen 1
                          [1, 5, 6, 8, 9, 2],       # rejected 0
                          [1, 5, 9, 2, 0, 0]]       # rejected 1
        attention_mask = [[1, 1, 1, 1, 1, 0],
                          [1, 1, 1, 1, 1, 0],
                          [1, 1, 1, 1, 1, 1],
                          [1, 1, 1, 1, 0, 0]]
        labels         = [[-100, -100, -100, 7, 2, -100],
                          [-100, -100, 7, 7, 2, -100],
                          [-100, -100, -100, 8, 9, 2],
                          [-100, -100, 9, 2, -100, -100]]
    """
    chosen = [(ex["prompt_ids"], ex["chosen_ids"]) for ex in examples]
    rejected = [(ex["prompt_ids"], ex["rejected_ids"]) for ex in examples]
    return pad_sequences(chosen + rejected, pad_id, pad_to_multiple_of)


def collate_sft(examples: Sequence[Mapping], pad_id: int,
                pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """B examples -> B rows of prompt + chosen response (the loss counts the response tokens only).
    Takes the same prepared examples as `collate_preference` (or ones with `response_ids`)."""
    key = "response_ids" if examples and "response_ids" in examples[0] else "chosen_ids"
    return pad_sequences([(ex["prompt_ids"], ex[key]) for ex in examples], pad_id, pad_to_multiple_of)
