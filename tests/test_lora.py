"""LoRA adapters on every layer kind (model/lora.py): an adapted model starts as its base, switched off it IS its base,
and each routed expert's adapter learns from exactly the tokens routed to that expert."""

import copy

import pytest
import torch

from llama4dpo import LlamaModel, ModelConfig
from llama4dpo.kernels import experts as expert_kernels
from llama4dpo.model.lora import ExpertAdapters, adapters_off, add_lora, lora_modules
from llama4dpo.model.moe import MoE

TINY = dict(vocab_size=50, hidden_size=32, intermediate_size=48, intermediate_size_mlp=64, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
            interleave_moe_layer_step=2, attention_chunk_size=8)
IDS = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))


def base_and_adapted(**kw):
    base = LlamaModel(ModelConfig(**{**TINY, **kw})).init_weights(seed=0).eval()
    return base, add_lora(copy.deepcopy(base), rank=4, alpha=8.0)


def perturb(model, seed=1):
    """Every adapter non-zero (B starts at zero), so that switching them off changes something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model):
            for name, p in m.named_parameters(recurse=False):
                if name.startswith("lora_") or isinstance(m, ExpertAdapters):  # (not a LoRALinear's own weight)
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_every_layer_kind_gets_adapters_and_only_they_train():
    _, model = base_and_adapted()
    kinds = [type(m).__name__ for m in lora_modules(model)]
    # 4 layers x q/k/v/o, 2 dense MLPs x 3, 2 shared experts x 3, 2 routed-expert sets
    assert kinds.count("LoRALinear") == 4 * 4 + 2 * 3 + 2 * 3 and kinds.count("ExpertAdapters") == 2
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".adapters." in n for n in trainable)
    expert = model.layers[1].feed_forward.experts.adapters
    assert expert.gate_up_A.shape == (4, 32, 4) and expert.down_B.shape == (4, 4, 32)


def test_zero_adapters_give_the_base_logits():
    base, model = base_and_adapted()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), base(IDS), atol=1e-6, rtol=0)


def test_adapters_off_is_the_base_model_and_on_is_not():
    base, model = base_and_adapted()
    perturb(model)
    with torch.no_grad():
        want = base(IDS)
        assert (model(IDS) - want).abs().max() > 1e-2
        with adapters_off(model):
            torch.testing.assert_close(model(IDS), want, atol=1e-6, rtol=0)
        assert (model(IDS) - want).abs().max() > 1e-2  # on again after the block


@pytest.mark.parametrize("top_k", [1, 2])  # top-1: a lone token skips the dispatch (per-slot experts)
def test_decoding_with_adapters_equals_the_full_forward(top_k):
    _, model = base_and_adapted(num_experts_per_tok=top_k)
    perturb(model)
    ids = IDS[:1]
    with torch.inference_mode():
        full = model(ids)[:, -1]
        cache = model.new_cache(1, 16)
        model(ids[:, :-1], cache=cache)
        step = model(ids[:, -1:], cache=cache)[:, -1]  # one token: each slot through its own expert
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


def expert_grads(moe, x, first_expert):
    """Gradients of the expert adapters' per-expert slices after routing token t to experts first_expert[t] and 3."""
    with torch.no_grad():
        moe.router.weight.zero_()
    logits = torch.full((len(first_expert), 4), -10.0)
    logits[torch.arange(len(first_expert)), first_expert] = 10.0
    logits[:, 3] = 5.0
    moe.router.forward = lambda h: logits  # forced routing (the router's own weights take no part)
    moe(x).square().sum().backward()
    a = moe.experts.adapters
    return [max(p.grad[e].abs().max().item() for p in (a.gate_up_A, a.gate_up_B, a.down_A, a.down_B))
            for e in range(4)]


def routed_model():
    """One MoE (4 experts, top-2) with non-zero per-expert adapters."""
    moe = MoE(ModelConfig(**TINY))
    moe.init_weights(0.2)
    moe.experts.adapters = ExpertAdapters(4, 32, 48, rank=4, alpha=8.0)
    perturb(moe.experts)
    return moe


def test_each_expert_adapter_learns_from_its_own_tokens_only():
    moe = routed_model()
    x = torch.randn(1, 6, 32)
    grads = expert_grads(moe, x, torch.tensor([0, 1, 0, 1, 0, 1]))  # experts 0, 1 and 3 get tokens, 2 none
    assert grads[0] > 0 and grads[1] > 0 and grads[3] > 0
    assert grads[2] == 0.0


def test_one_adapter_shared_by_all_experts_fails_that_check(monkeypatch):
    """The negative control: adapters that ignore the expert (expert 0's A/B for every slot) put every token's
    gradient into expert 0's slice, and experts 1 and 3, which did get tokens, learn nothing."""
    real = expert_kernels._lora

    def shared(x, adapters):
        lora = real(x, adapters)
        return None if lora is None else (*(w[:1].expand_as(w).contiguous() for w in lora[:4]), lora[4])
    monkeypatch.setattr(expert_kernels, "_lora", shared)
    moe = routed_model()
    grads = expert_grads(moe, torch.randn(1, 6, 32), torch.tensor([0, 1, 0, 1, 0, 1]))
    assert not (grads[0] > 0 and grads[1] > 0 and grads[3] > 0 and grads[2] == 0.0)


def test_padded_expert_groups_carry_the_adapters_exactly():
    """CPU bf16 pads expert groups to 64 rows: with adapters, the padded products equal the plain ones."""
    experts = routed_model().experts
    counts = torch.tensor([3, 0, 70, 26])
    x = torch.randn(int(counts.sum()), 32, requires_grad=True)
    lora = expert_kernels._lora(x, experts.adapters)
    args = (x, counts, experts.gate_up_proj, experts.down_proj, lora)
    plain, padded = expert_kernels._swiglu(*args), expert_kernels._padded(*args)
    torch.testing.assert_close(padded, plain, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(plain)
    params = [x, experts.adapters.gate_up_A, experts.adapters.down_B]
    for a, b in zip(torch.autograd.grad(padded, params, g), torch.autograd.grad(plain, params, g)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_adapters_train_under_bf16_autocast():
    _, model = base_and_adapted()
    perturb(model)
    ids = torch.randint(0, 50, (8, 40), generator=torch.Generator().manual_seed(3))  # >= 64 slots: padded groups
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().sum().backward()
    a = model.layers[1].feed_forward.experts.adapters
    assert a.down_B.grad.abs().sum() > 0 and model.layers[0].self_attn.q_proj.lora_B.grad.abs().sum() > 0
    assert model.layers[0].self_attn.q_proj.weight.grad is None  # the base stays frozen


def trainable_share(model_cfg) -> float:
    with torch.device("meta"):  # shapes only: nothing allocated
        model = add_lora(LlamaModel(model_cfg), rank=8, alpha=16.0)
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad) / sum(p.numel() for p in params)


def test_rank_8_trains_at_most_2_percent_of_the_100m_preset_and_smollm2_135m():
    from llama4dpo import Config
    moe_100m = Config.load("llama4-100m").model
    smollm2 = ModelConfig(family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                          intermediate_size_mlp=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, moe_layers=[], no_rope_layers=[1] * 30, attention_chunk_size=None,
                          use_qk_norm=False, attn_temperature_tuning=False, tie_word_embeddings=True,
                          max_position_embeddings=8192)
    shares = trainable_share(moe_100m), trainable_share(smollm2)
    print(f"rank 8: {shares[0]:.2%} of the 100m preset's parameters train, {shares[1]:.2%} of SmolLM2-135M's")
    assert all(0 < s <= 0.02 for s in shares), shares


@pytest.mark.parametrize("overrides", [
    [],                                                           # every target, MoE and dense layers
    ["lora.targets=attention", "lora.train_router=true"],
    ["lora.targets=mlp,experts", "model.num_key_value_heads=1"],
    ["lora.targets=shared_expert", "lora.rank=3", "model.interleave_moe_layer_step=1"],
])
def test_the_memory_estimate_counts_the_trained_parameters(overrides):
    """resources.lora_parameter_count (arithmetic on the config, for the memory check) = what apply_lora trains;
    the estimate then holds gradients and AdamW moments for those only."""
    from llama4dpo import Config, resources
    from llama4dpo.model.lora import apply_lora
    cfg = Config.load("tiny", ["lora.rank=4", *overrides])
    with torch.device("meta"):
        model = apply_lora(LlamaModel(cfg.model), cfg.lora)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert resources.lora_parameter_count(cfg) == trained > 0
    full_cfg = Config.load("tiny", [o for o in overrides if o.startswith("model.")])  # every weight trained
    est, full = (resources.estimate_training(c, command="dpo") for c in (cfg, full_cfg))
    assert est["gradients"] == 4 * trained and est["optimizer"] == 8 * trained
    assert est["gradients"] < full["gradients"] / 4


def test_a_trained_router_is_off_with_the_adapters_and_merges():
    """lora.train_router trains a zero-started delta of each router: switched off, the routing is the base's."""
    from llama4dpo.config import LoRAConfig
    from llama4dpo.model.lora import WithoutAdapters, apply_lora, merge_lora
    base = LlamaModel(ModelConfig(**TINY)).init_weights(seed=0).eval()
    model = apply_lora(copy.deepcopy(base), LoRAConfig(rank=4, alpha=8.0, train_router=True))
    perturb(model)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "lora_delta"):
                m.lora_delta.normal_(0, 1.0)  # enough to change which experts are chosen
        want, adapted = base(IDS), model(IDS)
        assert (WithoutAdapters(model)(IDS) - want).abs().max() <= 1e-6
        assert (adapted - want).abs().max() > 1e-3
        merged = merge_lora(model).requires_grad_(True)
        assert (merged(IDS) - adapted).abs().max() <= 1e-5
    assert not list(lora_modules(merged)) and all(p.requires_grad for p in merged.parameters())


def test_targets_that_adapt_no_layer_are_a_one_line_error():
    from llama4dpo.config import LoRAConfig
    from llama4dpo.errors import UserError
    from llama4dpo.model.lora import apply_lora
    dense = LlamaModel(ModelConfig(**{**TINY, "moe_layers": []}))
    with pytest.raises(UserError, match="adapt no layer"):
        apply_lora(dense, LoRAConfig(rank=4, targets=["experts", "shared_expert"]))
