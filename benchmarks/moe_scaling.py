"""MoE cost follows routed tokens: forward+backward time of one MoE layer at 4, 16 and 64 experts.

Same widths and tokens for every E (D=64, expert width 128, top-1, 8 x 256 tokens, fp32, CPU), as in
the spec's measurement; transformers' dense Llama4TextMoe beside it when transformers is installed.
Run: `python benchmarks/moe_scaling.py` (writes its table to BENCHMARKS.md).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, markdown_table, median_time, write_section  # noqa: E402

from llama4dpo import ModelConfig  # noqa: E402
from llama4dpo.model import MoE  # noqa: E402


def layer_step(moe, x):
    def step():
        out = moe(x)
        out = out[0] if isinstance(out, tuple) else out
        out.float().square().mean().backward()
    return step


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--experts", default="4,16,64")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    try:
        from transformers import Llama4TextConfig
        from transformers.models.llama4.modeling_llama4 import Llama4TextMoe
    except ImportError:
        Llama4TextMoe = None

    rows, ours_ms = [], {}
    for E in map(int, args.experts.split(",")):
        cfg = ModelConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                          num_local_experts=E, num_experts_per_tok=1)
        torch.manual_seed(0)
        moe = MoE(cfg)
        moe.init_weights(cfg.initializer_range)
        x = torch.randn(8, args.tokens // 8, 64, requires_grad=True)
        ours_ms[E] = 1e3 * median_time(layer_step(moe, x), warmup=5, repeat=args.repeat)
        hf_ms = ""
        if Llama4TextMoe is not None:
            hf = Llama4TextMoe(Llama4TextConfig(hidden_size=64, intermediate_size=128, num_local_experts=E,
                                                num_experts_per_tok=1, head_dim=16, num_attention_heads=4))
            hf_ms = f"{1e3 * median_time(layer_step(hf, x), repeat=args.repeat):.1f}"
        rows.append([E, f"{ours_ms[E]:.1f}", hf_ms])
        print(f"E={E:3d}  llama4dpo {ours_ms[E]:7.1f} ms   transformers {hf_ms} ms", flush=True)
    lo, hi = min(ours_ms), max(ours_ms)
    ratio = ours_ms[hi] / ours_ms[lo]
    table = markdown_table(["experts", "llama4dpo fwd+bwd (ms, median)", "transformers Llama4TextMoe (ms)"], rows)
    summary = f"time({hi}) / time({lo}) = **{ratio:.2f}** (target <= 2)"
    print(table + "\n" + summary)
    if not args.no_write:
        write_section("moe_scaling", f"## One MoE layer, forward + backward\n\n"
                      f"`python benchmarks/moe_scaling.py` - D=64, expert width 128, top-1, {args.tokens} tokens, "
                      f"fp32, CPU ({machine()}).\n\n{table}\n\n{summary}\n")


if __name__ == "__main__":
    main()
