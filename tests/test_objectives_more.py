"""TRL's other pairwise objectives and ORPO through the real CLI: each one's first-step loss is its value at
policy = reference (derived by hand from its equation), and the reference-free ones (SimPO, ORPO) load no
reference model and compute no reference table."""

import math
from pathlib import Path

import pytest

from llama4dpo.cli import main
from llama4dpo.metrics import read_metrics
from llama4dpo.train import recipes

TINY = str(Path(__file__).parent.parent / "configs" / "tiny.toml")
COMMON = ["--config", TINY, "--data", "builtin:assistant", "--quiet", "data.builtin_size=120", "train.batch_size=4"]
BETA, EPS = 0.1, 0.1
LN2 = math.log(2)
# the loss of one pair when every log-ratio is 0 (the policy before its first step is its reference)
AT_START = {
    "sigmoid_norm": LN2,
    "aot": LN2,
    "exo_pair": 0.5 * (math.log(0.5) - math.log1p(-EPS)) + 0.5 * (math.log(0.5) - math.log(EPS)),
    "nca_pair": 2 * LN2,
    "bco_pair": 2 * LN2,
    "sppo_hard": 2 * (0.5 / BETA) ** 2,
    "apo_zero": 1.0,
    "apo_down": 1.0,
}


@pytest.fixture
def base(tiny_base):
    return tiny_base


@pytest.mark.parametrize("loss_type", sorted(AT_START))
def test_each_objective_starts_at_its_value_for_equal_policy_and_reference(base, tmp_path, loss_type):
    smoothing = EPS if loss_type in ("exo_pair", "aot") else 0.0
    assert main(["dpo", *COMMON, "--init", str(base), "--out", str(tmp_path / "run"), "train.max_steps=2",
                 "train.log_every=1", f"dpo.loss_type={loss_type}", f"dpo.beta={BETA}",
                 f"dpo.label_smoothing={smoothing}", "train.lr=3e-3"]) == 0
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    want = AT_START[loss_type] if loss_type != "aot" else (  # aot: cDPO's value at h = 0
        -(1 - EPS) * math.log(0.5) - EPS * math.log(0.5))
    assert rows[0]["step"] == 1 and rows[0]["loss"] == pytest.approx(want, abs=1e-5)
    assert math.isfinite(rows[1]["loss"]) and rows[1]["loss"] != rows[0]["loss"]


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
@pytest.mark.parametrize("precompute", [False, True])
def test_reference_free_objectives_load_no_reference(base, tmp_path, monkeypatch, capsys, loss_type, precompute):
    loaded = []
    real = recipes.load_model

    def counting(path, *args, **kwargs):
        loaded.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(recipes, "load_model", counting)
    monkeypatch.setattr(recipes, "precompute_reference_logps", lambda *a, **k: pytest.fail("a reference table"))
    args = ["dpo", *COMMON[:-3], "data.builtin_size=120", "train.batch_size=4", "--init", str(base),
            "--out", str(tmp_path / "run"), "train.max_steps=3", "train.log_every=1", f"dpo.loss_type={loss_type}",
            f"dpo.precompute_ref={str(precompute).lower()}"]
    assert main([a for a in args if a != "--quiet"]) == 0
    assert len(loaded) == 1  # the policy, from --init; no reference
    assert "reference-free: no reference model is loaded" in capsys.readouterr().out
    assert not list((tmp_path / "run").glob("ref_logps_*"))
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)


def test_orpo_objective_is_the_chosen_nll_plus_the_odds_ratio_term():
    """ORPO (Hong et al. 2024, eq. 6): per pair, the chosen answer's per-token NLL + lambda * the odds-ratio loss."""
    import torch

    from llama4dpo import LlamaModel, ModelConfig
    from llama4dpo.config import DPOConfig
    from llama4dpo.data import preference_collator
    from llama4dpo.losses import preference_loss
    from llama4dpo.objectives import Preference, pair_logps

    model = LlamaModel(ModelConfig(vocab_size=20, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, num_local_experts=2)).init_weights(seed=0)
    pairs = [{"prompt_ids": [1, 5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 2]},
             {"prompt_ids": [1, 4], "chosen_ids": [3, 3, 2], "rejected_ids": [9, 2]}]
    batch = preference_collator(True)(pairs, pad_id=0)
    out = Preference(DPOConfig(loss_type="orpo", beta=0.3))(model, batch)
    logps, n = pair_logps(model, batch)
    avg = logps / n
    odds = preference_loss(avg[:2], avg[2:], None, None, loss_type="orpo", beta=0.3)[0]
    torch.testing.assert_close(out.loss_sum, (odds - avg[:2]).sum())
