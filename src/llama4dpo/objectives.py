"""Objectives turn a batch into a loss. The one training loop (trainer.py) serves all of them.

Each objective returns SUMS over its units (tokens for language modelling, pairs for preferences) and
the unit count, so that the loop can divide by the total over all micro-batches of a step: gradient
accumulation over N micro-batches then equals one big batch exactly, whatever their lengths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .config import DPOConfig
from .losses import (LENGTH_NORMALISED, REFERENCE_FREE, WITH_NLL, kto_kl, kto_loss, preference_loss, sequence_logps, shared_prompt_logps,
                      token_logps)


@dataclass
class StepOutput:
    loss_sum: torch.Tensor              # differentiable; divided by the step's total units by the loop
    units: int | torch.Tensor           # tokens (LM) or pairs (preference) in this micro-batch
    metrics: dict[str, torch.Tensor]    # sums over units (0-d, detached), averaged by the loop

    # Metrics stay on the device: reading a number here (.item()) would make the host wait for the forward
    # before it can queue the backward; the loop reads them all at once, at the end of the step.

    def values(self) -> tuple[int, dict[str, float]]:
        """units and metrics as Python numbers (one device read)."""
        nums = read_values({"units": torch.as_tensor(self.units, device=self.loss_sum.device), **self.metrics})
        return nums.pop("units"), nums


def read_values(sums: dict[str, torch.Tensor]) -> dict[str, float | int | list]:
    """Device tensors (0-d metrics, per-expert count vectors) as Python numbers, read in one transfer;
    integer tensors give ints."""
    keys = list(sums)
    flat = torch.cat([sums[k].detach().reshape(-1).to(torch.float64) for k in keys]).tolist() if keys else []
    out, at = {}, 0
    for k in keys:
        n = sums[k].numel()
        vals = flat[at:at + n] if sums[k].is_floating_point() else [int(x) for x in flat[at:at + n]]
        out[k] = vals[0] if sums[k].dim() == 0 else vals
        at += n
    return out


@dataclass(frozen=True)
class LogpFunctions:
    """The log-prob reductions over the vocabulary that objectives use (losses.py)."""
    token: Callable = token_logps
    sequence: Callable = sequence_logps
    shared: Callable = shared_prompt_logps

    def compiled(self, mode: str | None = None) -> "LogpFunctions":
        """The same through torch.compile (train.compile): one fused pass over the logits, forward and backward,
        instead of an fp32 copy of them and a kernel per op (on an H200, ~3 ms of the 26 ms of kernels in a DPO
        step at the 100m preset)."""
        return LogpFunctions(*(torch.compile(f, mode=mode) for f in (self.token, self.sequence, self.shared)))


EAGER = LogpFunctions()


class Objective:
    """What every objective shares: the log-prob reductions it uses, eager until the trainer compiles them."""

    logps: LogpFunctions = EAGER

    def compile(self, mode: str | None = None) -> None:
        self.logps = EAGER.compiled(mode)


class LanguageModeling(Objective):
    """Next-token cross-entropy on positions whose label is not -100 (pretraining, and SFT where the
    collator masks the prompt)."""

    name = "lm"

    def units(self, batch) -> int:
        return int((batch["labels"][:, 1:] != -100).sum())

    def __call__(self, model, batch) -> StepOutput:
        logits = model(batch["input_ids"])
        logps, mask = self.logps.token(logits, batch["labels"])
        loss_sum = -logps.sum()
        return StepOutput(loss_sum, mask.sum(), {"loss": loss_sum.detach()})


def pair_logps(model, batch, fns: LogpFunctions = EAGER) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs and response token counts, (2B,) each, chosen rows first, from a batch of
    either layout: [chosen; rejected] rows (collate_preference) or one prefix-shared row per pair
    (collate_preference_shared)."""
    if "segment_ids" in batch:
        logits = model(batch["input_ids"], position_ids=batch["position_ids"], segment_ids=batch["segment_ids"],
                       logit_index=batch["logit_index"])
        return fns.shared(logits, batch["targets"], batch["branch"])
    return fns.sequence(model(batch["input_ids"]), batch["labels"])


def sequence_tokens(batch) -> int:
    """Non-pad tokens of the prompt+response sequences a batch holds, counted as separate rows would hold them:
    a prefix-shared row counts its prompt once per response. Training's `tokens_per_s` uses this, so it does not
    change with the layout (nor does it differ from TRL's count of the same pairs)."""
    if "segment_ids" in batch:
        return int(batch["attention_mask"].sum()) + int((batch["segment_ids"] == 0).sum())
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return batch["input_ids"].numel()


def n_pairs(batch) -> int:
    return batch["input_ids"].shape[0] // (1 if "segment_ids" in batch else 2)


class Preference(Objective):
    """DPO and its relatives on a batch of pairs (either layout, see `pair_logps`): one policy forward, one
    reference forward (or a lookup of precomputed reference log-probs)."""

    name = "preference"

    def __init__(self, cfg: DPOConfig, reference=None, reference_logps=None):
        self.cfg = cfg
        self.reference = reference              # a frozen model, or None
        self.reference_logps = reference_logps  # (sums, counts) tensors indexed by example, or None
        needs_ref = cfg.loss_type not in REFERENCE_FREE
        if needs_ref and reference is None and reference_logps is None:
            raise ValueError(f"loss_type {cfg.loss_type!r} needs a reference model or precomputed log-probs")

    def units(self, batch) -> int:
        return n_pairs(batch)

    def _reference(self, batch) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.cfg.loss_type in REFERENCE_FREE:
            return None
        if self.reference_logps is not None:
            sums, counts = self.reference_logps
            idx = batch["index"]
            idx = torch.cat([idx, idx])  # chosen rows then rejected rows
            which = torch.cat([torch.zeros_like(batch["index"]), torch.ones_like(batch["index"])])
            return sums[idx, which].to(batch["input_ids"].device), counts[idx, which].to(batch["input_ids"].device)
        with torch.no_grad():
            # NOTE: the reference runs before the policy (measured ~10% faster on TRL's side: the policy's
            # activations are not yet held while the reference allocates).
            return pair_logps(self.reference, batch, self.logps)

    def __call__(self, model, batch) -> StepOutput:
        ref = self._reference(batch)
        logps, n_tokens = pair_logps(model, batch, self.logps)  # (2B,), (2B,)
        B = logps.shape[0] // 2
        average = self.cfg.loss_type in LENGTH_NORMALISED
        policy = logps / n_tokens.clamp(min=1) if average else logps
        reference = (None, None)
        if ref is not None:
            ref_sums, ref_counts = ref
            ref_logps = ref_sums / ref_counts.clamp(min=1) if average else ref_sums
            reference = (ref_logps[:B], ref_logps[B:])
        losses, chosen_rewards, rejected_rewards = preference_loss(
            policy[:B], policy[B:], *reference, loss_type=self.cfg.loss_type, beta=self.cfg.beta,
            label_smoothing=self.cfg.label_smoothing, gamma=self.cfg.gamma)
        loss_sum = losses.sum()
        nll_weight = self.cfg.sft_weight + (1.0 if self.cfg.loss_type in WITH_NLL else 0.0)
        if nll_weight > 0:  # RPO (Pang et al. 2024) / ORPO: + alpha * NLL of the chosen response per token
            loss_sum = loss_sum + nll_weight * (-logps[:B] / n_tokens[:B].clamp(min=1)).sum()
        lengths = n_tokens.float()
        chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
        metrics = {
            "loss": loss_sum.detach(),
            "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),  # strict >, as TRL
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "logps/chosen": logps[:B].detach().sum(),
            "logps/rejected": logps[B:].detach().sum(),
            "length/chosen": lengths[:B].sum(),
            "length/rejected": lengths[B:].sum(),
        }
        return StepOutput(loss_sum, B, metrics)


class KTO(Preference):
    """KTO (Ethayarajh et al. 2024) on unpaired examples (data/unpaired.py): each row holds a prompt, its completion
    and a mismatched completion (the KL row), laid out as a pair's chosen and rejected; `label` says whether the
    completion is desirable. The reference point z0 is estimated on this micro-batch's KL rows."""

    name = "kto"

    def __call__(self, model, batch) -> StepOutput:
        ref_sums, _ = self._reference(batch)
        logps, n_tokens = pair_logps(model, batch, self.logps)  # (2B,): completions, then KL completions
        B = logps.shape[0] // 2
        kl = kto_kl(logps[B:], ref_sums[B:])
        desirable = batch["label"].to(logps.device)
        losses, rewards = kto_loss(logps[:B], ref_sums[:B], desirable, kl, beta=self.cfg.beta,
                                   desirable_weight=self.cfg.desirable_weight,
                                   undesirable_weight=self.cfg.undesirable_weight)
        loss_sum = losses.sum()
        if self.cfg.sft_weight > 0:  # + alpha * NLL of the desirable completions per token
            nll = -logps[:B] / n_tokens[:B].clamp(min=1)
            loss_sum = loss_sum + self.cfg.sft_weight * (nll * desirable).sum()
        agree = torch.where(desirable, rewards > 0, rewards < 0)  # the implicit reward's sign is the label's
        metrics = {"loss": loss_sum.detach(), "kl": kl * B, "rewards/accuracies": agree.float().sum(),
                   "rewards/desirable": (rewards * desirable).sum(), "rewards/undesirable": (rewards * ~desirable).sum(),
                   "desirable": desirable.float().sum(), "logps/completion": logps[:B].detach().sum(),
                   "length/completion": n_tokens[:B].float().sum()}
        return StepOutput(loss_sum, B, metrics)


def preference_objective(cfg: DPOConfig, reference=None, reference_logps=None) -> Preference:
    """The objective dpo.loss_type names: KTO on unpaired examples, else the pairwise losses."""
    return (KTO if cfg.loss_type == "kto" else Preference)(cfg, reference=reference, reference_logps=reference_logps)


@torch.no_grad()
def precompute_reference_logps(reference, batches, n_examples: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference (summed log-prob, token count) for every example's chosen (col 0) and rejected (col 1)
    response, from an iterable of collated batches carrying `index`. In eval mode (the reference may be the
    policy itself, before its first step); the module's mode is restored."""
    sums = torch.zeros(n_examples, 2, dtype=torch.float32)
    counts = torch.zeros(n_examples, 2, dtype=torch.long)
    was_training = reference.training
    reference.eval()
    try:
        for batch in batches:
            s, c = pair_logps(reference, {k: v.to(device) for k, v in batch.items()})
            B = s.shape[0] // 2
            idx = batch["index"]
            sums[idx, 0], sums[idx, 1] = s[:B].float().cpu(), s[B:].float().cpu()
            counts[idx, 0], counts[idx, 1] = c[:B].cpu(), c[B:].cpu()
    finally:
        reference.train(was_training)
    return sums, counts
