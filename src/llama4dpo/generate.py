"""Text generation: prefill + KV-cache decoding, batched with left padding; greedy, temperature, top-k, top-p.

A left-padded row computes exactly what it would alone: positions count real tokens only and padding
is masked from attention (see LlamaModel.forward), so batched generation equals one-by-one generation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from . import resources
from .errors import UserError
from .runtime import Decoder


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0     # 0 -> greedy
    top_k: int = 0               # 0 -> no top-k filter
    top_p: float = 1.0           # 1 -> no nucleus filter
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings (the text is cut before them)

    def validate(self) -> "Sampling":
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise UserError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:  # also rejects NaN
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        return self


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties at the k-th value are kept), -inf elsewhere."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter (Holtzman et al. 2020): keep the smallest set of most likely tokens whose total
    probability reaches p; the most likely token is always kept."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
    remove_sorted = before >= p
    remove_sorted[..., 0] = False  # p can round to 0 in float32: the most likely token always stays
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def next_token(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,)."""
    if s.temperature < 1e-5:  # 0 means greedy; a vanishing temperature is greedy too (and would overflow)
        return logits.argmax(dim=-1)
    logits = filter_top_p(filter_top_k(logits.float() / s.temperature, s.top_k), s.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_ids(model, prompts: list[list[int]], s: Sampling, *, eos_id: int | None = None, pad_id: int,
                 use_cache: bool = True, on_token: Callable[[int, int], None] | None = None, compile: bool = False,
                 stop_ids: Iterable[int] | None = None, decoder: Decoder | None = None) -> list[list[int]]:
    """New token ids per prompt (the stop token, when produced, included): a row stops at `eos_id` or at any
    of `stop_ids` (e.g. `tokenizer.stop_ids`: eos and a chat template's end-of-turn token). `on_token(row, id)`
    streams. With `compile`, decoding steps run `torch.compile(model.decode)` through `decoder` (a new
    `runtime.Decoder` if none is given; pass one to reuse its compiled step and caches across calls)."""
    stops = frozenset(({eos_id} if eos_id is not None else set()) | set(map(int, stop_ids or ())))
    if not stops:
        raise ValueError("generate_ids needs eos_id or stop_ids")
    s.validate()
    if any(len(p) == 0 for p in prompts):
        raise UserError("empty prompt")
    ctx = model.cfg.max_position_embeddings
    longest = max(len(p) for p in prompts)
    if longest + s.max_new_tokens > ctx:
        raise UserError(f"prompt of {longest} tokens + max_new_tokens={s.max_new_tokens} exceeds the model's "
                        f"context of {ctx} tokens (model.max_position_embeddings); shorten the prompt or lower "
                        f"max_new_tokens")
    device = next(model.parameters()).device
    B = len(prompts)
    max_len = longest + s.max_new_tokens
    if compile:  # cache lengths in steps of 128: batches of other lengths reuse the compiled step
        max_len = min(ctx, -(-max_len // 128) * 128)
    # before anything of the batch's size is allocated: a one-line error naming the batch size and max_new_tokens
    resources.check_generation(model.cfg, B, max_len, device, max_new_tokens=s.max_new_tokens,
                               prompt_len=longest if use_cache else max_len,
                               dtype_bytes=model.cache_dtype().itemsize, kv_cache=use_cache)
    ids = torch.full((B, longest), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, longest), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):  # left padding
        ids[i, longest - len(p):] = torch.tensor(p, device=device)
        mask[i, longest - len(p):] = 1
    generator = None
    if s.seed is not None:
        generator = torch.Generator(device=device).manual_seed(s.seed)
    if not use_cache:
        return _sample(model, ids, mask, None, None, s, generator, stops, pad_id, on_token)
    if compile:
        decoder = decoder or Decoder(model)
        with decoder.cache(B, max_len) as cache:
            return _sample(model, ids, mask, cache, decoder.step, s, generator, stops, pad_id, on_token)
    return _sample(model, ids, mask, model.new_cache(B, max_len), model.decode, s, generator, stops, pad_id,
                   on_token)


def _sample(model, ids, mask, cache, decode, s: Sampling, generator, stops: frozenset, pad_id: int, on_token):
    """The token loop of generate_ids: prefill (into the cache, if any), then one token per step."""
    B = len(ids)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B  # rows that produced a stop token: fed pad from then on, their tokens dropped

    def last_logits(ids, mask, cache=None):  # (B, V): the LM head on the last position only
        last = torch.full((B, 1), ids.shape[1] - 1, device=ids.device)
        return model(ids, attention_mask=mask, cache=cache, logit_index=last)[:, 0]

    logits = last_logits(ids, mask, cache)
    for step in range(s.max_new_tokens):
        tok = next_token(logits, s, generator)
        values = tok.tolist()  # (the step's one read of its tokens; the rest of the bookkeeping in Python)
        for i, v in enumerate(values):
            if not done[i]:
                out[i].append(v)
                if on_token:
                    on_token(i, v)
                done[i] = v in stops
        if all(done) or step == s.max_new_tokens - 1:  # (no forward for logits nobody reads)
            break
        if any(done):
            tok = torch.tensor([pad_id if d else v for d, v in zip(done, values)], device=tok.device)
        if cache is not None:
            logits = decode(tok[:, None], cache)
        else:
            ids = torch.cat([ids, tok[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits = last_logits(ids, mask)
    return out


def generate(model, tokenizer, prompts: list[str], s: Sampling, *, use_cache: bool = True,
             batch_size: int = 16, stream: Callable[[str], None] | None = None, compile: bool = False) -> list[str]:
    """Completions of prompt texts (bos is prepended as data preparation does, see `encode_prompts`; generation
    stops at any of `tokenizer.stop_ids`; special tokens and text after a stop string are removed)."""
    from .data.prepare import encode_prompts

    texts = []
    decoder = Decoder(model) if compile else None  # (one compiled step for every batch)
    for lo in range(0, len(prompts), batch_size):
        chunk = encode_prompts(tokenizer, prompts[lo:lo + batch_size])
        on_token = _streamer(tokenizer, stream) if stream is not None and len(prompts) == 1 else None
        for ids in generate_ids(model, chunk, s, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                                use_cache=use_cache, on_token=on_token, compile=compile, decoder=decoder,
                                stop_ids=getattr(tokenizer, "stop_ids", None)):
            texts.append(cut_at_stop(tokenizer.decode(ids), s.stop))
    return texts


def _streamer(tokenizer, emit: Callable[[str], None]) -> Callable[[int, int], None]:
    """Emit only the newly decoded text each token (byte-level BPE tokens can split a character)."""
    ids, shown = [], [""]

    def on_token(row: int, tok: int) -> None:
        ids.append(tok)
        text = tokenizer.decode(ids)
        if text.startswith(shown[0]) and not text.endswith("\ufffd"):
            emit(text[len(shown[0]):])
            shown[0] = text
    return on_token


def cut_at_stop(text: str, stops: list[str]) -> str:
    cut = min((text.find(x) for x in stops if x and x in text), default=-1)
    return text if cut < 0 else text[:cut]
