"""transformers' dense Llama (LlamaForCausalLM: Llama 2 and 3.x, SmolLM2, TinyLlama) as our model, family "llama".

A dense Llama is a Llama 4 text model whose layers are all dense and all RoPE, with no chunked attention, qk-norm
or attention-temperature tuning; its MLP is our dense layers' `feed_forward` (transformers calls it `mlp`). The
one real difference is the rotary layout: Llama rotates each head's dims i and i + d/2 together (rotate_half),
Llama 4 - and we - the adjacent dims 2i and 2i + 1. So the rows of the q and k projections (and their biases) are
reordered per head on the way in, and put back on the way out; the model computes the same function.
"""

from __future__ import annotations

import dataclasses

import torch

from ..config import ModelConfig
from ..resources import check_model

ARCHITECTURE = "LlamaForCausalLM"
# LlamaConfig fields that carry over unchanged; the first five have no sensible default, so config.json must say
REQUIRED = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
SAME_FIELDS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "rms_norm_eps",
               "attention_bias", "attention_dropout", "tie_word_embeddings", "pad_token_id", "bos_token_id",
               "eos_token_id", "initializer_range", "max_position_embeddings"]
# transformers' LlamaConfig defaults where they differ from ours, for a config.json that leaves them out
DEFAULTS = {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048}
DEFAULT_ROPE_THETA = 10000.0
# The Llama 4 features a dense Llama has none of (see ModelConfig._dense_llama_checks)
DENSE = dict(family="llama", moe_layers=[], attention_chunk_size=None, use_qk_norm=False,
             attn_temperature_tuning=False)


# ---- config -----------------------------------------------------------------------------------------------------

def config_kwargs(d: dict, bad) -> dict:
    """ModelConfig keyword arguments, values still unchecked, from a LlamaForCausalLM config.json (`d`); `bad(why)`
    raises the one-line error for what we cannot run. RoPE fields are the caller's (shared with Llama 4)."""
    arch = d.get("architectures")
    if arch is not None and (not isinstance(arch, list) or ARCHITECTURE not in arch):
        bad(f"architectures {arch!r:.80} is not supported; import-hf reads {ARCHITECTURE}")
    if d.get("mlp_bias"):
        bad("mlp_bias is true: biases on the MLP projections are not supported (our dense MLP has none)")
    if d.get("hidden_act", "silu") != "silu":
        bad(f"hidden_act {d.get('hidden_act')!r:.40} is not supported (only silu, the SwiGLU of every Llama)")
    for key in REQUIRED:
        if d.get(key) is None:
            bad(f"{key}: missing (or null)")
    kw = {**DEFAULTS, **{k: d[k] for k in SAME_FIELDS if k in d}, **DENSE}
    kw["intermediate_size_mlp"] = kw["intermediate_size"] = d["intermediate_size"]  # (no experts: for sizing only)
    for key in ("num_key_value_heads", "head_dim"):  # unset: all heads; hidden_size / heads (as transformers)
        if d.get(key) is not None:
            kw[key] = d[key]
    return kw


def with_rope_everywhere(cfg: ModelConfig, where: str) -> ModelConfig:
    """`cfg` with no_rope_layers all 1, the list built only once the config checks out and its weights fit in
    memory: a crafted num_hidden_layers must be refused there, not exhaust memory building [1] * 10**12."""
    dataclasses.replace(cfg, family="llama4").validate()  # (only the family check needs the list)
    check_model(cfg, "cpu", where, copies=2)
    return dataclasses.replace(cfg, no_rope_layers=[1] * cfg.num_hidden_layers)


def hf_config_dict(m: ModelConfig) -> dict:
    """A config.json that transformers' `LlamaConfig` reads, with every derived value written out explicitly."""
    d = {k: getattr(m, k) for k in SAME_FIELDS}
    d.update(
        architectures=[ARCHITECTURE], model_type="llama", torch_dtype="float32", num_key_value_heads=m.n_kv_heads,
        head_dim=m.d_head, intermediate_size=m.dense_size, hidden_act="silu", mlp_bias=False, pretraining_tp=1,
        use_cache=True, rope_theta=m.rope_theta,
        rope_scaling=None if m.rope_type == "default" else {
            "rope_type": "llama3", "factor": m.rope_factor, "low_freq_factor": m.rope_low_freq_factor,
            "high_freq_factor": m.rope_high_freq_factor,
            "original_max_position_embeddings": m.rope_original_max_position_embeddings},
    )
    return d


# ---- weights ----------------------------------------------------------------------------------------------------

def from_hf_key(key: str) -> str:
    """model.layers.0.mlp.up_proj.weight -> layers.0.feed_forward.up_proj.weight; other names lose `model.`."""
    return key.removeprefix("model.").replace(".mlp.", ".feed_forward.", 1)


def to_hf_key(key: str) -> str:
    if key.startswith("lm_head."):
        return key
    return "model." + key.replace(".feed_forward.", ".mlp.", 1)


def ignored(hf_key: str) -> bool:
    """Old conversions saved each layer's rotary frequencies, a buffer transformers (and we) recompute."""
    return hf_key.endswith(".rotary_emb.inv_freq")


def to_interleaved(t: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k projection rows (or bias), rotate_half order -> ours: per head, rows i and i + d/2 become 2i, 2i + 1."""
    return t.unflatten(0, (heads, 2, -1)).transpose(1, 2).flatten(0, 2)


def to_rotate_half(t: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `to_interleaved`."""
    return t.unflatten(0, (heads, -1, 2)).transpose(1, 2).flatten(0, 2).contiguous()


def _reorder_qk(sd: dict[str, torch.Tensor], m: ModelConfig, reorder) -> dict[str, torch.Tensor]:
    heads = {"q_proj": m.num_attention_heads, "k_proj": m.n_kv_heads}
    # (the module name is the second-to-last part: layers.N.self_attn.q_proj.weight / .bias)
    return {k: reorder(v, heads[k.split(".")[-2]]) if k.split(".")[-2] in heads else v for k, v in sd.items()}


def from_hf_order(sd: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict (our names, shapes checked) with the q/k rows moved from transformers' order into ours."""
    return _reorder_qk(sd, m, to_interleaved)


def hf_state_dict(sd: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict as a LlamaForCausalLM's: transformers' names, q/k rows in rotate_half order."""
    return {to_hf_key(k): v for k, v in _reorder_qk(sd, m, to_rotate_half).items()}
