"""Objectives as pure functions: per-sequence log-probabilities, next-token loss, and preference losses.

Vocabulary of the DPO paper (Rafailov et al. 2023) and its reference code: `policy_chosen_logps`,
`reference_rejected_logps`, `chosen_rewards`... Each preference loss returns per-pair tensors
`(losses, chosen_rewards, rejected_rewards)` of shape [batch]; the caller takes the mean.

Log-probabilities are SUMMED over response tokens for sigmoid/robust/hinge and AVERAGED per token for
ipo/simpo (as TRL and the DPO reference code do): `LENGTH_NORMALISED` says which, and the objective
passes the matching kind. The notebook's single "gamma" hyper-parameter for DPO is this module's `beta`;
`gamma` here is SimPO's target margin only.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

IGNORE = -100


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(labels[t] | tokens < t) for every position, and the mask of scored positions.

    logits (N, T, V), labels (N, T) UNSHIFTED with -100 on prompt and padding -> (N, T-1) each.
    The log-softmax is taken in fp32 once; only the label's entry is kept (gather), never a second copy.
    """
    return target_logps(logits[:, :-1], labels[:, 1:])


def target_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(targets[i]) under logits[i], already aligned (no shift): (N, M, V), (N, M) -> (N, M) each,
    0 and False where the target is -100."""
    mask = targets != IGNORE
    safe = targets.masked_fill(~mask, 0)
    logits = logits.float()
    picked = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logps = picked - torch.logsumexp(logits, dim=-1)
    return logps * mask, mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed response log-prob, number of response tokens) per row: (N,), (N,)."""
    logps, mask = token_logps(logits, labels)
    return logps.sum(-1), mask.sum(-1)


def shared_prompt_logps(logits: torch.Tensor, targets: torch.Tensor,
                        branch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix-shared rows (one row per pair, see collate_preference_shared): logits (B, M, V) at the
    positions predicting targets (B, M); branch (B, M) is 1 for chosen, 2 for rejected tokens.
    -> (summed log-prob, token count), each (2B,) with the chosen rows first, as `sequence_logps` gives
    for the [chosen; rejected] layout."""
    logps, mask = target_logps(logits, targets)
    sums = torch.cat([(logps * (branch == 1)).sum(-1), (logps * (branch == 2)).sum(-1)])
    counts = torch.cat([(mask & (branch == 1)).sum(-1), (mask & (branch == 2)).sum(-1)])
    return sums, counts


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over scored positions (transformers' causal-LM loss)."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)


# ---- preference losses --------------------------------------------------------------------------------
# h = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected), the DPO logit.

def _sigmoid(h, beta, label_smoothing, gamma):
    # DPO (Rafailov et al. 2023, eq. 7): -log sigma(beta h). With label noise eps, conservative DPO
    # (cDPO, Mitchell 2023): -(1 - eps) log sigma(beta h) - eps log sigma(-beta h).
    return -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing


def _robust(h, beta, label_smoothing, gamma):
    # rDPO (Chowdhury et al. 2024, eq. 8): unbiased under label flips at rate eps.
    return (-F.logsigmoid(beta * h) * (1 - label_smoothing)
            + F.logsigmoid(-beta * h) * label_smoothing) / (1 - 2 * label_smoothing)


def _hinge(h, beta, label_smoothing, gamma):
    # SLiC-HF (Zhao et al. 2023, eq. 2 with delta = 1/beta): max(0, 1 - beta h).
    return torch.relu(1 - beta * h)


def _ipo(h, beta, label_smoothing, gamma):
    # IPO (Azar et al. 2023, eq. 17), tau = beta: (h - 1/(2 tau))^2 on per-token average log-probs.
    return (h - 1 / (2 * beta)) ** 2


def _simpo(h, beta, label_smoothing, gamma):
    # SimPO (Meng et al. 2024, eq. 6): -log sigma(beta (avg_w - avg_l) - gamma); reference-free, so h is
    # the policy's average log-prob difference alone. Label smoothing as in TRL's CPOTrainer.
    z = beta * h - gamma
    return -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing


LOSSES: dict[str, Callable] = {"sigmoid": _sigmoid, "robust": _robust, "hinge": _hinge, "ipo": _ipo, "simpo": _simpo}
LENGTH_NORMALISED = {"ipo", "simpo"}
REFERENCE_FREE = {"simpo"}


def preference_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                    reference_chosen_logps: torch.Tensor | None, reference_rejected_logps: torch.Tensor | None,
                    *, loss_type: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
                    gamma: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the implicit rewards beta * (policy - reference) log-ratio, each (batch,).

    For `simpo` the reference log-probs are ignored (may be None) and the rewards are beta * policy logps,
    as TRL's CPOTrainer logs them. Rewards are detached: they are metrics, not part of the graph.
    """
    if loss_type not in LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose from {sorted(LOSSES)}")
    if loss_type in REFERENCE_FREE:
        chosen, rejected = policy_chosen_logps, policy_rejected_logps
    else:
        chosen = policy_chosen_logps - reference_chosen_logps
        rejected = policy_rejected_logps - reference_rejected_logps
    losses = LOSSES[loss_type](chosen - rejected, beta, label_smoothing, gamma)
    return losses, beta * chosen.detach(), beta * rejected.detach()
