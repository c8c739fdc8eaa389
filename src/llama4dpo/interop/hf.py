"""Export to / import from transformers' Llama4ForCausalLM directory format (config.json + safetensors), and
LlamaForCausalLM's for a dense Llama (checkpoints of family "llama"; its mapping is in `llama.py`).

Our module names are transformers' without the `model.` prefix of the CausalLM wrapper, and the experts
use the same fused (E, D, 2I) / (E, I, D) layout, so conversion is the key table below - no reshaping.
Neither direction needs transformers installed.

Both directions read folders someone else may have crafted, so every file read is a plain file inside the
folder (no symlink, no `../` or absolute path from an index), and every bad value - a config field of the
wrong type, a truncated shard, a tensor of the wrong shape, dtype or with NaN/inf - is a one-line UserError
naming the file and key, never a traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import typing
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..checkpoint import (TOKENIZER, atomic_dir, load_model, load_tokenizer, model_state_dict, read_json,
                          save_model)
from ..config import Config, ModelConfig, _coerce
from ..errors import ConfigError, UserError
from ..model import LlamaModel
from ..resources import check_model
from ..tokenizer import HFTokenizer, save_for_transformers
from ..tokenizer import load_tokenizer as load_tokenizer_file
from . import llama

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
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
INDEX = "model.safetensors.index.json"        # a sharded checkpoint's {"weight_map": {tensor: shard file}}
# Our llama3 RoPE fields -> (name in config.json's rope_scaling, transformers' default; None: required).
LLAMA3_ROPE = {"rope_factor": ("factor", None), "rope_low_freq_factor": ("low_freq_factor", 1.0),
               "rope_high_freq_factor": ("high_freq_factor", 4.0),
               "rope_original_max_position_embeddings": ("original_max_position_embeddings", 8192)}


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


LLAMA4_TYPES = (None, "llama4_text", "llama4")  # (None: configs written before transformers named it)


def model_config_from_hf(d, where: str = "config.json") -> ModelConfig:
    """Our ModelConfig from a transformers config.json, Llama 4's or a dense Llama's; a bad value is a UserError
    naming `where` and the key."""
    def bad(why) -> typing.NoReturn:
        raise UserError(f"{where}: {why}")

    if not isinstance(d, dict):
        bad(f"expected a JSON object, got {type(d).__name__}")
    if d.get("model_type") != "llama":
        d = d.get("text_config", d)  # the multimodal Llama4Config nests the text model's config
    if not isinstance(d, dict):
        bad(f"text_config: expected a JSON object, got {type(d).__name__}")
    if d.get("model_type") == "llama":
        kw, default_theta = llama.config_kwargs(d, bad), llama.DEFAULT_ROPE_THETA
    elif d.get("model_type") in LLAMA4_TYPES:
        kw, default_theta = _llama4_kwargs(d), 500000.0
    else:
        bad(f"model_type {d.get('model_type')!r:.60} (architectures {d.get('architectures')!r:.80}) is not "
            f"supported; import-hf reads llama4_text / llama4 (Llama4ForCausalLM) and llama (LlamaForCausalLM)")
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):  # ids may be lists in hub configs
        if isinstance(kw.get(k), list):
            kw[k] = kw[k][0] if kw[k] else None
    rope_key = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
    rope = d.get(rope_key) or {}
    if not isinstance(rope, dict):
        bad(f"{rope_key}: expected a JSON object or null, got {rope!r:.60}")
    kw["rope_theta"] = rope.get("rope_theta", d.get("rope_theta", default_theta))  # (transformers 5 nests it)
    kw["rope_type"] = rope.get("rope_type", rope.get("type", "default"))  # validate() refuses all but default, llama3
    names = {k: k for k in kw}  # our field -> its name in config.json, for error messages
    names["rope_type"] = f"{rope_key}.rope_type"
    if kw["rope_type"] == "llama3":
        for ours, (theirs, default) in LLAMA3_ROPE.items():
            kw[ours], names[ours] = rope.get(theirs, default), f"{rope_key}.{theirs}"
    try:
        # each value checked against ModelConfig's annotation (ConfigError naming the key), then the usual checks
        hints = typing.get_type_hints(ModelConfig)
        cfg = ModelConfig(**{k: _coerce(v, hints[k], names[k]) for k, v in kw.items()})
        if cfg.family == "llama":
            cfg = llama.with_rope_everywhere(cfg, where)  # (a memory error there names `where` itself)
        cfg.validate()
    except ConfigError as e:
        bad(e)
    except (TypeError, ValueError, OverflowError) as e:
        bad(f"unusable config ({type(e).__name__}: {e})")
    return cfg


def _llama4_kwargs(d: dict) -> dict:
    """ModelConfig keyword arguments, values still unchecked, from a Llama4TextConfig's config.json, bar RoPE."""
    kw = {k: d[k] for k in SAME_FIELDS if k in d and k != "router_aux_loss_coef"}
    kw["attn_temperature_tuning"] = bool(d.get("attn_temperature_tuning", True))
    for k in ("num_key_value_heads", "intermediate_size", "intermediate_size_mlp", "moe_layers", "no_rope_layers"):
        if d.get(k) is not None:
            kw[k] = d[k]
    kw["head_dim"] = d.get("head_dim", 128)  # transformers' default is 128, not hidden/heads
    return kw


# ---- export -----------------------------------------------------------------------------------------------------

def export_hf(ckpt: str | Path, out_dir: str | Path) -> Path:
    # load_model refuses a checkpoint holding any symlink: export would copy its target (a private key...) out
    model = load_model(ckpt)
    if model.cfg.family == "llama":
        sd, config = llama.hf_state_dict(model_state_dict(model), model.cfg), llama.hf_config_dict(model.cfg)
    else:
        sd, config = {to_hf_key(k): v for k, v in model_state_dict(model).items()}, hf_config_dict(model.cfg)
    with atomic_dir(out_dir, what="export") as tmp:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if (Path(ckpt) / TOKENIZER).is_file():  # ours (exact round trip) and transformers' (AutoTokenizer)
            shutil.copyfile(Path(ckpt) / TOKENIZER, tmp / OUR_TOKENIZER)
            save_for_transformers(load_tokenizer(ckpt), tmp, model_max_length=model.cfg.max_position_embeddings)
    return Path(out_dir)


# ---- import -----------------------------------------------------------------------------------------------------

def import_hf(hf_dir: str | Path, out_ckpt: str | Path) -> Path:
    hf_dir = Path(hf_dir)
    if not os.path.lexists(hf_dir / "config.json"):
        raise UserError(f"{hf_dir}: no config.json (expected a transformers model directory)")
    config = _plain_file(hf_dir, "config.json")
    d = read_json(config)
    cfg = Config(model=model_config_from_hf(d, where=str(config)))
    check_model(cfg.model, "cpu", str(config), copies=2)  # (before building it: a crafted size fails at once)
    cfg.model.source = f"{_architecture(d, cfg.model)} from {hf_dir.resolve()}"
    model = LlamaModel(cfg.model)
    if cfg.model.family == "llama":
        sd = llama.from_hf_order(_read_weights(hf_dir, model, llama.from_hf_key, llama.ignored), cfg.model)
    else:
        sd = _read_weights(hf_dir, model, from_hf_key, lambda key: False)
    model.load_state_dict(sd, strict=True)
    tokenizer = None
    if os.path.lexists(hf_dir / OUR_TOKENIZER):
        tokenizer = load_tokenizer_file(_plain_file(hf_dir, OUR_TOKENIZER))
    elif os.path.lexists(hf_dir / "tokenizer.json"):  # the model's own: tokenizer.json + its config files
        for name in HF_TOKENIZER_FILES:
            if os.path.lexists(hf_dir / name):
                _plain_file(hf_dir, name)
        tokenizer = HFTokenizer.from_pretrained_dir(hf_dir)
    if tokenizer is not None and tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(f"{hf_dir}: its tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                        f"vocab_size {cfg.model.vocab_size}")
    return save_model(out_ckpt, model, cfg, tokenizer)


def _architecture(d: dict, m: ModelConfig) -> str:
    """The class config.json names (Llama4ForConditionalGeneration...), else the family's own."""
    names = d.get("architectures")
    if isinstance(names, list) and names and isinstance(names[0], str):
        return names[0][:80]
    return llama.ARCHITECTURE if m.family == "llama" else "Llama4ForCausalLM"


def _read_weights(hf_dir: Path, model: LlamaModel, rename, ignored) -> dict[str, torch.Tensor]:
    """All shards' tensors under our names (`rename` of transformers' names; `ignored(name)` ones dropped), as
    float32, each checked: a known name, the config's shape, floating point and finite. Errors name the shard
    and transformers' tensor name."""
    ours = model.state_dict()
    sd, origin = {}, {}  # our key -> tensor, and -> "shard: their key" for messages
    for f in _weight_files(hf_dir):
        try:
            tensors = load_file(str(f))
        except (SafetensorError, OSError, ValueError) as e:  # truncated, not safetensors, unknown dtype
            raise UserError(f"{f}: not a readable safetensors file ({e})") from None
        for k, v in tensors.items():
            key = rename(k)
            if ignored(k) or (key not in ours and key.startswith(("vision", "multi_modal"))):
                continue  # an old conversion's rotary buffer, or the multimodal checkpoint's image tower
            if key in sd:
                raise UserError(f"{f}: {k} is also in {origin[key]}")
            sd[key], origin[key] = v, f"{f}: {k}"
    if model.cfg.tie_word_embeddings and "embed_tokens.weight" in sd:
        sd.setdefault("lm_head.weight", sd["embed_tokens.weight"])
        origin.setdefault("lm_head.weight", origin["embed_tokens.weight"])
    missing, unexpected = sorted(set(ours) - set(sd)), sorted(set(sd) - set(ours))
    if missing or unexpected:
        raise UserError(f"{hf_dir}: weights do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in sd.items():
        if v.shape != ours[k].shape:
            raise UserError(f"{origin[k]} has shape {tuple(v.shape)}, config.json implies {tuple(ours[k].shape)}")
        if not v.dtype.is_floating_point:
            raise UserError(f"{origin[k]} is {v.dtype}; weights must be floating point")
        sd[k] = v = v.to(torch.float32)
        if not torch.isfinite(v).all():
            raise UserError(f"{origin[k]} has non-finite values (NaN or inf)")
    if model.cfg.tie_word_embeddings and not torch.equal(sd["lm_head.weight"], sd["embed_tokens.weight"]):
        # one shared parameter cannot hold both (loaded into it, the head would silently replace the embedding);
        # transformers unties them
        raise UserError(f"{origin['lm_head.weight']} is not the embedding, yet config.json ties the two "
                        f"(tie_word_embeddings: true); set it to false to import both")
    return sd


def _weight_files(hf_dir: Path) -> list[Path]:
    """The shards the index names, or else every *.safetensors; each a plain file inside hf_dir."""
    if os.path.lexists(hf_dir / INDEX):
        index = _plain_file(hf_dir, INDEX)
        d = read_json(index)
        weight_map = d.get("weight_map") if isinstance(d, dict) else None
        if not isinstance(weight_map, dict):
            raise UserError(f'{index}: expected {{"weight_map": {{tensor name: shard file}}}}')
        for k, name in weight_map.items():
            if not isinstance(name, str):
                raise UserError(f"{index}: weight_map[{k!r:.80}] must be a file name, got {name!r:.60}")
        return [_plain_file(hf_dir, name, named_by=f"{index}: weight_map entry")
                for name in sorted(set(weight_map.values()))]
    files = [_plain_file(hf_dir, p.name) for p in sorted(hf_dir.glob("*.safetensors"))]
    if not files:
        raise UserError(f"{hf_dir}: no .safetensors weights (pytorch_model.bin is not loaded: it would unpickle)")
    return files


def _hub_blobs(folder: Path) -> Path | None:
    """`models--ORG--NAME/blobs` when `folder` is a Hugging Face hub cache snapshot
    (`models--ORG--NAME/snapshots/REVISION/`, whose files are symlinks into that blobs/ folder), else None."""
    snapshots = folder.resolve().parent
    if snapshots.name == "snapshots" and snapshots.parent.name.startswith("models--"):
        return (snapshots.parent / "blobs").resolve()
    return None


def _plain_file(folder: Path, name: str, named_by: str = "") -> Path:
    """folder/name, refused unless it is a regular file inside `folder` and not a symlink: a crafted index
    must not make us read `../../secret` or `/etc/shadow`, nor a link to them. The one exception is a hub cache
    snapshot, whose files are links into its repository's blobs/ (`_hub_blobs`): there a link is followed
    only to a regular file directly inside that blobs/ folder."""
    path = folder / name
    prefix = f"{named_by} {name!r:.120}" if named_by else str(path)
    if path.is_symlink():
        blobs = _hub_blobs(folder)
        if blobs is None or path.resolve().parent != blobs or not path.resolve().is_file():
            raise UserError(f"{path}: is a symbolic link; refusing to read through it (copy the target in)")
        return path  # a hub cache snapshot's file: a link into the same repository's blobs/
    try:
        inside = path.resolve().is_relative_to(folder.resolve())
    except (OSError, ValueError, RuntimeError) as e:  # a NUL byte in the name, a symlink loop above it
        raise UserError(f"{prefix}: not a usable file name ({type(e).__name__}: {e})") from None
    if not inside:
        raise UserError(f"{prefix}: lies outside {folder}; refusing to read it")
    if not path.is_file():
        raise UserError(f"{prefix}: missing, or not a regular file")
    return path

