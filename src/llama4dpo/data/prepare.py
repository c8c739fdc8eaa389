"""Tokenisation and truncation of preference pairs.

A prepared example is three id lists:

    prompt_ids   = [bos] + encode(prompt)
    chosen_ids   = encode(chosen) + [eos]
    rejected_ids = encode(rejected) + [eos]

Prompt and responses are encoded separately, so a BPE merge never crosses the boundary and a response's
tokens are the same whatever the prompt. Each sequence prompt_ids + response_ids has exactly one bos
(first) and one eos (last, unless the response was cut; see `truncate_pair`).

Worked example (max_length=8, max_prompt_length=4): a 10-token HH transcript prompt
[bos, h1 .. h9] is longer than max_length itself, and is kept, not skipped: it becomes
[bos, h7, h8, h9] (its end: the latest turn and "Assistant:"), and each response keeps its first
8 - 4 = 4 tokens: chosen [c1, c2, eos] fits whole, rejected [r1 .. r5, eos] becomes [r1, r2, r3, r4]
(cut, so no eos). Both responses continue the same truncated prompt, so prefix sharing
(`collate_preference_shared`) still sees one prompt per pair.

With a chat template (a pretrained model's HFTokenizer) the texts were rendered by the template, which
writes the special tokens itself, so none is doubled (`encode_prompts`, `encode_responses`): the prompt
gets bos only when the model's pipeline adds one (`add_bos_token`) and the text does not start with it;
a response gets no eos when it already ends with a stop token (the template's end-of-turn token; whitespace
the template writes after it, like ChatML's "\n", is dropped, so the model learns to stop there).
"""

from __future__ import annotations

import hashlib

import numpy as np

# Per-example columns the report counts (then removed): flags, and characters outside the tokenizer's vocabulary.
FLAG_COLUMNS = ("prompt_too_long", "prompt_truncated", "chosen_truncated", "rejected_truncated", "unknown_chars")


def truncate_pair(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int],
                  max_length: int, max_prompt_length: int,
                  bos_id: int | None = 1) -> tuple[list[int], list[int], list[int]]:
    """Make prompt + each response fit in `max_length` tokens. The policy (TRL's, with TRL's names):

    1. A prompt longer than `max_prompt_length` keeps its bos and its LAST `max_prompt_length - 1`
       tokens: the end of a prompt (the latest turn, the generation prompt) matters most. A prompt that
       does not start with `bos_id` (a chat template's render without bos) keeps its last
       `max_prompt_length` tokens.
    2. Each response is then cut to its FIRST `max_length - len(prompt)` tokens. A cut response loses
       its eos (as in TRL): the model is not taught to stop where the text was cut.

    A prompt longer than max_length itself is truncated the same way, never dropped. Since the config
    requires max_prompt_length < max_length, every response keeps at least one token; only with an
    unvalidated max_prompt_length >= max_length could none fit (`tokenize_batch` flags that prompt_too_long).

    >>> truncate_pair([1, 10, 11, 12, 13], [20, 21, 2], [30, 2], max_length=5, max_prompt_length=3)
    ([1, 12, 13], [20, 21], [30, 2])
    >>> truncate_pair([1, 10, 11, 12, 13, 14, 15, 16], [20, 21, 2], [30, 2], max_length=5, max_prompt_length=3)
    ([1, 15, 16], [20, 21], [30, 2])
    """
    if len(prompt_ids) > max_prompt_length:
        head = prompt_ids[:1] if bos_id is not None and prompt_ids[:1] == [bos_id] else []
        prompt_ids = head + prompt_ids[len(prompt_ids) - (max_prompt_length - len(head)):]
    budget = max_length - len(prompt_ids)
    return prompt_ids, chosen_ids[:budget], rejected_ids[:budget]


def prepare_pair(tokenizer, prompt: str, chosen: str, rejected: str, max_length: int,
                 max_prompt_length: int) -> dict:
    """One pair's prepared example; `tokenize_batch` is the batched version."""
    batch = tokenize_batch({"prompt": [prompt], "chosen": [chosen], "rejected": [rejected]},
                           tokenizer, max_length, max_prompt_length)
    return {k: v[0] for k, v in batch.items() if k.endswith("_ids")}


def encode_prompts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Prompt texts -> ids. Without a chat template: bos + text. With one, the text is the template's render:
    bos is added only when the model's pipeline adds it (`add_bos_token`) and the render does not start with
    the bos token already (a template that writes `{{ bos_token }}`)."""
    if getattr(tokenizer, "chat_template", None) is None:
        return tokenizer.encode_batch(texts, bos=True)
    ids = tokenizer.encode_batch(texts)
    if not (getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_id is not None):
        return ids
    bos_token = getattr(tokenizer, "bos_token", None)
    return [p if bos_token and t.startswith(bos_token) else [tokenizer.bos_id] + p for t, p in zip(texts, ids)]


def encode_responses(tokenizer, texts: list[str]) -> list[list[int]]:
    """Response texts -> ids ending with a stop token. Without a chat template: text + eos. With one, a render
    already ending with a stop token (the template's end-of-turn token, maybe followed by whitespace, which
    is dropped) gets no eos; any other gets eos."""
    if getattr(tokenizer, "chat_template", None) is None:
        return tokenizer.encode_batch(texts, eos=True)
    stops = set(tokenizer.stop_ids)
    out = []
    for ids in tokenizer.encode_batch(texts):
        last = max((i for i, t in enumerate(ids) if t in stops), default=None)
        if last is not None and not tokenizer.decode(ids[last + 1:], skip_special=False).strip():
            out.append(ids[:last + 1])
        else:
            out.append(ids + [tokenizer.eos_id])
    return out


def tokenize_batch(batch: dict, tokenizer, max_length: int, max_prompt_length: int) -> dict:
    """`datasets.map(batched=True)` function: texts -> prepared ids plus the flags the report counts."""
    prompts = encode_prompts(tokenizer, batch["prompt"])
    chosens = encode_responses(tokenizer, batch["chosen"])
    rejecteds = encode_responses(tokenizer, batch["rejected"])
    unk = tokenizer.unk_id
    out: dict[str, list] = {k: [] for k in ("prompt_ids", "chosen_ids", "rejected_ids") + FLAG_COLUMNS}
    for p, c, r in zip(prompts, chosens, rejecteds):
        p2, c2, r2 = truncate_pair(p, c, r, max_length, max_prompt_length, tokenizer.bos_id)
        out["prompt_ids"].append(p2)
        out["chosen_ids"].append(c2)
        out["rejected_ids"].append(r2)
        out["prompt_too_long"].append(len(p2) >= max_length)  # no response token fits after the kept prompt
        out["prompt_truncated"].append(len(p2) < len(p))
        out["chosen_truncated"].append(len(c2) < len(c))
        out["rejected_truncated"].append(len(r2) < len(r))
        # <unk> only comes from text outside the vocabulary (a literal "<unk>" in text is ordinary characters);
        # counted from the ids, not the tokenizer's counter, which stays in a worker process when num_proc > 1.
        out["unknown_chars"].append(p.count(unk) + c.count(unk) + r.count(unk))
    return out


def tokenize_pairs(ds, tokenizer, max_length: int, max_prompt_length: int, num_proc: int = 1):
    """Tokenise a `datasets.Dataset` with text columns prompt/chosen/rejected (batched, optionally in
    `num_proc` processes). The text columns are replaced by the id columns and `FLAG_COLUMNS`."""
    import datasets

    features = datasets.Features({k: v for k, v in ds.features.items() if k not in ("prompt", "chosen", "rejected")})
    ids = datasets.Sequence(datasets.Value("int32"))  # half the memory of int64, and faster to build
    features.update({"prompt_ids": ids, "chosen_ids": ids, "rejected_ids": ids})
    features.update({k: datasets.Value("int32" if k == "unknown_chars" else "bool") for k in FLAG_COLUMNS})
    fp = getattr(tokenizer, "fingerprint", lambda: type(tokenizer).__name__)()
    # An explicit fingerprint spares `datasets` from hashing the tokenizer object (slow for large vocabularies).
    fingerprint = hashlib.sha256(f"{ds._fingerprint}/{fp}/{max_length}/{max_prompt_length}".encode()).hexdigest()
    return ds.map(tokenize_batch, batched=True, batch_size=1000,
                  num_proc=num_proc if num_proc > 1 and len(ds) >= 2000 * num_proc else None,
                  remove_columns=["prompt", "chosen", "rejected"], features=features, new_fingerprint=fingerprint[:32],
                  fn_kwargs=dict(tokenizer=tokenizer, max_length=max_length, max_prompt_length=max_prompt_length),
                  desc="tokenizing pairs")


def column(ds, name: str) -> np.ndarray:
    """A column of a (not index-mapped) dataset as a numpy array, without building Python lists."""
    return ds.data.column(name).to_numpy()
