"""softmax(q k^T * scale + mask) v, by the fastest kernel for the device, dtype and size.

CPU in bf16, up to SMALL_SCORES scores: plain batched products (`small_bf16_attention`). Everywhere else:
PyTorch's fused kernels (`F.scaled_dot_product_attention`), run in fp32 on CPU, whose bf16 kernels are slower.
"""

import torch
import torch.nn.functional as F

# CPU, bf16: up to this many attention scores (B x heads x S x S_kv) the plain products below beat SDPA's fused
# kernels (in fp32, the faster of its two there: fwd+bwd at 8 x 8 heads x 192^2, 7.2 vs 11.7 ms; 384^2, 28 vs
# 38 ms; 512^2, 91 vs 67 ms). They keep the scores for the backward: 2 bytes each, 16 MiB at most per layer.
SMALL_SCORES = 1 << 23


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
              dropout: float = 0.0) -> torch.Tensor:
    """q (B, H, S, d); k, v (B, K, S_kv, d) with K dividing H (GQA: kv head j serves query heads j*H/K ...);
    mask: bool (B|1, 1, S, S_kv), True = may attend, or its additive float form, or None for causal attention
    over exactly these S tokens -> (B, H, S, d) in q's dtype."""
    small = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= SMALL_SCORES
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and small:
        return small_bf16_attention(q, k, v, mask, scale, dropout)
    return sdpa(q, k, v, mask, scale, dropout)


def small_bf16_attention(q, k, v, mask, scale: float, dropout: float = 0.0) -> torch.Tensor:
    """`attend` as plain batched products (bf16 on CPU, few scores)."""
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


def sdpa(q, k, v, mask, scale: float, dropout: float = 0.0) -> torch.Tensor:
    """`attend` by PyTorch's fused attention kernels (SDPA), q's dtype in and out."""
    dtype = q.dtype
    if q.device.type == "cpu" and dtype == torch.bfloat16:  # CPU's bf16 SDPA kernels run ~1.4x slower than fp32
        q, k, v = q.float(), k.float(), v.float()
    gqa = k.shape[1] != q.shape[1]
    if gqa and mask is not None and q.device.type == "cuda":
        # CUDA's kernel for masked attention (memory-efficient) takes no GQA: SDPA would fall back to its
        # unfused math path. Expanding the kv heads keeps the fused kernel.
        g = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1), False
    if mask is not None and mask.is_floating_point() and mask.dtype != q.dtype:
        mask = mask.to(q.dtype)  # an additive mask cast on the way (e.g. by FSDP2's bf16 policy) must match q
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout,
                                       scale=scale, enable_gqa=gqa)
    return y.to(dtype)
