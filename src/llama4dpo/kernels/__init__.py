"""Fast paths the model takes, behind one chooser each, so that `model/` reads like the paper.

    experts.py    the routed experts' SwiGLU over token slots sorted by expert: grouped matrix products
                  (`grouped_swiglu`), or each slot through its own expert when decoding (`per_slot_swiglu`);
                  `decode_per_slot` says when the MoE takes the second.
    attention.py  softmax(q k^T / sqrt(d) + mask) v: plain products for small bf16 problems on CPU, else
                  PyTorch's fused SDPA kernels (`attend`).

Each choice depends only on the device, dtype, size and whether torch.compile is tracing; every path computes
the same numbers as the plain formula (tests/test_kernels.py).
"""

from .attention import attend
from .experts import decode_per_slot, grouped_swiglu, per_slot_swiglu

__all__ = ["attend", "decode_per_slot", "grouped_swiglu", "per_slot_swiglu"]
