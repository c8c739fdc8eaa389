"""Preference losses against hand-worked numbers, TRL on the same log-probs, and the log-prob helper
against a per-example unpadded computation."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from llama4dpo.losses import LOSSES, lm_loss, preference_loss, sequence_logps

PC = torch.tensor([-10.0, -12.0, -7.5, -20.0])  # policy chosen / rejected, reference chosen / rejected
PR = torch.tensor([-11.0, -11.0, -9.0, -19.0])
RC = torch.tensor([-10.5, -12.0, -8.0, -21.0])
RR = torch.tensor([-10.5, -11.5, -8.5, -18.0])
LENGTHS = (torch.tensor([4, 6, 3, 8]), torch.tensor([5, 2, 6, 7]))


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_hand_worked_values():
    # pair 0: h = (-10 - -10.5) - (-11 - -10.5) = 0.5 - (-0.5) = 1.0
    beta = 0.5
    h = 1.0
    cases = {
        "sigmoid": -math.log(sig(beta * h)),
        "hinge": max(0.0, 1 - beta * h),
        "ipo": (h - 1 / (2 * beta)) ** 2,
    }
    for loss_type, expected in cases.items():
        losses, cr, rr = preference_loss(PC[:1], PR[:1], RC[:1], RR[:1], loss_type=loss_type, beta=beta)
        assert losses.item() == pytest.approx(expected, abs=1e-6), loss_type
        assert cr.item() == pytest.approx(0.25) and rr.item() == pytest.approx(-0.25)
    eps = 0.2
    cdpo = -(1 - eps) * math.log(sig(beta * h)) - eps * math.log(sig(-beta * h))
    robust = (-(1 - eps) * math.log(sig(beta * h)) + eps * math.log(sig(-beta * h))) / (1 - 2 * eps)
    assert preference_loss(PC[:1], PR[:1], RC[:1], RR[:1], beta=beta, label_smoothing=eps)[0].item() == pytest.approx(cdpo)
    assert preference_loss(PC[:1], PR[:1], RC[:1], RR[:1], loss_type="robust", beta=beta,
                           label_smoothing=eps)[0].item() == pytest.approx(robust)
    # SimPO: reference-free, -log sigma(beta (w - l) - gamma) with w - l = -10 - -11 = 1
    simpo = preference_loss(PC[:1], PR[:1], None, None, loss_type="simpo", beta=2.0, gamma=0.5)[0]
    assert simpo.item() == pytest.approx(-math.log(sig(2.0 * 1 - 0.5)))
    # ORPO: p_w = 1/2, p_l = 1/4 -> odds 1 and 1/3, odds ratio 3: -lambda log sigma(log 3) = -lambda log(3/4)
    orpo = preference_loss(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]), None, None,
                           loss_type="orpo", beta=0.2)[0]
    assert orpo.item() == pytest.approx(-0.2 * math.log(3 / 4), abs=1e-6)
    # the per-response losses at log-ratios c = 0.5, r = -0.5 (pair 0), beta 0.5
    c, r = 0.5, -0.5
    per_response = {
        "nca_pair": -math.log(sig(beta * c)) - 0.5 * math.log(sig(-beta * c)) - 0.5 * math.log(sig(-beta * r)),
        "bco_pair": -math.log(sig(beta * c)) - math.log(sig(-beta * r)),
        "sppo_hard": (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2,
        "apo_zero": 1 - sig(beta * c) + sig(beta * r),
        "apo_down": sig(beta * c) + 1 - sig(beta * (c - r)),
    }
    for loss_type, expected in per_response.items():
        got = preference_loss(PC[:1], PR[:1], RC[:1], RR[:1], loss_type=loss_type, beta=beta)[0]
        assert got.item() == pytest.approx(expected, abs=1e-6), loss_type


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust"])
def test_dpo_loss_is_ln2_when_policy_equals_reference(loss_type):
    losses, cr, rr = preference_loss(PC, PR, PC, PR, loss_type=loss_type, label_smoothing=0.1)
    torch.testing.assert_close(losses, torch.full((4,), math.log(2)))
    assert (cr == 0).all() and (rr == 0).all()


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_gradient_pushes_chosen_up_and_rejected_down(loss_type):
    pc, pr = (PC / 8).requires_grad_(), (PR / 8).requires_grad_()  # (average-like log-probs: ORPO needs p < 1)
    losses, _, _ = preference_loss(pc, pr, RC / 8, RR / 8, loss_type=loss_type, beta=0.1, gamma=0.3,
                                   label_smoothing=0.1 if loss_type == "exo_pair" else 0.0)
    losses.sum().backward()
    assert (pr.grad > 0).all()  # descent lowers the rejected response's log-prob
    if loss_type != "apo_down":  # (APO-down lowers both, for chosen answers worse than the model's own)
        assert (pc.grad < 0).all()  # and raises the chosen one's


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="unknown loss_type"):
        preference_loss(PC, PR, RC, RR, loss_type="nope")


# ---- TRL on the same log-probs ----------------------------------------------------------------------
trl = pytest.importorskip("trl")


def trl_dpo_loss(loss_type, beta, label_smoothing):
    """Run TRL's DPOTrainer._compute_loss on a fake model whose per-token log-probs sum to PC/PR."""
    from trl import DPOTrainer
    B, T = 4, 12
    lens = torch.cat(LENGTHS)
    completion_mask = torch.zeros(2 * B, T, dtype=torch.long)
    per_token = torch.zeros(2 * B, T - 1)
    for row, (n, total) in enumerate(zip(lens.tolist(), torch.cat([PC, PR]).tolist())):
        completion_mask[row, T - n:] = 1
        per_token[row, T - 1 - n:] = total / n
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros(2 * B, T - 1),
                              mean_logits=torch.zeros(2 * B, T - 1), is_top1=torch.zeros(2 * B, T - 1, dtype=torch.bool))
    acc = SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x)
    fake = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=acc, aux_loss_enabled=False,
                           ld_alpha=None, use_weighting=False, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                           loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing,
                           _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.ones(2 * B, T, dtype=torch.long), "attention_mask": torch.ones(2 * B, T, dtype=torch.long),
              "completion_mask": completion_mask, "ref_chosen_logps": RC, "ref_rejected_logps": RR}
    return DPOTrainer._compute_loss(fake, lambda **kw: outputs, inputs, False).item()


@pytest.mark.parametrize("loss_type, ls", [
    ("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.2), ("sigmoid_norm", 0.0), ("exo_pair", 0.1),
    ("nca_pair", 0.0), ("bco_pair", 0.0), ("sppo_hard", 0.0), ("apo_zero", 0.0), ("apo_down", 0.0), ("aot", 0.1)])
def test_matches_trl_dpo_trainer(loss_type, ls):
    beta = 0.3
    if loss_type in ("ipo", "sigmoid_norm"):  # on per-token averages (TRL divides by completion length)
        lc, lr = LENGTHS
        ours = preference_loss(PC / lc, PR / lr, RC / lc, RR / lr, loss_type=loss_type, beta=beta)[0]
    else:
        ours = preference_loss(PC, PR, RC, RR, loss_type=loss_type, beta=beta, label_smoothing=ls)[0]
    assert ours.mean().item() == pytest.approx(trl_dpo_loss(loss_type, beta, ls), abs=1e-6)


def test_simpo_matches_trl_cpo_trainer():
    from trl.experimental.cpo import CPOTrainer
    beta, gamma, ls = 2.0, 0.7, 0.1
    lc, lr = LENGTHS
    fake = SimpleNamespace(alpha=0.0, accelerator=SimpleNamespace(device="cpu"), loss_type="simpo",
                           simpo_gamma=gamma, beta=beta, label_smoothing=ls)
    trl_losses, trl_cr, trl_rr = CPOTrainer.cpo_loss(fake, PC / lc, PR / lr)
    losses, cr, rr = preference_loss(PC / lc, PR / lr, None, None, loss_type="simpo", beta=beta, gamma=gamma,
                                     label_smoothing=ls)
    torch.testing.assert_close(losses, trl_losses, atol=1e-6, rtol=0)
    torch.testing.assert_close(cr, trl_cr, atol=1e-6, rtol=0)


def test_orpo_matches_trl_orpo_trainer():
    from trl.experimental.orpo import ORPOTrainer
    beta = 0.25
    lc, lr = LENGTHS
    fake = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device="cpu"))
    trl_losses, trl_cr, trl_rr, _, _ = ORPOTrainer.odds_ratio_loss(fake, PC / lc, PR / lr)
    losses, cr, rr = preference_loss(PC / lc, PR / lr, None, None, loss_type="orpo", beta=beta)
    torch.testing.assert_close(losses, -trl_losses, atol=1e-6, rtol=0)  # (TRL subtracts its term from the NLL)
    torch.testing.assert_close(cr, trl_cr, atol=1e-6, rtol=0)
    torch.testing.assert_close(rr, trl_rr, atol=1e-6, rtol=0)


# ---- log-probs ----------------------------------------------------------------------------------------
def test_sequence_logps_of_padded_batch_equal_per_example_unpadded():
    from llama4dpo import LlamaModel, ModelConfig
    torch.manual_seed(0)
    model = LlamaModel(ModelConfig(vocab_size=30, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_local_experts=3, attention_chunk_size=4)).init_weights(seed=0).eval()
    prompts = [[1, 5, 6, 7], [1, 9], [1, 4, 4, 4, 4, 4]]
    responses = [[8, 9, 2], [10, 11, 12, 13, 2], [7]]  # the last one truncated (no eos), as max_length would do
    T = max(len(p) + len(r) for p, r in zip(prompts, responses)) + 2  # extra right padding
    ids = torch.zeros(3, T, dtype=torch.long)
    labels = torch.full((3, T), -100)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        labels[i, len(p):len(p) + len(r)] = torch.tensor(r)
    with torch.no_grad():
        got, counts = sequence_logps(model(ids), labels)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            seq = torch.tensor([p + r])
            logp = model(seq)[0].log_softmax(-1)
            expected = sum(logp[len(p) - 1 + j, tok].item() for j, tok in enumerate(r))
            assert got[i].item() == pytest.approx(expected, abs=1e-5)
            assert counts[i] == len(r)


def test_lm_loss_matches_cross_entropy():
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 0, 1]])
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(lm_loss(logits, labels), expected)


# ---- KTO -----------------------------------------------------------------------------------------------
LABELS = torch.tensor([True, False, True, False])
KL_POLICY, KL_REFERENCE = torch.tensor([-9.0, -13.0, -8.0, -19.5]), torch.tensor([-9.5, -12.0, -8.5, -20.0])


def test_kto_hand_worked_values_and_gradient_signs():
    from llama4dpo.losses import kto_kl, kto_loss
    kl = kto_kl(KL_POLICY, KL_REFERENCE)  # mean(0.5, -1, 0.5, 0.5) = 0.125
    assert kl.item() == pytest.approx(0.125)
    assert kto_kl(KL_REFERENCE, KL_POLICY).item() == 0.0  # clamped at 0
    pc = PC.clone().requires_grad_()
    losses, rewards = kto_loss(pc, RC, LABELS, kl, beta=0.5, desirable_weight=2.0, undesirable_weight=0.5)
    # example 0 desirable: r = -10 - -10.5 = 0.5 -> 2 (1 - sigma(0.5 (0.5 - 0.125)));
    # example 1 undesirable: r = 0 -> 0.5 (1 - sigma(0.5 (0.125 - 0)))
    assert losses[0].item() == pytest.approx(2 * (1 - sig(0.5 * 0.375)))
    assert losses[1].item() == pytest.approx(0.5 * (1 - sig(0.5 * 0.125)))
    assert rewards.tolist() == pytest.approx([0.25, 0.0, 0.25, 0.5])
    losses.sum().backward()
    assert (pc.grad[LABELS] < 0).all() and (pc.grad[~LABELS] > 0).all()  # desirable up, undesirable down


def test_kto_matches_trl_kto_trainer():
    """TRL's KTOTrainer._compute_loss on a fake model whose completion and KL log-probs are PC and KL_POLICY."""
    from trl import KTOTrainer

    from llama4dpo.losses import kto_kl, kto_loss
    B, T, beta = 4, 10, 0.3
    per_token = torch.zeros(B, T - 1)
    per_token[:, -1] = PC  # one scored token holding each completion's whole log-prob
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros(B, T - 1), mean_logits=torch.zeros(B, T - 1))
    acc = SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x)
    fake = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=acc, aux_loss_enabled=False,
                           precompute_ref_logps=True, calculate_KL=True, loss_type="kto", beta=beta,
                           desirable_weight=1.5, undesirable_weight=0.7, _tp_size=1, _total_train_tokens=0,
                           _metrics=defaultdict(lambda: defaultdict(list)),
                           _compute_kl_logps=lambda model, batch: KL_POLICY)
    completion_mask = torch.zeros(B, T, dtype=torch.long)
    completion_mask[:, -1] = 1
    inputs = {"input_ids": torch.ones(B, T, dtype=torch.long), "attention_mask": torch.ones(B, T, dtype=torch.long),
              "completion_mask": completion_mask, "label": LABELS, "ref_logps": RC, "ref_KL_logps": KL_REFERENCE}
    want = KTOTrainer._compute_loss(fake, lambda **kw: outputs, inputs, False)
    losses, _ = kto_loss(PC, RC, LABELS, kto_kl(KL_POLICY, KL_REFERENCE), beta=beta, desirable_weight=1.5,
                         undesirable_weight=0.7)
    assert losses.mean().item() == pytest.approx(want.item(), abs=1e-6)
