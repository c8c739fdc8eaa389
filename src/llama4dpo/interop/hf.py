"""Export to / import from transformers' Llama4ForCausalLM directory format (config.json + safetensors).

Our module names are transformers' without the `model.` prefix of the CausalLM wrapper, and the experts
use the same fused (E, D, 2I) / (E, I, D) layout, so conversion is the key table below - no reshaping.
Neither direction needs transformers installed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import atomic_dir, load_model, model_state_dict, read_json, save_model, TOKENIZER
from ..config import Config, ModelConfig
from ..errors import UserError
from ..model import LlamaModel

# Our key -> transformers key. Everything but the LM head lives under the backbone `model.`.
def to_hf_key(key: str) -> str:
    return key if key.startswith("lm_head.") else "model." + key


def from_hf_key(key: str) -> str:
    key = key.removeprefix("language_model.")  # Llama4ForConditionalGeneration checkpoints nest the text model
    return key.removeprefix("model.")


# ModelConfig fields that carry over unchanged (same name, same meaning).
SAME_FIELDS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_local_experts",
               "num_experts_per_tok", "interleave_moe_layer_step", "no_rope_layer_interval",
               "attention_chunk_size", "use_qk_norm", "attn_temperature_tuning", "floor_scale", "attn_scale",
               "rms_norm_eps", "attention_bias", "attention_dropout", "tie_word_embeddings", "pad_token_id",
               "bos_token_id", "eos_token_id", "initializer_range", "max_position_embeddings",
               "router_aux_loss_coef"]
OUR_TOKENIZER = "llama4dpo_tokenizer.json"  # beside the HF files; HF's own tokenizer.json is another format


def hf_config_dict(m: ModelConfig) -> dict:
    """A config.json that `Llama4TextConfig` reads, with every derived value written out explicitly."""
    d = {k: getattr(m, k) for k in SAME_FIELDS}
    d.update(
        architectures=["Llama4ForCausalLM"], model_type="llama4_text", torch_dtype="float32",
        num_key_value_heads=m.n_kv_heads, head_dim=m.d_head, intermediate_size=m.expert_size,
        intermediate_size_mlp=m.dense_size, moe_layers=m.moe_layer_ids,
        no_rope_layers=[int(f) for f in m.rope_layer_flags], hidden_act="silu", use_cache=True,
        rope_theta=m.rope_theta,
        rope_scaling=None if m.rope_type == "default" else {
            "rope_type": "llama3", "factor": m.rope_factor, "low_freq_factor": m.rope_low_freq_factor,
            "high_freq_factor": m.rope_high_freq_factor,
            "original_max_position_embeddings": m.rope_original_max_position_embeddings},
    )
    d["router_aux_loss_coef"] = 0.0  # ours is optional; transformers' Llama 4 computes none
    return d


def model_config_from_hf(d: dict) -> ModelConfig:
    d = d.get("text_config", d)  # the multimodal Llama4Config nests the text model's config
    if d.get("model_type") not in (None, "llama4_text", "llama4"):
        raise UserError(f"not a Llama 4 text config (model_type={d.get('model_type')!r})")
    kw = {k: d[k] for k in SAME_FIELDS if k in d and k != "router_aux_loss_coef"}
    kw["attn_temperature_tuning"] = bool(d.get("attn_temperature_tuning", True))
    for k in ("num_key_value_heads", "intermediate_size", "intermediate_size_mlp", "moe_layers", "no_rope_layers"):
        if d.get(k) is not None:
            kw[k] = d[k]
    kw["head_dim"] = d.get("head_dim", 128)  # transformers' default is 128, not hidden/heads
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):  # ids may be lists in hub configs
        if isinstance(kw.get(k), list):
            kw[k] = kw[k][0] if kw[k] else None
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    kw["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", 500000.0)))
    if rope.get("rope_type", rope.get("type", "default")) == "llama3":
        kw.update(rope_type="llama3", rope_factor=float(rope["factor"]),
                  rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                  rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                  rope_original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)))
    cfg = ModelConfig(**kw)
    cfg.validate()
    return cfg


def export_hf(ckpt: str | Path, out_dir: str | Path) -> Path:
    model = load_model(ckpt)
    sd = {to_hf_key(k): v for k, v in model_state_dict(model).items()}
    with atomic_dir(out_dir) as tmp:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config_dict(model.cfg), indent=2) + "\n")
        if (Path(ckpt) / TOKENIZER).is_file():
            shutil.copyfile(Path(ckpt) / TOKENIZER, tmp / OUR_TOKENIZER)
    return Path(out_dir)


def import_hf(hf_dir: str | Path, out_ckpt: str | Path) -> Path:
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise UserError(f"{hf_dir}: no config.json (expected a transformers model directory)")
    cfg = Config(model=model_config_from_hf(read_json(hf_dir / "config.json")))
    model = LlamaModel(cfg.model)
    sd = {}
    for f in _weight_files(hf_dir):
        sd.update({from_hf_key(k): v for k, v in load_file(str(f)).items()})
    if cfg.model.tie_word_embeddings:
        sd.setdefault("lm_head.weight", sd.get("embed_tokens.weight"))
    ours = model.state_dict()
    sd = {k: v for k, v in sd.items() if k in ours or not k.startswith(("vision", "multi_modal"))}
    missing, unexpected = sorted(set(ours) - set(sd)), sorted(set(sd) - set(ours))
    if missing or unexpected:
        raise UserError(f"{hf_dir}: weights do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()}, strict=True)
    tokenizer = None
    if (hf_dir / OUR_TOKENIZER).is_file():
        from ..tokenizer import load_tokenizer
        tokenizer = load_tokenizer(hf_dir / OUR_TOKENIZER)
    return save_model(out_ckpt, model, cfg, tokenizer)


def _weight_files(hf_dir: Path) -> list[Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        return [hf_dir / f for f in sorted(set(read_json(index)["weight_map"].values()))]
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{hf_dir}: no .safetensors weights (pytorch_model.bin is not loaded: it would unpickle)")
    return files
