"""Llama 4 attention: GQA; RoPE layers (qk-norm, chunked-local causal mask) and NoPE layers (global causal
mask, attention-temperature tuning). The masks are built in masks.py, the cache is cache.py's, and the product
softmax(q k^T / sqrt(d) + mask) v runs in kernels/attention.py."""

import math

import torch
from torch import nn

from ..config import ModelConfig
from ..kernels import attend
from .cache import KVCache
from .masks import mask_rows
from .norm import RMSNorm
from .rope import RotaryPositionalEmbedding


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.n_kv_heads, cfg.d_head
        self.use_rope = cfg.uses_rope(layer_idx)
        self.chunked = self.use_rope and cfg.attention_chunk_size is not None
        # NoPE layers get neither qk-norm nor RoPE, but (optionally) temperature tuning.
        self.qk_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, weight=False) if cfg.use_qk_norm and self.use_rope else None
        self.temperature_tuning = cfg.attn_temperature_tuning and not self.use_rope
        self.floor_scale, self.attn_scale = cfg.floor_scale, cfg.attn_scale
        self.dropout = cfg.attention_dropout
        D, H, K, d = cfg.hidden_size, self.n_heads, self.n_kv_heads, self.head_dim
        self.q_proj = nn.Linear(D, H * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(D, K * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(D, K * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(H * d, D, bias=cfg.attention_bias)

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor], positions: torch.Tensor,
                mask: torch.Tensor | None, cache: KVCache | None = None,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, S, D) -> (B, S, D); rope = (cos, sin) for the S positions; mask: bool (B|1, 1, S, S_kv) where
        True means "may attend" (or its additive float form, 0 / -inf), or None for plain causal attention over
        exactly these S tokens. With keep (B, M), queries (and outputs) only at those positions: (B, M, D)."""
        B, S, _ = x.shape
        k = self.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim)
        rope_k = rope
        if keep is not None:
            x, positions, rope = take(x, keep), take(positions, keep), tuple(take(r, keep) for r in rope)
            mask = mask_rows(mask, keep, S)
        q = self.q_proj(x).view(B, x.shape[1], self.n_heads, self.head_dim)
        if self.use_rope:
            q, k = RotaryPositionalEmbedding.rotate(q, *rope), RotaryPositionalEmbedding.rotate(k, *rope_k)
            if self.qk_norm is not None:
                q, k = self.qk_norm(q), self.qk_norm(k)
        if self.temperature_tuning:
            # Long-context NoPE layers sharpen attention with position: 1 + s * ln(1 + floor((p+1)/fs)).
            scale = 1 + self.attn_scale * torch.log1p(torch.floor((positions.float() + 1) / self.floor_scale))
            q = (q * scale[:, :, None, None]).type_as(q)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, S, d)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, K, S_kv, d)
        y = attend(q, k, v, mask, 1 / math.sqrt(self.head_dim), self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, -1, self.n_heads * self.head_dim))

    def init_weights(self, std: float) -> None:
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            nn.init.normal_(lin.weight, std=std)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)


def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, S, ...), index (B, M) -> (B, M, ...): x[b, index[b, m]]."""
    return x.gather(1, index.view(*index.shape, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:]))
