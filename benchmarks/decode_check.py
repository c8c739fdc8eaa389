"""Does compiled decoding (CUDA graphs on CUDA, C++ wrapper on CPU) compute what eager decoding computes?

Teacher-forced: both paths decode the same token sequence after the same prompt, so one rounding difference
cannot change the tokens that follow; prints the largest logit difference per step and the share of steps whose
argmax agrees, for fp32 and bf16 weights. Greedy free-running tokens are compared too.

    python benchmarks/decode_check.py --device cuda --preset 100m
    python benchmarks/decode_check.py --steps 4 --experts 4        # quick: the tiny preset on CPU (the tests' run)

Prints only (a correctness check, no table in BENCHMARKS.md).
"""

from __future__ import annotations

import argparse

import torch

from workload import PRESETS, model_config


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--steps", type=int, default=32)
    args = p.parse_args()
    cfg = model_config(args.preset, args.experts)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, cfg.vocab_size, (1, 64), generator=g)
    forced = torch.randint(3, cfg.vocab_size, (args.steps,), generator=g)
    for weights in (torch.bfloat16, torch.float32):
        try:
            check(cfg, weights, prompt, forced, args)
        except Exception as e:  # report it, go on with the other dtype
            print(f"{str(weights):15s} FAILED: {type(e).__name__}: {e}"[:400], flush=True)


def compiled_decoding(model, batch: int, length: int):
    """(the compiled decoding step, a context giving its static cache), from `llama4dpo.runtime.Decoder`."""
    from llama4dpo.runtime import Decoder

    decoder = Decoder(model)
    return decoder.step, decoder.cache(batch, length)


def check(cfg, weights, prompt, forced, args):
    from llama4dpo import LlamaModel
    from llama4dpo.generate import Sampling, generate_ids
    model = LlamaModel(cfg).init_weights(seed=0).to(args.device).eval().to(weights)
    ids = prompt.to(args.device)
    length = ids.shape[1] + len(forced)
    step, static = compiled_decoding(model, 1, length)
    with torch.inference_mode(), static as comp:
        eager = model.new_cache(1, length)
        model(ids, cache=eager), model(ids, cache=comp)
        diffs, agree = [], 0
        for t in forced.tolist():
            tok = torch.tensor([[t]], device=args.device)
            a = model.decode(tok, eager).float()
            b = step(tok, comp).float().clone()
            diffs.append((a - b).abs().max().item())
            agree += int(a.argmax() == b.argmax())
        scale = a.abs().max().item()
    s = Sampling(max_new_tokens=args.steps, temperature=0.0)
    free_e = generate_ids(model, ids.tolist(), s, eos_id=-1, pad_id=0)
    free_c = generate_ids(model, ids.tolist(), s, eos_id=-1, pad_id=0, compile=True)
    same = sum(x == y for x, y in zip(free_e[0], free_c[0])) / args.steps
    first = next((i for i, (x, y) in enumerate(zip(free_e[0], free_c[0])) if x != y), None)
    print(f"{str(weights):15s} teacher-forced: max |logit diff| per step max {max(diffs):.3g} median "
          f"{sorted(diffs)[len(diffs) // 2]:.3g} (logits up to {scale:.3g}); argmax agrees {agree}/{args.steps}; "
          f"free-running greedy tokens equal {same:.2f} (first difference at {first})", flush=True)


if __name__ == "__main__":
    main()
