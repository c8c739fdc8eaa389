"""Llama 4 attention: GQA; RoPE layers (qk-norm, chunked-local causal mask) and NoPE layers (global causal
mask, attention-temperature tuning). Plus the KV cache used for incremental decoding."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .norm import RMSNorm
from .rope import RotaryPositionalEmbedding


class KVCache:
    """Preallocated keys/values for every layer, plus each cached token's position and padding flag.

    k[layer], v[layer]: (B, K, max_len, d). `length` tokens are filled, held as the tensor `slot` (the next
    free slot); the model advances it after a forward. In a `static` step (`LlamaModel.decode`) `update` writes
    its one token at `slot` and returns the whole buffers, so every step has the same shapes and reads no
    Python number from a tensor: what torch.compile needs to compile the step once.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.d_head)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.positions = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.static = False

    @property
    def length(self) -> int:
        return int(self.slot)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, K, S, d) at [length, length + S) and return everything cached so far."""
        if self.static:  # one token at `slot`; the caller's mask hides the slots not yet filled
            self.k[layer].index_copy_(2, self.slot, k.to(self.k[layer].dtype))
            self.v[layer].index_copy_(2, self.slot, v.to(self.v[layer].dtype))
            return self.k[layer], self.v[layer]
        start = self.length
        end = start + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


# CPU, bf16: up to this many attention scores (B x heads x S x S_kv) the plain products below beat SDPA's fused
# kernels (in fp32, the faster of its two there: fwd+bwd at 8 x 8 heads x 192^2, 7.2 vs 11.7 ms; 384^2, 28 vs
# 38 ms; 512^2, 91 vs 67 ms). They keep the scores for the backward: 2 bytes each, 16 MiB at most per layer.
SMALL_SCORES = 1 << 23


def bf16_attention(q, k, v, mask, scale: float, dropout: float = 0.0) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v as plain batched products (bf16 on CPU, few scores).
    q (B, H, S, d); k, v (B, K, S_kv, d) with K dividing H (GQA); mask as SDPA's attn_mask, or None for
    causal attention over exactly these S tokens -> (B, H, S, d)."""
    B, H, S, d = q.shape
    K, S_kv = k.shape[1], k.shape[2]
    if mask is None:
        mask = torch.ones(S, S_kv, dtype=torch.bool, device=q.device).tril(S_kv - S)
    q = q.view(B, K, H // K, S, d)                                       # query heads grouped by kv head
    scores = (q * scale) @ k[:, :, None].transpose(-1, -2)               # (B, K, g, S, S_kv)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask.reshape(-1, 1, 1, S, S_kv), -torch.inf)
    else:
        scores = scores + mask.reshape(-1, 1, 1, S, S_kv).to(scores.dtype)
    p = F.dropout(scores.softmax(dim=-1), dropout) if dropout else scores.softmax(dim=-1)
    return (p @ v[:, :, None]).view(B, H, S, d)


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
            mask = _mask_rows(mask, keep, S)
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
        scale = 1 / math.sqrt(self.head_dim)
        dropout = self.dropout if self.training else 0.0
        small = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= SMALL_SCORES
        if q.device.type == "cpu" and q.dtype == torch.bfloat16 and small:
            y = bf16_attention(q, k, v, mask, scale, dropout)
        else:
            y = self._sdpa(q, k, v, mask, scale, dropout)
        return self.o_proj(y.transpose(1, 2).reshape(B, -1, self.n_heads * self.head_dim))

    def _sdpa(self, q, k, v, mask, scale: float, dropout: float) -> torch.Tensor:
        """PyTorch's fused attention kernels (SDPA), q's dtype in and out."""
        dtype = q.dtype
        if q.device.type == "cpu" and dtype == torch.bfloat16:  # CPU's bf16 SDPA kernels run ~1.4x slower than fp32
            q, k, v = q.float(), k.float(), v.float()
        gqa = self.n_kv_heads != self.n_heads  # kv head j serves query heads j*g .. j*g+g-1
        if gqa and mask is not None and q.device.type == "cuda":
            # CUDA's kernel for masked attention (memory-efficient) takes no GQA: SDPA would fall back to its
            # unfused math path. Expanding the kv heads keeps the fused kernel.
            g = self.n_heads // self.n_kv_heads
            k, v, gqa = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1), False
        if mask is not None and mask.is_floating_point() and mask.dtype != q.dtype:
            mask = mask.to(q.dtype)  # an additive mask cast on the way (e.g. by FSDP2's bf16 policy) must match q
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout,
                                           scale=scale, enable_gqa=gqa)
        return y.to(dtype)

    def init_weights(self, std: float) -> None:
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            nn.init.normal_(lin.weight, std=std)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)


def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, S, ...), index (B, M) -> (B, M, ...): x[b, index[b, m]]."""
    return x.gather(1, index.view(*index.shape, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:]))


def _mask_rows(mask: torch.Tensor | None, keep: torch.Tensor, S: int) -> torch.Tensor:
    """The rows of the queries at `keep` (B, M) of an attention mask: (B, 1, M, S_kv)."""
    if mask is None:  # causal over exactly these S tokens: key index <= query index
        return (torch.arange(S, device=keep.device) <= keep[:, :, None])[:, None]
    mask = mask.expand(len(keep), *mask.shape[1:])
    return mask.gather(2, keep[:, None, :, None].expand(-1, mask.shape[1], -1, mask.shape[-1]))


def attention_masks(q_pos: torch.Tensor, k_pos: torch.Tensor, k_valid: torch.Tensor | None,
                    offset: int, chunk_size: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Boolean masks (B, 1, S, S_kv), True = may attend, for full and chunked layers.

    q_pos (B, S) and k_pos (B, S_kv) are token positions; query i sits at sequence index offset + i.
    Causality is by index; chunking compares positions: a key is visible to a RoPE layer's query only
    inside the same block of `chunk_size` positions (a hard reset at boundaries, not a sliding window).
    Each query may always see itself, so rows of padding never become all -inf (NaN).
    """
    S, S_kv = q_pos.shape[1], k_pos.shape[1]
    q_idx = torch.arange(S, device=q_pos.device)[:, None] + offset
    k_idx = torch.arange(S_kv, device=q_pos.device)[None, :]
    causal = (k_idx <= q_idx)[None]  # (1, S, S_kv)
    if k_valid is not None:
        causal = causal & k_valid[:, None, :]
    diag = (k_idx == q_idx)[None]
    return _full_and_chunked(causal, diag, q_pos, k_pos, chunk_size)


def _full_and_chunked(visible, diag, q_pos, k_pos, chunk_size):
    """(B, 1, S, S_kv) masks from the visible pairs: as they are (full layers), and cut at chunk boundaries of
    the positions (chunked layers); each query always sees itself, so no row is all -inf."""
    full = (visible | diag)[:, None]
    chunked = None
    if chunk_size is not None:
        same = (q_pos[:, :, None] // chunk_size) == (k_pos[:, None, :] // chunk_size)
        chunked = ((visible & same) | diag)[:, None]
    return full, chunked


def shared_prefix_masks(positions: torch.Tensor, segments: torch.Tensor,
                        chunk_size: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(full, chunked) boolean masks (B, 1, S, S) for rows that pack one prefix and its branches.

    segments (B, S): 0 = the shared prefix (a prompt), k >= 1 = branch k (a response), -1 = padding.
    A token sees, causally by index, the prefix and its own branch, never another branch: the row
    [prompt | chosen | rejected] then computes exactly what the rows [prompt | chosen] and
    [prompt | rejected] compute apart (prefix sharing), with each branch's positions restarting after
    the prompt. Chunking compares positions, as in `attention_masks`.
    """
    S = segments.shape[1]
    idx = torch.arange(S, device=segments.device)
    causal = (idx[None, :] <= idx[:, None])[None]  # (1, S, S): key index <= query index
    sq, sk = segments[:, :, None], segments[:, None, :]
    visible = causal & (sk >= 0) & ((sk == 0) | (sk == sq))
    diag = (idx[None, :] == idx[:, None])[None]
    return _full_and_chunked(visible, diag, positions, positions, chunk_size)
