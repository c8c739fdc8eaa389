"""Rotary position embedding with Llama 4's interleaved pairing and optional llama3 frequency scaling."""

import math

import torch
from torch import nn

from ..config import ModelConfig


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """inv_freq[i] = theta^(-2i/d), i < d/2, optionally rescaled as in Llama 3 ("llama3" rope_type)."""
    d = cfg.d_head
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    if cfg.rope_type == "llama3":
        factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        orig = cfg.rope_original_max_position_embeddings
        wavelen = 2 * math.pi / inv_freq
        smooth = (orig / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > orig / low, inv_freq / factor,          # long waves: slowed down
                               torch.where(wavelen < orig / high, inv_freq,      # short waves: kept
                                           blended))                             # in between: interpolated
    return inv_freq


class RotaryPositionalEmbedding(nn.Module):
    """Computes (cos, sin) for given positions and rotates q/k.

    Llama 4 reads each head vector as d/2 complex numbers built from ADJACENT pairs (x[2i], x[2i+1]) and
    multiplies them by exp(j * pos * inv_freq[i]). This differs from Llama 2/3's rotate_half convention,
    which pairs dim i with dim i + d/2.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, S] (int) -> cos, sin [B, S, 1, d/2] in fp32 (broadcast over heads)."""
        angles = positions.float()[..., None] * self.inv_freq  # (B, S, d/2)
        return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, S, heads, d] -> x rotated in fp32 pairs (x[2i], x[2i+1]), cast back to x's dtype."""
        xp = x.float().unflatten(-1, (-1, 2))  # (B, S, h, d/2, 2)
        x0, x1 = xp[..., 0], xp[..., 1]
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
        return out.flatten(-2).type_as(x)

    def _apply(self, fn, recurse=True):
        """Moved with the model, but never cast: in bf16 the frequencies would be off by up to 0.2%, which
        at position 1000 turns a head_dim-128 angle by ~1.8 rad."""
        super()._apply(fn, recurse)
        self.inv_freq = rope_frequencies(self.cfg).to(self.inv_freq.device)
        return self

    def init_weights(self) -> None:
        # No parameters; the (non-persistent) buffer is recomputed so a model built on the meta device
        # and materialised with `to_empty` gets real frequencies.
        self.inv_freq = rope_frequencies(self.cfg).to(self.inv_freq.device)
