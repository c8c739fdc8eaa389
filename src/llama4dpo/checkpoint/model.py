"""Model checkpoints: a directory with config.json, model.safetensors and (optionally) tokenizer.json; or, from
a LoRA run, adapters.safetensors and base.json in place of model.safetensors (adapters.py).

Nothing here unpickles: weights are safetensors, everything else is JSON; every weight is checked finite
floating point on the way in and out. Written atomically (files.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import Config
from ..errors import UserError
from ..model import LlamaModel
from ..model.lora import apply_lora, merge_lora
from ..resources import check_model
from ..tokenizer import load_tokenizer as _load
from .adapters import adapter_state, is_adapter_checkpoint, read_base, trained_names
from .files import ADAPTERS, BASE, CONFIG, TOKENIZER, WEIGHTS, atomic_dir, refuse_symlinks, verify_manifest

ALLOW_NONFINITE = "LLAMA4DPO_ALLOW_NONFINITE"  # =1: load weights holding NaN/inf (to inspect a diverged model)


def model_state_dict(model: LlamaModel, state: dict | None = None) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of `state` (default: the model's own; or some of it); the LM head is left out when
    tied (safetensors refuses shared storage)."""
    sd = {k: v.detach().to("cpu").contiguous() for k, v in (model.state_dict() if state is None else state).items()}
    if model.cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def write_model_files(directory: Path, model: LlamaModel, cfg: Config, tokenizer=None, state: dict | None = None,
                      base: dict | None = None) -> None:
    """Write the model files into an existing directory (no atomicity: see `atomic_dir`): the whole model, or
    with `base` (a LoRA run's adapters.base_record) its trained tensors and base.json. Refuses (NonFiniteError) a
    state holding NaN or inf: no checkpoint is ever published with one."""
    state = model.state_dict() if state is None else state
    sd = model_state_dict(model, adapter_state(model, state) if base is not None else state)
    check_finite(sd, "the model's weights")
    save_file(sd, str(directory / (ADAPTERS if base is not None else WEIGHTS)), metadata={"format": "pt"})
    if base is not None:
        (directory / BASE).write_text(json.dumps(base, indent=1) + "\n")
    cfg.save_json(directory / CONFIG)
    if tokenizer is not None:
        tokenizer.save(directory / TOKENIZER)


class NonFiniteError(UserError):
    """A tensor about to be written, or just read, holds NaN or inf."""


def check_finite(tensors: dict, what: str) -> None:
    """NonFiniteError naming the first floating tensor of `tensors` that holds NaN or inf."""
    for name, t in tensors.items():
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"{what}: {name} holds NaN or inf")


def save_model(path: str | Path, model: LlamaModel, cfg: Config, tokenizer=None, state: dict | None = None,
               base: dict | None = None) -> Path:
    with atomic_dir(path) as tmp:
        write_model_files(tmp, model, cfg, tokenizer, state, base)
    return Path(path)


def load_config(path: str | Path) -> Config:
    path = _checkpoint_dir(path)
    return Config.load_json(path / CONFIG)


def load_model(path: str | Path, device: str | torch.device = "cpu", *, merge: bool = True) -> LlamaModel:
    """Build the model from `path/config.json` and load `path/model.safetensors` (strictly); for an adapter
    checkpoint, its base with the adapters loaded and (`merge`) folded in."""
    path = _checkpoint_dir(path)
    verify_manifest(path)
    cfg = load_config(path)
    if is_adapter_checkpoint(path):
        return load_adapted(path, cfg, merge=merge).to(device).eval()
    check_model(cfg.model, "cpu", str(path / CONFIG), copies=2)  # built on the CPU, beside the weights read
    check_model(cfg.model, device, str(path / CONFIG))
    model = LlamaModel(cfg.model)
    load_weights(model, path / WEIGHTS)
    return model.to(device).eval()


def load_adapted(path: Path, cfg: Config, *, merge: bool = True) -> LlamaModel:
    """An adapter checkpoint's base (checked unchanged) with its adapters loaded: folded in (`merge`, a plain
    model, every weight trainable again) or as adapters on the frozen base."""
    base_path = read_base(path)
    model = load_model(base_path)  # (itself an adapter checkpoint, merged, when LoRA was stacked on LoRA)
    if model.cfg != cfg.model or not cfg.lora.enabled:
        raise UserError(f"{path / CONFIG}: not the config of adapters of {base_path} "
                        f"({'lora.rank is 0' if not cfg.lora.enabled else 'its [model] differs'})")
    apply_lora(model, cfg.lora)  # (fp32 base: the adapters are folded into fp32 weights)
    load_adapters(model, path / ADAPTERS)
    return merge_lora(model).requires_grad_(True) if merge else model


def load_adapters(model: LlamaModel, file: Path) -> None:
    """The trained tensors of an adapter checkpoint into an adapted model (each name it trains, nothing else)."""
    model.load_state_dict(read_weights(model, file, adapters=True), strict=False)


def load_weights(model: LlamaModel, file: Path) -> None:
    model.load_state_dict(read_weights(model, file), strict=True)


def read_weights(model: LlamaModel, file: Path, *, adapters: bool = False) -> dict[str, torch.Tensor]:
    """The state dict in `file`, checked against the model's names and shapes (one-line errors); `adapters`:
    the model's trained tensors only (an adapter checkpoint's)."""
    if not file.is_file():
        raise UserError(f"{file}: missing model weights")
    try:
        sd = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{file}: not a readable safetensors file ({e})") from None
    expected = model.state_dict()
    if adapters:
        expected = {n: expected[n] for n in trained_names(model)}
    elif model.cfg.tie_word_embeddings:
        sd.setdefault("lm_head.weight", sd.get("embed_tokens.weight"))
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        what = "adapters do not match the [lora] of" if adapters else "weights do not match"
        raise UserError(f"{file}: {what} config.json "
                        f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                        f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})")
    for k, v in sd.items():
        if v.shape != expected[k].shape:
            raise UserError(f"{file}: {k} has shape {tuple(v.shape)}, config.json implies {tuple(expected[k].shape)}")
        if not v.is_floating_point():
            raise UserError(f"{file}: {k} holds {v.dtype} values; weights must be floating point")
    if os.environ.get(ALLOW_NONFINITE) != "1":
        try:
            check_finite(sd, str(file))
        except NonFiniteError as e:
            raise NonFiniteError(f"{e} (a diverged model; set {ALLOW_NONFINITE}=1 to load it anyway)") from None
    return sd


def load_tokenizer(path: str | Path):
    """The tokenizer saved with a checkpoint; a one-line error if the checkpoint has none."""
    path = _checkpoint_dir(path)
    if not (path / TOKENIZER).is_file():
        raise UserError(f"{path}: this checkpoint has no tokenizer.json (e.g. imported from transformers "
                        f"without one); pass a tokenizer or train one with `pretrain`")
    tokenizer = _load(path / TOKENIZER)
    vocab = load_config(path).model.vocab_size
    if tokenizer.vocab_size > vocab:  # its ids past the embedding table would index out of range
        raise UserError(f"{path / TOKENIZER}: {tokenizer.vocab_size} tokens, more than the model's "
                        f"vocab_size {vocab} in {CONFIG}")
    return tokenizer


def has_tokenizer(path: str | Path) -> bool:
    return (Path(path) / TOKENIZER).is_file()


def _checkpoint_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint directory")
    if not path.is_dir() or not (path / CONFIG).is_file():
        raise UserError(f"{path}: not a llama4dpo checkpoint (expected a directory with {CONFIG})")
    refuse_symlinks(path)
    return path


