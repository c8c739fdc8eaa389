"""The Llama 4 text model: pre-norm decoder blocks over token embeddings, final norm, LM head.

Module names follow transformers' Llama4ForCausalLM, so our state dict maps onto theirs with a `model.`
prefix (see interop/hf.py): embed_tokens, layers.N.{self_attn, feed_forward, input_layernorm,
post_attention_layernorm}, norm, lm_head.
"""

import torch
from torch import nn

from ..config import ModelConfig
from .attention import Attention, take
from .cache import KVCache
from .masks import causal_masks, decode_masks, packed_masks, unpadded_masks
from .moe import MoE, FeedForward
from .norm import RMSNorm
from .rope import RotaryPositionalEmbedding


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.feed_forward = MoE(cfg) if self.is_moe else FeedForward(cfg.hidden_size, cfg.dense_size)

    def forward(self, x, rope, positions, masks, cache=None, keep=None):
        """x (B, S, D) -> (B, S, D); with keep (B, M), only those positions' outputs, (B, M, D): attention then
        takes queries there alone (keys and values stay at every position), and the feed-forward runs there."""
        mask = masks[1] if self.self_attn.chunked else masks[0]
        residual = x if keep is None else take(x, keep)
        h = residual + self.self_attn(self.input_layernorm(x), rope, positions, mask, cache, keep)
        return h + self.feed_forward(self.post_attention_layernorm(h))

    def init_weights(self, std: float) -> None:
        self.input_layernorm.init_weights()
        self.post_attention_layernorm.init_weights()
        self.self_attn.init_weights(std)
        self.feed_forward.init_weights(std)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.rotary_emb = RotaryPositionalEmbedding(cfg)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def init_weights(self, seed: int | None = None) -> "LlamaModel":
        """N(0, initializer_range) for every matrix, ones for norms, zero padding row (as transformers)."""
        if seed is not None:
            torch.manual_seed(seed)
        std = self.cfg.initializer_range
        nn.init.normal_(self.embed_tokens.weight, std=std)
        if self.cfg.pad_token_id is not None:
            with torch.no_grad():
                self.embed_tokens.weight[self.cfg.pad_token_id].zero_()
        self.rotary_emb.init_weights()
        for layer in self.layers:
            layer.init_weights(std)
        self.norm.init_weights()
        if not self.cfg.tie_word_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)
        return self

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                logit_index: torch.Tensor | None = None, cache: KVCache | None = None,
                return_hidden: bool = False) -> torch.Tensor:
        """input_ids (B, S) -> logits (B, S, V), or the final hidden states (B, S, D) with return_hidden.

        attention_mask (B, S_past + S), 1 for real tokens, 0 for (left) padding. Positions default to
        the count of real tokens before each one, so a left-padded row computes what it would alone.
        With a cache, the new tokens are appended to it and attend to everything cached.
        segment_ids (B, S) with position_ids: rows that pack a prompt (0) and its responses (1, 2; -1 pads),
        see `shared_prefix_masks` (training and scoring only: no attention_mask, no cache). logit_index
        (B, M): the output only at these indices, (B, M, V) logits or (B, M, D) hidden states.
        """
        if segment_ids is not None and (position_ids is None or attention_mask is not None or cache is not None):
            raise ValueError("segment_ids needs position_ids, and takes neither attention_mask nor a cache")
        B, S = input_ids.shape
        past = cache.length if cache is not None else 0
        if cache is not None and past + S > cache.max_len:
            raise ValueError(f"KV cache full: {past} cached + {S} new tokens > its {cache.max_len} slots")
        last_position = None  # the largest position, where known without reading it from a tensor
        if position_ids is None:
            last_position = past + S - 1 if attention_mask is None else None
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + S]
            else:
                position_ids = torch.arange(past, past + S, device=input_ids.device).expand(B, S)
        if segment_ids is not None:
            masks = packed_masks(position_ids, segment_ids, self.cfg.attention_chunk_size)
        else:
            masks = self._masks(position_ids, attention_mask, cache, S, last_position)
        rope = self.rotary_emb(position_ids)

        x = self.embed_tokens(input_ids)  # (B, S, D); Llama 4 does not scale embeddings
        # Only the positions in logit_index are scored: the last layer's queries and feed-forward are taken there
        # alone, and so are the final norm and LM head. (Not where that layer's balance loss is on: it is a mean
        # over all positions.) 15m DPO benchmark, a third of each packed row prompt: 1.09x a step (feed-forward),
        # then 1.006-1.03x (queries).
        last = len(self.layers) - 1
        early = logit_index is not None and not (self.layers[last].is_moe and self.cfg.router_aux_loss_coef > 0)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, position_ids, masks, cache, keep=logit_index if early and i == last else None)
        if cache is not None:
            cache.slot.add_(S)
        if logit_index is not None and not early:
            x = take(x, logit_index)  # (B, M, D)
        x = self.norm(x)
        return x if return_hidden else self.lm_head(x)

    def decode(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One decoding step, input_ids (B, 1) -> next-token logits (B, V): what
        forward(input_ids, cache=cache)[:, -1] computes after a prefill (forward with the cache) of
        left-padded rows. The cache must have a free slot: nothing checks it here (that would read a number
        from a tensor at every step).

        The new token goes into slot `cache.slot` of the preallocated cache and attends over the whole cache
        under a mask of the filled slots. Every step then has the same shapes and reads no Python number
        from a tensor (bar, on CPU beyond `kernels.experts.ROWWISE_SLOTS` token slots, the experts' row counts), so
        `torch.compile(model.decode)` compiles once per batch size and cache length."""
        slot = cache.slot
        position_ids = cache.positions.index_select(1, slot - 1) + 1          # (B, 1): one past each row's last
        cache.positions.index_copy_(1, slot, position_ids)
        cache.valid.index_fill_(1, slot, True)
        full, chunked = decode_masks(cache.positions, cache.valid, slot, position_ids, self.cfg.attention_chunk_size)
        rope = self.rotary_emb(position_ids)
        x = self.embed_tokens(input_ids)
        cache.static = True
        try:
            for layer in self.layers:
                x = layer(x, rope, position_ids, (full, chunked), cache)
        finally:
            cache.static = False
        cache.slot.add_(1)
        return self.lm_head(self.norm(x[:, -1]))

    def _masks(self, position_ids, attention_mask, cache, S, last_position=None):
        """(full, chunked) masks for rows with padding (attention_mask) and/or a cache, else `unpadded_masks`."""
        chunk = self.cfg.attention_chunk_size
        if cache is None and attention_mask is None:
            return unpadded_masks(position_ids, chunk, last_position)
        if cache is None:
            return causal_masks(position_ids, position_ids, attention_mask.bool(), 0, chunk)
        past = cache.length
        end = past + S
        cache.positions[:, past:end] = position_ids
        cache.valid[:, past:end] = attention_mask[:, past:end].bool() if attention_mask is not None else True
        return causal_masks(position_ids, cache.positions[:, :end], cache.valid[:, :end], past, chunk)

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        return KVCache(self.cfg, batch_size, max_len, self.embed_tokens.weight.device, self.cache_dtype())

    def cache_dtype(self) -> torch.dtype:
        """The dtype keys and values come out in: autocast's, else the weights'."""
        p = self.embed_tokens.weight
        return torch.get_autocast_dtype(p.device.type) if torch.is_autocast_enabled(p.device.type) else p.dtype

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the MoE load-balancing terms of the last forward (None when disabled)."""
        terms = [l.feed_forward.aux_loss for l in self.layers if l.is_moe and l.feed_forward.aux_loss is not None]
        return torch.stack(terms).sum() if terms else None

    def expert_load(self) -> dict[int, list[int]]:
        """Tokens routed to each expert in the last forward, per MoE layer index."""
        return {i: counts.tolist() for i, counts in self.expert_counts().items()}

    def expert_counts(self) -> dict[int, torch.Tensor]:
        """expert_load as (E,) tensors on the model's device (reading them waits for the forward)."""
        return {i: l.feed_forward.tokens_per_expert for i, l in enumerate(self.layers)
                if l.is_moe and l.feed_forward.tokens_per_expert is not None}

    def num_params(self) -> tuple[int, int]:
        """(total, active per token): active counts top-k of the routed experts, not all E."""
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        for l in self.layers:
            if l.is_moe:
                ex = l.feed_forward.experts
                per_expert = (ex.gate_up_proj.numel() + ex.down_proj.numel()) // l.feed_forward.num_experts
                inactive += per_expert * (l.feed_forward.num_experts - l.feed_forward.top_k)
        return total, total - inactive
