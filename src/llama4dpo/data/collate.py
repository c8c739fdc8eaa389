"""Collators: prepared examples -> padded batches of torch tensors (the Hugging Face conventions).

    input_ids       LongTensor [N, T]  prompt + response ids, right-padded with pad_id
    attention_mask  LongTensor [N, T]  1 on real tokens, 0 on padding
    labels          LongTensor [N, T]  input_ids on response tokens (eos included), -100 on prompt and padding

labels are NOT shifted: the loss scores log p(labels[t] | input_ids[:t]), shifting by one itself. Position 0
is always the prompt's bos, so no response token is lost to the shift.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

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
    return with_labels(pad_sequences(chosen + rejected, pad_id, pad_to_multiple_of), examples)


def collate_preference_shared(examples: Sequence[Mapping], pad_id: int,
                              pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """B prepared pairs -> B rows [prompt | chosen | rejected] (prefix sharing): the prompt is computed once
    per pair and both responses attend to it, never to each other (the model's `segment_ids` mask). Each
    response's positions restart after the prompt, so its log-probs equal those of `collate_preference`'s
    two rows, with a quarter fewer tokens through the model when prompt and responses are of equal length.

        input_ids    LongTensor [B, L]  prompt + chosen + rejected, right-padded with pad_id
        position_ids LongTensor [B, L]  0..P-1, then P.. for chosen, then P.. again for rejected; 0 on padding
        segment_ids  LongTensor [B, L]  0 prompt, 1 chosen, 2 rejected, -1 padding
        attention_mask LongTensor [B, L]  1 on real tokens
        logit_index  LongTensor [B, M]  for each response token, the index whose logits predict it
        targets      LongTensor [B, M]  the response tokens (chosen, then rejected), -100 padding
        branch       LongTensor [B, M]  1 chosen, 2 rejected, 0 padding

    Worked example (pad_id=0): {"prompt_ids": [1, 5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 2]}

        input_ids    = [[1, 5, 6, 7, 2, 8, 9, 2]]
        position_ids = [[0, 1, 2, 3, 4, 3, 4, 5]]
        segment_ids  = [[0, 0, 0, 1, 1, 2, 2, 2]]
        logit_index  = [[2, 3, 2, 5, 6]]       # rejected's first token is predicted by the prompt's last
        targets      = [[7, 2, 8, 9, 2]]
        branch       = [[1, 1, 2, 2, 2]]
    """
    B = len(examples)
    L = max((len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples), default=0)
    M = max((len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples), default=0)
    if pad_to_multiple_of:  # both lengths: the rows' and the scored positions'
        L = -(-L // pad_to_multiple_of) * pad_to_multiple_of
        M = -(-M // pad_to_multiple_of) * pad_to_multiple_of
    out = {"input_ids": torch.full((B, L), pad_id, dtype=torch.long),
           "position_ids": torch.zeros((B, L), dtype=torch.long),
           "segment_ids": torch.full((B, L), -1, dtype=torch.long),
           "attention_mask": torch.zeros((B, L), dtype=torch.long),
           "logit_index": torch.zeros((B, M), dtype=torch.long),
           "targets": torch.full((B, M), IGNORE_INDEX, dtype=torch.long),
           "branch": torch.zeros((B, M), dtype=torch.long)}
    for i, ex in enumerate(examples):
        p, c, r = list(ex["prompt_ids"]), list(ex["chosen_ids"]), list(ex["rejected_ids"])
        P, C, R = len(p), len(c), len(r)
        if P == 0:
            raise ValueError("a prompt must hold at least one token (bos) to predict the response from")
        n = P + C + R
        out["input_ids"][i, :n] = torch.tensor(p + c + r, dtype=torch.long)
        out["position_ids"][i, :n] = torch.tensor(list(range(P + C)) + list(range(P, P + R)), dtype=torch.long)
        out["segment_ids"][i, :n] = torch.tensor([0] * P + [1] * C + [2] * R, dtype=torch.long)
        out["attention_mask"][i, :n] = 1
        out["logit_index"][i, :C + R] = torch.tensor(_sources(P, P, C) + _sources(P, P + C, R), dtype=torch.long)
        out["targets"][i, :C + R] = torch.tensor(c + r, dtype=torch.long)
        out["branch"][i, :C + R] = torch.tensor([1] * C + [2] * R, dtype=torch.long)
    return with_labels(out, examples)


def with_labels(batch: dict, examples: Sequence[Mapping]) -> dict:
    """KTO's unpaired examples (data/unpaired.py) carry whether each completion is desirable: a (B,) bool tensor."""
    if examples and "label" in examples[0]:
        batch["label"] = torch.tensor([bool(e["label"]) for e in examples])
    return batch


def _sources(P: int, start: int, n: int) -> list[int]:
    """Indices predicting the n tokens of a response stored at [start, start + n) after a prompt of P: token j
    is predicted by index start + j - 1, except the first, which the prompt's last token predicts."""
    return ([P - 1] + list(range(start, start + n - 1)))[:n]


def preference_collator(share_prompt: bool) -> Callable[..., dict[str, torch.Tensor]]:
    """The preference collator that `dpo.share_prompt` picks (both give the same log-probs)."""
    return collate_preference_shared if share_prompt else collate_preference


def collate_sft(examples: Sequence[Mapping], pad_id: int,
                pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """B demonstrations (`SFTData` examples: prompt_ids, response_ids) -> B rows of prompt + response (the loss
    counts the response tokens only)."""
    return pad_sequences([(ex["prompt_ids"], ex["response_ids"]) for ex in examples], pad_id, pad_to_multiple_of)
