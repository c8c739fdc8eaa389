"""Logit parity with transformers' Llama4ForCausalLM on random tiny configs, in both directions."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Llama4ForCausalLM, Llama4TextConfig  # noqa: E402

from llama4dpo import Config, ModelConfig, LlamaModel, load_model, save_model  # noqa: E402
from llama4dpo.interop import export_hf, import_hf  # noqa: E402
from llama4dpo.model import moe as moe_module  # noqa: E402

BASE = dict(vocab_size=100, hidden_size=64, intermediate_size=128, intermediate_size_mlp=256,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            num_local_experts=4, num_experts_per_tok=1, max_position_embeddings=512)
# Together: step 1 and 2, top-1 and top-2, qk-norm on and off, chunk < sequence, small floor_scale,
# NoPE layers (every 4th by default, every 2nd in one), GQA (2 kv heads; 1 kv head in one), llama3 RoPE.
CONFIGS = {
    "step1-top1-chunk8-temp": dict(interleave_moe_layer_step=1, attention_chunk_size=8, floor_scale=4, attn_scale=0.5),
    "step2-top2-chunk16": dict(interleave_moe_layer_step=2, num_experts_per_tok=2, attention_chunk_size=16),
    "noqknorm-nope2-temp": dict(use_qk_norm=False, no_rope_layer_interval=2, attention_chunk_size=8, floor_scale=2),
    "mqa-top2-6experts": dict(num_key_value_heads=1, num_local_experts=6, num_experts_per_tok=2,
                              attention_chunk_size=None, floor_scale=3),
    "llama3-rope-step2": dict(interleave_moe_layer_step=2, attention_chunk_size=8, floor_scale=4,
                              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "tied-5layers-explicit-moe": dict(num_hidden_layers=5, moe_layers=[0, 3, 4], tie_word_embeddings=True,
                                      attention_chunk_size=12, floor_scale=5, attn_scale=0.3, rope_theta=10000.0),
}


def hf_model(kw, attn="eager"):
    torch.manual_seed(0)
    cfg = Llama4TextConfig(**{**BASE, **kw})
    return Llama4ForCausalLM._from_config(cfg, attn_implementation=attn).eval()


def ids(batch=2, length=40, vocab=100):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


def hf_logits(model, x):
    with torch.no_grad():
        return model(x, use_cache=False).logits


def our_logits(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_import_from_transformers(tmp_path, name, attn):
    hf = hf_model(CONFIGS[name], attn)
    hf.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ours")
    ours = load_model(tmp_path / "ours")
    x = ids()
    diff = (hf_logits(hf, x) - our_logits(ours, x)).abs().max().item()
    assert diff <= 1e-5, f"{name}/{attn}: max |diff| {diff}"


@pytest.mark.parametrize("name", CONFIGS)
def test_export_to_transformers(tmp_path, name):
    kw = {**BASE, **CONFIGS[name]}
    rope = kw.pop("rope_scaling", None)
    if rope:
        kw.update(rope_type="llama3", rope_factor=rope["factor"], rope_low_freq_factor=rope["low_freq_factor"],
                  rope_high_freq_factor=rope["high_freq_factor"],
                  rope_original_max_position_embeddings=rope["original_max_position_embeddings"])
    cfg = Config(model=ModelConfig(**kw))
    ours = LlamaModel(cfg.model).init_weights(seed=3).eval()
    save_model(tmp_path / "ours", ours, cfg)
    export_hf(tmp_path / "ours", tmp_path / "hf")
    hf = Llama4ForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    x = ids()
    diff = (hf_logits(hf, x) - our_logits(ours, x)).abs().max().item()
    assert diff <= 1e-5, f"{name}: max |diff| {diff}"


def test_negative_control_score_on_expert_output_is_detected(monkeypatch):
    """The comparison above is sharp enough to catch a plausible mistake: scaling the expert output."""
    hf = hf_model(CONFIGS["step1-top1-chunk8-temp"])
    ours = LlamaModel(ModelConfig(**{**BASE, **CONFIGS["step1-top1-chunk8-temp"]}))
    ours.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()})
    x = ids()
    good = (hf_logits(hf, x) - our_logits(ours, x)).abs().max().item()

    def wrong_forward(self, x):  # score multiplies the output instead of the input
        B, S, D = x.shape
        xt = x.reshape(-1, D)
        top_logits, top_idx = self.router(xt).topk(self.top_k, dim=-1)
        scores = torch.sigmoid(top_logits.float())
        expert_of_slot = top_idx.flatten()
        order = expert_of_slot.argsort(stable=True)
        token_of_slot = order // self.top_k
        counts = torch.bincount(expert_of_slot, minlength=self.num_experts)
        routed = self.experts(xt[token_of_slot], counts) * scores.flatten()[order, None]
        return self.shared_expert(xt).index_add(0, token_of_slot, routed).view(B, S, D)

    monkeypatch.setattr(moe_module.MoE, "forward", wrong_forward)
    bad = (hf_logits(hf, x) - our_logits(ours, x)).abs().max().item()
    assert good <= 1e-5 < bad, (good, bad)


def test_parameter_counts_match_transformers():
    for step, expected in ((1, 555_072), (2, 407_104)):  # the spec's counts for the tiny recipe
        ours = LlamaModel(ModelConfig(**BASE, interleave_moe_layer_step=step))
        hf = hf_model(dict(interleave_moe_layer_step=step))
        assert ours.num_params()[0] == sum(p.numel() for p in hf.parameters()) == expected
        assert set(ours.state_dict()) == {k.removeprefix("model.") for k in hf.state_dict()}
