"""RMSNorm, as Llama 4 computes it: normalise in fp32, cast back, then scale."""

import torch
from torch import nn


class RMSNorm(nn.Module):
    """y = cast(x * rsqrt(mean(x^2) + eps)) * weight.

    With `weight=False` this is Llama 4's qk-norm (transformers calls it `Llama4TextL2Norm`, but it is an
    RMS norm with no learned scale): the output has L2 norm ~sqrt(dim), not 1.
    """

    def __init__(self, dim: int, eps: float = 1e-5, weight: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if weight else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        # NOTE: the cast back to x's dtype happens *before* the weight multiply (matters for bf16 parity).
        return y * self.weight if self.weight is not None else y

    def init_weights(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
