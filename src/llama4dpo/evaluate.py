"""Evaluation of a policy against its reference.

On preference pairs (`llama4dpo eval` scores every valid pair of its --data, the user's held-out set;
a builtin task's held-out pairs): reward accuracy and mean margin of the implicit DPO reward
beta * log(pi / pi_ref), and mean chosen/rejected log-probs. On a source with a ground-truth reward
(builtin:NAME): answers of both models to held-out prompts, sampled at temperature 1 and scored (the
expected reward); the win rate of policy over reference (ties count half); and KL(policy || reference) estimated on the policy's own samples,
mean over prompts of sum_t [log pi(y_t) - log pi_ref(y_t)] for y ~ pi (temperature 1).
"""

from __future__ import annotations

import functools
import statistics

import torch

from .data.chat import ASSISTANT, HUMAN, has_template, parse_transcript, template_prompt
from .data import preference_collator
from .data import collate_preference_shared
from .data.prepare import encode_prompts
from .generate import Sampling, generate, generate_ids
from .losses import sequence_logps
from .data.batches import ExampleBatches
from .objectives import Preference, pair_logps


@torch.no_grad()
def preference_metrics(model, reference, examples, pad_id: int, dpo_cfg, batch_size: int = 16) -> dict:

    collate = functools.partial(preference_collator(dpo_cfg.share_prompt), pad_id=pad_id)
    batches = ExampleBatches(examples, collate, batch_size, 1, 0).fixed()
    objective = Preference(dpo_cfg, reference=reference)
    sums, n = {}, 0
    device = next(model.parameters()).device
    for b in batches:
        b = {k: v.to(device) if k != "index" else v for k, v in b.items()}
        units, metrics = objective(model, b).values()
        n += units
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v
    m = {k: v / max(n, 1) for k, v in sums.items()}
    return {"pairs": n, "reward_accuracy": m["rewards/accuracies"], "reward_margin": m["rewards/margins"],
            "rewards_chosen": m["rewards/chosen"], "rewards_rejected": m["rewards/rejected"],
            "logps_chosen": m["logps/chosen"], "logps_rejected": m["logps/rejected"], "dpo_loss": m["loss"]}


@torch.no_grad()
def policy_logps(model, examples, pad_id: int, batch_size: int = 16) -> dict:
    """Without a reference: mean summed log-probs of chosen and rejected responses, and how often the
    policy already prefers the chosen one (scored in the prefix-shared layout, which gives the same numbers)."""

    device = next(model.parameters()).device
    chosen, rejected = [], []
    collate = functools.partial(collate_preference_shared, pad_id=pad_id)
    for b in ExampleBatches(examples, collate, batch_size, 1, 0).fixed():
        lp, _ = pair_logps(model, {k: v.to(device) for k, v in b.items()})
        B = lp.shape[0] // 2
        chosen += lp[:B].tolist()
        rejected += lp[B:].tolist()
    n = max(len(chosen), 1)
    return {"pairs": len(chosen), "logps_chosen": sum(chosen) / n, "logps_rejected": sum(rejected) / n,
            "logp_accuracy": sum(c > r for c, r in zip(chosen, rejected)) / n}


@torch.no_grad()
def kl_per_answer(model, reference, tokenizer, prompts: list[str], max_new_tokens: int, seed: int = 0,
                  batch_size: int = 32) -> list[float]:
    """log pi(y|x) - log pi_ref(y|x) for one answer y ~ pi per prompt: their mean is the Monte-Carlo
    KL(pi || pi_ref). A rare long answer the reference finds absurd can dominate the mean (hundreds of
    nats), so the median is reported beside it."""
    out: list[float] = []
    device = next(model.parameters()).device
    s = Sampling(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed)
    for lo in range(0, len(prompts), batch_size):
        encoded = encode_prompts(tokenizer, prompts[lo:lo + batch_size])
        samples = generate_ids(model, encoded, s, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                               stop_ids=getattr(tokenizer, "stop_ids", None))
        rows = [p + r for p, r in zip(encoded, samples)]
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), tokenizer.pad_id, dtype=torch.long, device=device)
        labels = torch.full((len(rows), T), -100, dtype=torch.long, device=device)
        for i, (p, r) in enumerate(zip(encoded, samples)):
            ids[i, :len(p) + len(r)] = torch.tensor(p + r, device=device)
            labels[i, len(p):len(p) + len(r)] = torch.tensor(r, device=device)
        lp_policy, _ = sequence_logps(model(ids), labels)
        lp_ref, _ = sequence_logps(reference(ids), labels)
        out += (lp_policy - lp_ref).tolist()
    return out


def ground_truth_metrics(model, reference, tokenizer, prompts: list[str], score, max_new_tokens: int = 48,
                         samples: int = 4, seed: int = 0, show: int = 5) -> dict:
    """Expected ground-truth reward of each model's answers, E_{y ~ pi}[r(x, y)] (the quantity RLHF and
    DPO maximise), estimated with `samples` answers per held-out prompt at temperature 1; the win rate
    compares the i-th sample of the policy with the i-th of the reference (ties count half)."""
    templated = has_template(tokenizer)
    s = Sampling(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed, stop=[] if templated else [HUMAN])
    many = [p for p in prompts for _ in range(samples)]
    shown = [_as_template_prompt(tokenizer, p) for p in many] if templated else many  # what the models see
    policy = generate(model, tokenizer, shown, s, batch_size=128)
    ref = generate(reference, tokenizer, shown, s, batch_size=128)
    s_pol = [score(p, r) for p, r in zip(many, policy)]
    s_ref = [score(p, r) for p, r in zip(many, ref)]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(s_pol, s_ref))
    kls = kl_per_answer(model, reference, tokenizer,
                        [_as_template_prompt(tokenizer, p) for p in prompts] if templated else prompts,
                        max_new_tokens, seed=seed)
    n = max(len(many), 1)
    return {
        "prompts": len(prompts),
        "samples_per_prompt": samples,
        "reward_policy": sum(s_pol) / n,
        "reward_reference": sum(s_ref) / n,
        "win_rate": wins / n,
        "kl": sum(kls) / max(len(kls), 1),
        "kl_median": statistics.median(kls) if kls else 0.0,
        "examples": [{"prompt": many[i], "reference": ref[i], "policy": policy[i], "score_reference": s_ref[i],
                      "score_policy": s_pol[i]} for i in _spread(len(prompts), show, samples)],
    }


def _as_template_prompt(tokenizer, prompt: str) -> str:
    """A builtin task's HH prompt ("\\n\\nHuman: ...\\n\\nAssistant:") rendered with the tokenizer's chat
    template; a prompt rendered by it already (a file's eval prompt) is kept."""
    turns = parse_transcript(prompt[:-len(ASSISTANT)]) if prompt.endswith(ASSISTANT) else None
    return template_prompt(tokenizer, turns) if turns else prompt


def _spread(n: int, k: int, stride: int) -> list[int]:
    """First sample of k prompts spread evenly over n (the held-out prompts are grouped by skill)."""
    return [(i * n // k) * stride for i in range(min(k, n))]


def format_table(results: dict) -> str:
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in results.items()
            if isinstance(v, (int, float))]
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"{k:<{width}}  {v:>10}" for k, v in rows)
