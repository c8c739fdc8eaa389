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

import math
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
# Each takes c and r, the chosen and rejected log-ratios log pi/pi_ref (the policy's log-probs alone for a
# reference-free loss), and returns the per-pair loss. h = c - r is the DPO logit.

def _sigmoid(c, r, beta, label_smoothing, gamma):
    # DPO (Rafailov et al. 2023, eq. 7): -log sigma(beta h). With label noise eps, conservative DPO
    # (cDPO, Mitchell 2023): -(1 - eps) log sigma(beta h) - eps log sigma(-beta h).
    h = c - r
    return -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing


def _robust(c, r, beta, label_smoothing, gamma):
    # rDPO (Chowdhury et al. 2024, eq. 8): unbiased under label flips at rate eps.
    h = c - r
    return (-F.logsigmoid(beta * h) * (1 - label_smoothing)
            + F.logsigmoid(-beta * h) * label_smoothing) / (1 - 2 * label_smoothing)


def _hinge(c, r, beta, label_smoothing, gamma):
    # SLiC-HF (Zhao et al. 2023, eq. 2 with delta = 1/beta): max(0, 1 - beta h).
    return torch.relu(1 - beta * (c - r))


def _ipo(c, r, beta, label_smoothing, gamma):
    # IPO (Azar et al. 2023, eq. 17), tau = beta: (h - 1/(2 tau))^2 on per-token average log-probs.
    return (c - r - 1 / (2 * beta)) ** 2


def _simpo(c, r, beta, label_smoothing, gamma):
    # SimPO (Meng et al. 2024, eq. 6): -log sigma(beta (avg_w - avg_l) - gamma); reference-free, so c and r are
    # the policy's average log-probs. Label smoothing as in TRL's CPOTrainer.
    z = beta * (c - r) - gamma
    return -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing


def _orpo(c, r, beta, label_smoothing, gamma):
    # ORPO (Hong et al. 2024, eqs. 4 and 7): -lambda log sigma(log odds_w - log odds_l), odds = p / (1 - p) of the
    # per-token average log-probs, lambda = beta; reference-free. The objective adds the chosen response's NLL.
    log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))
    return -beta * F.logsigmoid(log_odds)


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, without cancellation at either end."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _sigmoid_norm(c, r, beta, label_smoothing, gamma):
    # DPO on per-token average log-ratios (TRL's sigmoid_norm).
    return -F.logsigmoid(beta * (c - r))


def _exo_pair(c, r, beta, label_smoothing, gamma):
    # EXO (Ji et al. 2024, eq. 16), K = 2: KL(softmax(beta h) || [1 - eps, eps]); eps = label_smoothing > 0.
    z = beta * (c - r)
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-label_smoothing))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(label_smoothing)))


def _nca_pair(c, r, beta, label_smoothing, gamma):
    # NCA (Chen et al. 2024, eq. 12), pairwise: each response's own reward, the chosen pushed up absolutely.
    return -F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c) - 0.5 * F.logsigmoid(-beta * r)


def _bco_pair(c, r, beta, label_smoothing, gamma):
    # BCO (Jung et al. 2024) on pairs, without its running reward shift: chosen classified good, rejected bad.
    return -F.logsigmoid(beta * c) - F.logsigmoid(-beta * r)


def _sppo_hard(c, r, beta, label_smoothing, gamma):
    # SPPO (Wu et al. 2024, eq. 4.7) with hard win probabilities 1 and 0: log-ratios regressed to +-1/(2 beta).
    return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2


def _apo_zero(c, r, beta, label_smoothing, gamma):
    # APO-zero (D'Oosterlinck et al. 2024, eq. 7): chosen likelihood up, rejected down, each on its own.
    return 1 - torch.sigmoid(beta * c) + torch.sigmoid(beta * r)


def _apo_down(c, r, beta, label_smoothing, gamma):
    # APO-down (eq. 8): both likelihoods down, the rejected more (chosen answers worse than the model's own).
    return torch.sigmoid(beta * c) + 1 - torch.sigmoid(beta * (c - r))


def _aot(c, r, beta, label_smoothing, gamma):
    # AOT (Melnyk et al. 2024): DPO on the policy's sorted chosen-minus-rejected margins against the reference's
    # sorted margins (a distributional dominance over the batch); `preference_loss` passes the sorted margins.
    return _sigmoid(c, r, beta, label_smoothing, gamma)


LOSSES: dict[str, Callable] = {"sigmoid": _sigmoid, "robust": _robust, "hinge": _hinge, "ipo": _ipo, "simpo": _simpo,
                               "orpo": _orpo, "sigmoid_norm": _sigmoid_norm, "exo_pair": _exo_pair,
                               "nca_pair": _nca_pair, "bco_pair": _bco_pair, "sppo_hard": _sppo_hard,
                               "apo_zero": _apo_zero, "apo_down": _apo_down, "aot": _aot}
LENGTH_NORMALISED = {"ipo", "simpo", "orpo", "sigmoid_norm"}
REFERENCE_FREE = {"simpo", "orpo"}
WITH_NLL = {"orpo"}  # the objective adds the chosen response's per-token NLL (weight 1, + dpo.sft_weight)


def preference_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                    reference_chosen_logps: torch.Tensor | None, reference_rejected_logps: torch.Tensor | None,
                    *, loss_type: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
                    gamma: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the implicit rewards beta * (policy - reference) log-ratio, each (batch,).

    For a reference-free loss (simpo, orpo) the reference log-probs are ignored (may be None) and the rewards are
    beta * policy logps, as TRL's CPO/ORPO trainers log them. Rewards are detached: metrics, not part of the graph.
    `aot` couples the pairs of the batch (it sorts their margins): its per-pair losses depend on the whole batch.
    """
    if loss_type not in LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose from {sorted(LOSSES)}")
    if loss_type in REFERENCE_FREE:
        chosen, rejected = policy_chosen_logps, policy_rejected_logps
    else:
        chosen = policy_chosen_logps - reference_chosen_logps
        rejected = policy_rejected_logps - reference_rejected_logps
    c, r = chosen, rejected
    if loss_type == "aot":
        c = (policy_chosen_logps - policy_rejected_logps).sort(dim=0).values
        r = (reference_chosen_logps - reference_rejected_logps).sort(dim=0).values
    losses = LOSSES[loss_type](c, r, beta, label_smoothing, gamma)
    return losses, beta * chosen.detach(), beta * rejected.detach()


# ---- unpaired: KTO -----------------------------------------------------------------------------------------
def kto_kl(policy_kl_logps: torch.Tensor, reference_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0 (Ethayarajh et al. 2024, eq. 7): KL(pi || pi_ref) estimated by the mean log-ratio
    of mismatched (prompt, completion) pairs of the batch, clamped at 0 and detached (no gradient flows through it,
    as in the paper and TRL)."""
    return (policy_kl_logps - reference_kl_logps).mean().clamp(min=0).detach()


def kto_loss(policy_logps: torch.Tensor, reference_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
             *, beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024, eq. 7) per example: with r = beta (log pi - log pi_ref),
    desirable:   lambda_D (1 - sigma(r - beta z0));   undesirable:   lambda_U (1 - sigma(beta z0 - r)).
    Returns (losses, rewards r detached), each (batch,)."""
    logratios = policy_logps - reference_logps
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios))))
    return losses, beta * logratios.detach()
