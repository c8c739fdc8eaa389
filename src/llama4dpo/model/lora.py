"""LoRA (Hu et al. 2021): y = W x + (alpha / r) * B A x, the base W frozen, A (r, in) random and B (out, r) zero at
the start, so an adapted model begins as its base.

Every linear layer can carry one (attention q/k/v/o, the dense MLP, the MoE's shared expert), and the routed experts
carry one per expert: A (E, in, r) and B (E, r, out) beside their fused (E, in, out) weights, applied in the same
grouped products as the weights (kernels/experts.py), never a Python loop over experts. With the adapters off
(`adapters_off`) the model computes its base exactly: DPO's reference without a second copy.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LORA_TARGETS as TARGETS
from ..errors import UserError
from .moe import MoE


class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank update; `weight` (and `bias`) keep their names, so checkpoints of the base load."""

    def add_adapter(self, rank: int, alpha: float, dropout: float = 0.0) -> "LoRALinear":
        self.lora_A = nn.Parameter(self.weight.new_empty(rank, self.in_features))
        self.lora_B = nn.Parameter(self.weight.new_zeros(self.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # (as nn.Linear and PEFT initialise A)
        self.lora_scale, self.lora_dropout, self.enabled = alpha / rank, dropout, True
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        h = F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout else x
        return y + self.lora_scale * F.linear(F.linear(h, self.lora_A), self.lora_B)


class RouterDelta(nn.Linear):
    """A router trained in full (lora.train_router) as a full-rank update D of its frozen weight, zero at the start:
    with the adapters off the reference routes as the base did."""

    def add_delta(self) -> "RouterDelta":
        self.lora_delta = nn.Parameter(torch.zeros_like(self.weight, dtype=torch.float32))
        self.enabled = True
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y + F.linear(x, self.lora_delta) if self.enabled else y


class ExpertAdapters(nn.Module):
    """Per-expert low-rank updates of the fused expert weights gate_up (E, D, 2I) and down (E, I, D)."""

    def __init__(self, num_experts: int, dim: int, hidden: int, rank: int, alpha: float):
        super().__init__()
        self.gate_up_A = nn.Parameter(torch.empty(num_experts, dim, rank))
        self.gate_up_B = nn.Parameter(torch.zeros(num_experts, rank, 2 * hidden))
        self.down_A = nn.Parameter(torch.empty(num_experts, hidden, rank))
        self.down_B = nn.Parameter(torch.zeros(num_experts, rank, dim))
        for a in (self.gate_up_A, self.down_A):  # each expert's A as nn.Linear would initialise an (r, in) matrix
            bound = 1 / math.sqrt(a.shape[1])
            nn.init.uniform_(a, -bound, bound)
        self.scale, self.enabled = alpha / rank, True


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             targets: tuple[str, ...] = TARGETS) -> nn.Module:
    """Freeze `model` and give the `targets` adapters (in place; returns the model)."""
    unknown = set(targets) - set(TARGETS)
    if unknown or rank < 1:
        raise ValueError(f"lora: rank must be >= 1 and targets among {TARGETS}, got {rank}, {sorted(unknown)}")
    model.requires_grad_(False)
    for layer in model.layers:
        linears = []
        if "attention" in targets:
            a = layer.self_attn
            linears += [a.q_proj, a.k_proj, a.v_proj, a.o_proj]
        ff = layer.feed_forward
        if isinstance(ff, MoE):
            if "shared_expert" in targets:
                linears += [ff.shared_expert.gate_proj, ff.shared_expert.up_proj, ff.shared_expert.down_proj]
            if "experts" in targets:
                E, D, two_i = ff.experts.gate_up_proj.shape
                ff.experts.adapters = ExpertAdapters(E, D, two_i // 2, rank, alpha).to(ff.experts.gate_up_proj)
        elif "mlp" in targets:
            linears += [ff.gate_proj, ff.up_proj, ff.down_proj]
        for lin in linears:
            lin.__class__ = LoRALinear
            lin.add_adapter(rank, alpha, dropout)
    return model


def apply_lora(model: nn.Module, cfg, bf16_base: bool = False) -> nn.Module:
    """`add_lora` as the `lora` config section says (config/sections.py:LoRAConfig): the routers trained in full
    with `train_router`; with `bf16_base`, the frozen matrices (all but the embedding, which feeds the fp32
    residual stream) held in bf16 while the adapters train in fp32: under bf16 autocast the same products, without
    a bf16 copy of each weight made per forward and kept for the backward."""
    add_lora(model, cfg.rank, cfg.alpha, cfg.dropout, tuple(cfg.targets))
    if cfg.train_router:
        for layer in model.layers:
            if isinstance(layer.feed_forward, MoE):
                router = layer.feed_forward.router
                router.__class__ = RouterDelta
                router.add_delta()
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError(f"lora.targets={cfg.targets}{' with lora.train_router' if cfg.train_router else ''} "
                        f"adapt no layer of this model (dense layers take 'attention' and 'mlp')")
    if bf16_base:
        embedding = model.embed_tokens.weight
        for p in model.parameters():
            if not p.requires_grad and p.dim() >= 2 and p is not embedding:
                p.data = p.data.to(torch.bfloat16)
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (W + scale * B A; per expert A_e B_e in (in, out) orientation) and
    remove it: a plain model computing what the adapted one did (in place; returns the model)."""
    for m in list(model.modules()):
        if isinstance(m, LoRALinear):
            m.weight += m.lora_scale * (m.lora_B.float() @ m.lora_A.float()).to(m.weight.dtype)
            for name in ("lora_A", "lora_B"):
                delattr(m, name)
            m.__class__ = nn.Linear
        elif isinstance(m, RouterDelta):
            m.weight += m.lora_delta.to(m.weight.dtype)
            delattr(m, "lora_delta")
            m.__class__ = nn.Linear
        elif getattr(m, "adapters", None) is not None:  # ExpertMLP
            a = m.adapters
            m.gate_up_proj += a.scale * torch.bmm(a.gate_up_A.float(), a.gate_up_B.float()).to(m.gate_up_proj.dtype)
            m.down_proj += a.scale * torch.bmm(a.down_A.float(), a.down_B.float()).to(m.down_proj.dtype)
            m.adapters = None
    return model


def trainable_summary(model: nn.Module) -> str:
    """"LoRA: N trainable parameters of M (x%)": what a LoRA run prints at start-up (and `info` of its checkpoints)."""
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{trained:,} trainable parameters of {total:,} ({100 * trained / max(total, 1):.2f}%)"


class WithoutAdapters:
    """The adapted model called with every adapter off, in eval mode (no dropout), as a separate reference model
    is: DPO's reference, the base, with no second copy."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args, **kwargs):
        was_training = self.model.training
        try:
            with adapters_off(self.model):
                return self.model.eval()(*args, **kwargs)
        finally:
            self.model.train(was_training)

    @property
    def training(self) -> bool:
        return self.model.training

    def train(self, mode: bool = True):
        self.model.train(mode)
        return self

    def eval(self):
        return self.train(False)


def lora_modules(model: nn.Module) -> Iterator[nn.Module]:
    return (m for m in model.modules() if isinstance(m, (LoRALinear, ExpertAdapters, RouterDelta)))


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """The base model inside the block (every adapter skipped), the adapters as they were after it."""
    modules = list(lora_modules(model))
    before = [m.enabled for m in modules]
    try:
        for m in modules:
            m.enabled = False
        yield model
    finally:
        for m, on in zip(modules, before):
            m.enabled = on
