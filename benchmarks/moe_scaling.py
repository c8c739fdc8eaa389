"""MoE cost follows routed tokens: forward+backward time of one MoE layer at 4, 16 and 64 experts.

Same widths and tokens for every E (D=64, expert width 128, top-1, 8 x 256 tokens, fp32, CPU), as in
the spec's measurement; transformers' dense Llama4TextMoe beside it when transformers is installed.

    python benchmarks/moe_scaling.py            # replaces its section of BENCHMARKS.md
    python benchmarks/moe_scaling.py --quick    # smoke mode: 4 and 16 experts, 512 tokens, 3 calls; writes nothing
"""

import argparse
import datetime

import torch

from harness import machine, markdown_table, median_time
from report import write_section

from llama4dpo import ModelConfig
from llama4dpo.model import MoE

HEADING = "## One MoE layer, forward + backward (`benchmarks/moe_scaling.py`)"
MEANING = ("Our layer's cost follows the routed tokens (sorted dispatch, grouped products), so 16 times the "
           "experts costs well under twice the time; transformers' Llama4TextMoe runs every expert on every token.")


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
    p.add_argument("--quick", action="store_true", help="smoke mode: --experts 4,16 --tokens 512 --repeat 3, no write")
    args = p.parse_args()
    if args.quick:
        args.experts, args.tokens, args.repeat, args.no_write = "4,16", 512, 3, True
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
        write_section(f"{HEADING}\n\n`python benchmarks/moe_scaling.py` - {datetime.date.today()}, CPU ({machine()}); "
                      f"D=64, expert width 128, top-1, {args.tokens} tokens, fp32, medians of {args.repeat} calls.\n\n"
                      f"{table}\n\n{summary}\n\n{MEANING}")


if __name__ == "__main__":
    main()
