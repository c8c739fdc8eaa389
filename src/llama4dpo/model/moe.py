"""Llama 4 feed-forward layers: the dense SwiGLU MLP and the mixture of experts.

The MoE dispatches: token slots are sorted by expert and each expert runs only on its own slots (with one grouped
matrix product per projection, kernels/experts.py). transformers instead runs every expert on every token
(pre-scaled by a zero score when unrouted): the same numbers, E/k times the work. Decoding on CPU skips the sort:
each of a few slots goes through its own expert directly.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..kernels import decode_per_slot, grouped_swiglu, per_slot_swiglu


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). The dense layers' MLP and the MoE's shared expert."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def init_weights(self, std: float) -> None:
        for lin in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(lin.weight, std=std)


class ExpertMLP(nn.Module):
    """E SwiGLU experts stored as fused 3-D weights, (in, out) oriented as in transformers:
    gate_up_proj (E, D, 2I) with the gate in the first I columns; down_proj (E, I, D)."""

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.adapters = None  # per-expert LoRA (model/lora.py), set by add_lora

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (N, D): token slots sorted by expert, counts (E,) slots per expert -> (N, D)."""
        return grouped_swiglu(x, counts, self.gate_up_proj, self.down_proj, self.adapters)

    def per_slot(self, x: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """x (N, D), expert (N,) -> (N, D): each slot through its own expert, unsorted (decoding)."""
        return per_slot_swiglu(x, expert, self.gate_up_proj, self.down_proj, self.adapters)

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.gate_up_proj, std=std)
        nn.init.normal_(self.down_proj, std=std)


class MoE(nn.Module):
    """Sigmoid top-k router + routed experts + an always-on shared expert.

    out[t] = shared(x[t]) + sum over chosen e of expert_e(sigmoid(logit[t, e]) * x[t])

    NOTE: the router score scales the expert's *input*, not its output (SwiGLU is not linear, so this
    matters), it is a sigmoid, not a softmax, and it is not renormalised over the k chosen experts.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_experts, self.top_k = cfg.num_local_experts, cfg.num_experts_per_tok
        self.aux_loss_coef = cfg.router_aux_loss_coef
        self.router = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)
        self.experts = ExpertMLP(cfg.num_local_experts, cfg.hidden_size, cfg.expert_size)
        self.shared_expert = FeedForward(cfg.hidden_size, cfg.expert_size)
        # Set by each forward, read by training: detached tokens-per-expert counts (None where decoding skips
        # the dispatch) and the balance loss.
        self.tokens_per_expert: torch.Tensor | None = None
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        xt = x.reshape(-1, D)                                              # (T, D)
        logits = self.router(xt)                                           # (T, E)
        top_logits, top_idx = logits.topk(self.top_k, dim=-1)              # (T, k), on the raw logits
        scores = torch.sigmoid(top_logits.float()).to(xt.dtype)            # (T, k)
        self.tokens_per_expert, self.aux_loss = None, None

        if decode_per_slot(xt, len(xt) * self.top_k):  # decoding: each slot through its own expert, no sort
            routed_in = xt.repeat_interleave(self.top_k, dim=0) * scores.flatten()[:, None]   # (T*k, D)
            routed_out = self.experts.per_slot(routed_in, top_idx.flatten()).view(-1, self.top_k, D)
            out = self.shared_expert(xt)                                   # (T, D), autocast's dtype if on
            return (out + routed_out.sum(1).to(out.dtype)).view(B, S, D)

        expert_of_slot = top_idx.flatten()                                 # (T*k,)
        order = expert_of_slot.argsort(stable=True)                        # slots grouped by expert
        token_of_slot = order // self.top_k
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=xt.device).scatter_add_(
            0, expert_of_slot, torch.ones_like(expert_of_slot))               # (E,) slots per expert (static shape)
        routed_in = xt[token_of_slot] * scores.flatten()[order, None]      # (T*k, D), score on the input
        routed_out = self.experts(routed_in, counts)                       # (T*k, D)
        out = self.shared_expert(xt)                                       # (T, D), autocast's dtype if on
        out = out.index_add(0, token_of_slot, routed_out.to(out.dtype))    # each slot back to its token

        self.tokens_per_expert = counts.detach()
        if self.aux_loss_coef > 0 and self.training:
            self.aux_loss = self._balance_loss(logits, counts)
        return out.view(B, S, D)

    def _balance_loss(self, logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Switch-Transformer load balancing, E * sum_e f_e * P_e (Fedus et al. 2021, eq. 4): f_e is the
        fraction of slots routed to e, P_e the mean router probability. Llama 4 gates with a sigmoid, so
        the softmax over router logits used for P_e is a proxy. Not part of transformers' Llama 4."""
        frac = counts.float() / counts.sum()
        prob = logits.float().softmax(dim=-1).mean(0)
        return self.aux_loss_coef * self.num_experts * (frac * prob).sum()

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.router.weight, std=std)
        self.experts.init_weights(std)
        self.shared_expert.init_weights(std)
