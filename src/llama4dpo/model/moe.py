"""Llama 4 feed-forward layers: the dense SwiGLU MLP and the mixture of experts.

The MoE dispatches: token slots are sorted by expert and each expert runs only on its own tokens, with
one grouped matrix product per projection (`torch.nn.functional.grouped_mm`). transformers instead runs
every expert on every token (pre-scaled by a zero score when unrouted) - the same numbers, E/k times the work.
Decoding on CPU skips the dispatch: a lone token takes its expert directly, and compiled, each of a few token
slots runs through its own expert in one generated loop nest (`rowwise_matmul`).
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig


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


# the public op (torch >= 2.10); on CUDA, older releases' private op of the same signature stands in
_GROUPED_MM = getattr(F, "grouped_mm", None)
_CUDA_GROUPED_MM = _GROUPED_MM or getattr(torch, "_grouped_mm", None)


def _grouped_mm(x: torch.Tensor):
    """The grouped-GEMM op for x's device and dtype, or None where per-group products must do."""
    if x.device.type == "cpu":  # any dtype in eager; torch.compile's shape rules accept bf16 only
        ok = x.dtype == torch.bfloat16 or not torch.compiler.is_compiling()
        return _GROUPED_MM if ok else None
    # CUDA grouped GEMM kernels need bf16 and a Hopper-class (sm90+) card.
    ok = x.device.type == "cuda" and x.dtype == torch.bfloat16 and torch.cuda.get_device_properties(x.device).major >= 9
    return _CUDA_GROUPED_MM if ok else None


FEW_ROWS = 64  # below this, CPU decoding takes per-expert products; at and above, bf16 groups are padded to it


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x sorted by group, `counts[e]` rows for group e: returns the stacked x[rows of e] @ w[e]."""
    # Decoding on CPU (a few rows, most experts empty, no autograd): one product per non-empty expert
    # beats grouped_mm, which visits every group. For many rows grouped_mm is faster (fp32, 2048 rows,
    # 8 experts: 6.9 vs 7.7 ms); with autograd, w[e] would cost a full-size gradient per expert.
    no_grad = not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
    decoding = no_grad and x.device.type == "cpu" and len(x) < FEW_ROWS
    if (mm := _grouped_mm(x)) is not None and not decoding:
        return mm(x, w, offs=counts.cumsum(0).to(torch.int32))
    compiling = torch.compiler.is_compiling()
    if compiling and x.device.type != "cpu" and len(x) <= FEW_ROWS:
        return gathered_matmul(x, w, counts)  # (compiled decoding without grouped_mm, e.g. fp32 on CUDA)
    sizes = counts.tolist()
    if compiling:  # (compiled decoding) the sizes are unknown when tracing: their bounds, and every expert runs
        for n in sizes:
            torch._check(n >= 0)
        torch._check(sum(sizes) == len(x))
    outs = [xe @ w[e] for e, xe in enumerate(x.split(sizes)) if compiling or len(xe)]  # one product per expert
    if compiling and no_grad:  # into rows of x's (static) length: the next product's size test needs no guard
        return torch.cat(outs, out=x.new_empty(len(x), w.shape[-1]))
    return torch.cat(outs) if outs else x.new_empty(0, w.shape[-1])


# Compiled CPU decoding of up to this many token slots runs each slot through its own expert (`rowwise_matmul`):
# no sort, no per-expert products. Its cost grows with the slots (each reads its expert's weights), the
# per-expert products' with the experts they touch; batch 8 decoded ~1.3x faster this way.
ROWWISE_SLOTS = 16


def rowwise_matmul(x: torch.Tensor, w: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """x (N, in), w (E, in, out), group (N,) -> (N, out): row n times w[group[n]], accumulated in fp32 and rounded
    to x's dtype as a matrix product is. For compiled decoding on CPU: inductor makes it one loop nest that reads
    the chosen experts' weights in place, where a oneDNN product per expert costs ~11 us however small. The
    weights are transposed so that each output is a contiguous dot product; compiled with inductor's freezing the
    transposed copy is made once, at compile time (eager, it would be made at every call)."""
    wt = w.transpose(1, 2).contiguous()                                   # (E, out, in)
    return (x[:, None, :].float() * wt[group].float()).sum(-1).to(x.dtype)


def gathered_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """grouped_matmul for a few rows with shapes fixed in advance (no Python number read from `counts`, which
    compiled CUDA graphs cannot do). Fewer rows than experts: each row's own weight matrix gathered, one batched
    product; else every expert's product once (each weight read once), each row picking its own."""
    expert_of_row = torch.repeat_interleave(torch.arange(len(counts), device=x.device), counts,
                                            output_size=len(x))              # (N,)
    if len(x) >= len(w):
        return torch.einsum("ni,eio->neo", x, w)[torch.arange(len(x), device=x.device), expert_of_row]
    return torch.bmm(x[:, None, :], w[expert_of_row])[:, 0]                  # (N, 1, in) @ (N, in, out)


class ExpertMLP(nn.Module):
    """E SwiGLU experts stored as fused 3-D weights, (in, out) oriented as in transformers:
    gate_up_proj (E, D, 2I) with the gate in the first I columns; down_proj (E, I, D)."""

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, dim))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (N, D): token slots sorted by expert, counts (E,) slots per expert -> (N, D)."""
        gate_up, down = self.gate_up_proj, self.down_proj
        if torch.is_autocast_enabled(x.device.type):  # grouped_mm is not on autocast's op list
            dtype = torch.get_autocast_dtype(x.device.type)
            x, gate_up, down = x.to(dtype), gate_up.to(dtype), down.to(dtype)
        if x.device.type == "cpu" and x.dtype == torch.bfloat16 and len(x) >= FEW_ROWS:
            return self._padded(x, counts, gate_up, down)
        return self._swiglu(x, counts, gate_up, down)

    def rowwise(self, x: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """x (N, D), expert (N,) -> (N, D): each row through its own expert (compiled CPU decoding, see
        `rowwise_matmul`)."""
        gate_up, down = self.gate_up_proj, self.down_proj
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, gate_up, down = x.to(dtype), gate_up.to(dtype), down.to(dtype)
        gate, up = rowwise_matmul(x, gate_up, expert).split(self.hidden, dim=-1)
        return rowwise_matmul(F.silu(gate) * up, down, expert)

    def one(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """x (N, D) all routed to expert e -> (N, D): decoding a lone token, no dispatch."""
        gate, up = (x @ self.gate_up_proj[e]).split(self.hidden, dim=-1)
        return (F.silu(gate) * up) @ self.down_proj[e]

    def _swiglu(self, x, counts, gate_up, down):
        gate, up = grouped_matmul(x, gate_up, counts).split(self.hidden, dim=-1)
        return grouped_matmul(F.silu(gate) * up, down, counts)

    def _padded(self, x, counts, gate_up, down, multiple: int = FEW_ROWS):
        """CPU bf16 (all but decoding): oneDNN builds (and caches) a kernel per distinct group size, so
        with counts that change every step it keeps compiling and its cache grows. Rounding every group up
        to a multiple of 64 rows (zero rows, whose outputs are dropped) bounds the shapes it sees."""
        padded = (counts + multiple - 1) // multiple * multiple
        e = torch.repeat_interleave(torch.arange(len(counts), device=x.device), counts,
                                    output_size=len(x))  # expert of each row
        dest = (padded.cumsum(0) - padded)[e] + torch.arange(len(x), device=x.device) - (counts.cumsum(0) - counts)[e]
        # compiled, a size fixed in advance (the rows past the last group are never read); eager, the exact size
        rows = len(x) + len(counts) * (multiple - 1) if torch.compiler.is_compiling() else int(padded.sum())
        buf = x.new_zeros(rows, x.shape[1]).index_copy(0, dest, x)
        return self._swiglu(buf, padded, gate_up, down)[dest]

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
        # Set by each forward, read by training: detached tokens-per-expert counts (None where CPU decoding
        # skips the dispatch) and the balance loss.
        self.tokens_per_expert: torch.Tensor | None = None
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        xt = x.reshape(-1, D)                                              # (T, D)
        logits = self.router(xt)                                           # (T, E)
        top_logits, top_idx = logits.topk(self.top_k, dim=-1)              # (T, k), on the raw logits
        scores = torch.sigmoid(top_logits.float()).to(xt.dtype)            # (T, k)
        cpu_decoding = xt.device.type == "cpu" and not torch.is_grad_enabled()
        if cpu_decoding and torch.compiler.is_compiling() and len(xt) * self.top_k <= ROWWISE_SLOTS:
            # compiled decoding on CPU: each slot through its own expert, no sort, no dispatch
            routed_in = xt.repeat_interleave(self.top_k, dim=0) * scores.flatten()[:, None]   # (T*k, D)
            routed_out = self.experts.rowwise(routed_in, top_idx.flatten()).view(B * S, self.top_k, D)
            self.tokens_per_expert, self.aux_loss = None, None
            out = self.shared_expert(xt)                                   # (autocast's dtype, if on)
            return (out + routed_out.sum(1).to(out.dtype)).view(B, S, D)
        if len(xt) * self.top_k == 1 and cpu_decoding:
            # decoding one token on CPU: its one expert, no dispatch (on CUDA, reading e would sync)
            e = int(top_idx)
            self.tokens_per_expert, self.aux_loss = None, None
            return (self.shared_expert(xt) + self.experts.one(xt * scores, e)).view(B, S, D)

        expert_of_slot = top_idx.flatten()                                 # (T*k,)
        order = expert_of_slot.argsort(stable=True)                        # slots grouped by expert
        token_of_slot = order // self.top_k
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=xt.device).scatter_add_(
            0, expert_of_slot, torch.ones_like(expert_of_slot))               # (E,) slots per expert (static shape)
        routed_in = xt[token_of_slot] * scores.flatten()[order, None]      # (T*k, D), score on the input
        routed_out = self.experts(routed_in, counts)                       # (T*k, D)

        out = self.shared_expert(xt)
        out = out.index_add(0, token_of_slot, routed_out.to(out.dtype))
        self.tokens_per_expert = counts.detach()
        self.aux_loss = self._balance_loss(logits, counts) if self.aux_loss_coef > 0 and self.training else None
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
