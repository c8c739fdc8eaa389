"""The routed experts' products: E SwiGLU experts held as fused 3-D weights, gate_up (E, D, 2I), down (E, I, D).

`grouped_swiglu` runs token slots sorted by expert (the MoE's dispatch) with one grouped product per projection
(`torch.nn.functional.grouped_mm`) where the device and dtype have one, else a product per expert; on CPU in bf16
the groups are padded to bounded sizes. `per_slot_swiglu` runs a few slots each through its own expert with no
sort: CPU decoding, where the dispatch costs more than the products (`decode_per_slot` says when).
"""

import torch
import torch.nn.functional as F

# the public op (torch >= 2.10); on CUDA, older releases' private op of the same signature stands in
_GROUPED_MM = getattr(F, "grouped_mm", None)
_CUDA_GROUPED_MM = _GROUPED_MM or getattr(torch, "_grouped_mm", None)

FEW_ROWS = 64  # below this, CPU decoding takes per-expert products; at and above, bf16 groups are padded to it

# Compiled CPU decoding of up to this many token slots runs each slot through its own expert (`rowwise_matmul`):
# no sort, no per-expert products. Its cost grows with the slots (each reads its expert's weights), the
# per-expert products' with the experts they touch; batch 8 decoded ~1.3x faster this way.
ROWWISE_SLOTS = 16


def decode_per_slot(x: torch.Tensor, slots: int) -> bool:
    """Whether the MoE skips its dispatch for `slots` token slots of x: CPU decoding (no autograd) of one slot
    (its expert directly; on CUDA, reading the expert's index would wait for the GPU), or, compiled, of a few."""
    if x.device.type != "cpu" or torch.is_grad_enabled():
        return False
    return slots == 1 or (torch.compiler.is_compiling() and slots <= ROWWISE_SLOTS)


def _autocast(x, *weights):
    """x and the weights in autocast's dtype where it is on (grouped_mm is not on autocast's op list)."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        return x.to(dtype), *(w.to(dtype) for w in weights)
    return x, *weights


def grouped_swiglu(x: torch.Tensor, counts: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                   adapters=None) -> torch.Tensor:
    """x (N, D): token slots sorted by expert, counts (E,) slots per expert -> (N, D): each expert's
    down(silu(gate(x)) * up(x)) on its own slots; with `adapters` (model/lora.py:ExpertAdapters, on) each
    product adds its expert's scale * (x A_e) B_e, grouped the same way."""
    x, gate_up, down = _autocast(x, gate_up, down)
    lora = _lora(x, adapters)
    if x.device.type == "cpu" and x.dtype == torch.bfloat16 and len(x) >= FEW_ROWS:
        return _padded(x, counts, gate_up, down, lora)
    return _swiglu(x, counts, gate_up, down, lora)


def per_slot_swiglu(x: torch.Tensor, expert: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                    adapters=None) -> torch.Tensor:
    """x (N, D), expert (N,) -> (N, D): each slot through its own expert (CPU decoding, see `decode_per_slot`)."""
    x, gate_up, down = _autocast(x, gate_up, down)
    lora = _lora(x, adapters)
    if torch.compiler.is_compiling():
        def mm(a, w):
            return rowwise_matmul(a, w, expert)
    else:  # one slot, eager: its expert's weights directly
        e = int(expert[0])

        def mm(a, w):
            return a @ w[e]
    return _swiglu_with(mm, x, gate_up, down, lora)


def _lora(x, adapters):
    """(gate_up A, gate_up B, down A, down B, scale) in x's dtype, or None (no adapters, or switched off)."""
    if adapters is None or not adapters.enabled:
        return None
    ws = (adapters.gate_up_A, adapters.gate_up_B, adapters.down_A, adapters.down_B)
    return (*(w.to(x.dtype) for w in ws), adapters.scale)


def _swiglu_with(mm, x, gate_up, down, lora):
    """down(silu(gate) * up) with gate|up = x gate_up, each product `mm(a, w)` of a's rows with their expert's w,
    plus the adapters' scale * mm(mm(a, A), B)."""
    h = mm(x, gate_up)
    if lora is not None:
        h = h + lora[4] * mm(mm(x, lora[0]), lora[1])
    gate, up = h.split(down.shape[1], dim=-1)
    a = F.silu(gate) * up
    y = mm(a, down)
    if lora is not None:
        y = y + lora[4] * mm(mm(a, lora[2]), lora[3])
    return y


def _swiglu(x, counts, gate_up, down, lora=None):
    return _swiglu_with(lambda a, w: grouped_matmul(a, w, counts), x, gate_up, down, lora)


def _padded(x, counts, gate_up, down, lora=None, multiple: int = FEW_ROWS):
    """CPU bf16 (all but decoding): oneDNN builds (and caches) a kernel per distinct group size, so with counts
    that change every step it keeps compiling and its cache grows. Rounding every group up to a multiple of 64
    rows (zero rows, whose outputs are dropped) bounds the shapes it sees."""
    padded = (counts + multiple - 1) // multiple * multiple
    e = torch.repeat_interleave(torch.arange(len(counts), device=x.device), counts,
                                output_size=len(x))  # expert of each row
    dest = (padded.cumsum(0) - padded)[e] + torch.arange(len(x), device=x.device) - (counts.cumsum(0) - counts)[e]
    # compiled, a size fixed in advance (the rows past the last group are never read); eager, the exact size
    rows = len(x) + len(counts) * (multiple - 1) if torch.compiler.is_compiling() else int(padded.sum())
    buf = x.new_zeros(rows, x.shape[1]).index_copy(0, dest, x)
    return _swiglu(buf, padded, gate_up, down, lora)[dest]


def _grouped_mm(x: torch.Tensor, w: torch.Tensor):
    """The grouped-GEMM op for x's device and dtype, or None where per-group products must do."""
    if (x.shape[-1] * x.element_size()) % 16 or (w.shape[-1] * w.element_size()) % 16:
        return None  # grouped_mm needs rows whose strides are multiples of 16 bytes (e.g. a LoRA rank of 4 in bf16)
    if x.device.type == "cpu":  # any dtype in eager; torch.compile's shape rules accept bf16 only
        ok = x.dtype == torch.bfloat16 or not torch.compiler.is_compiling()
        return _GROUPED_MM if ok else None
    # CUDA grouped GEMM kernels need bf16 and a Hopper-class (sm90+) card.
    ok = x.device.type == "cuda" and x.dtype == torch.bfloat16 and torch.cuda.get_device_properties(x.device).major >= 9
    return _CUDA_GROUPED_MM if ok else None


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x sorted by group, `counts[e]` rows for group e: returns the stacked x[rows of e] @ w[e]."""
    # Decoding on CPU (a few rows, most experts empty, no autograd): one product per non-empty expert
    # beats grouped_mm, which visits every group. For many rows grouped_mm is faster (fp32, 2048 rows,
    # 8 experts: 6.9 vs 7.7 ms); with autograd, w[e] would cost a full-size gradient per expert.
    no_grad = not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
    decoding = no_grad and x.device.type == "cpu" and len(x) < FEW_ROWS
    if (mm := _grouped_mm(x, w)) is not None and not decoding:
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
