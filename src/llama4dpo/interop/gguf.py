"""Import a GGUF file (llama.cpp's format) of architecture `llama` - Llama 2 / 3.x, SmolLM2, TinyLlama, Mistral -
as a checkpoint of family "llama" (a dense Llama; see `llama.py`).

The metadata becomes the config.json a LlamaForCausalLM would have, read as a transformers directory's is
(`hf.model_config_from_hf`). Tensors are dequantized to float32 with the `gguf` package: a quantized file imports as
the model it encodes. Shapes are listed innermost dimension first (ggml's ne0 = a row's length), the reverse of
torch's; q/k rows are already in the interleaved (2i, 2i + 1) rotary order our model uses (no reordering).

A file is untrusted input: every refusal is a one-line UserError naming the file (and the key or tensor), and
nothing is unpickled (GGUF holds no pickles; the reader memory-maps plain arrays).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from ..checkpoint import save_model
from ..config import Config, ModelConfig
from ..errors import UserError
from ..model import LlamaModel
from ..model.rope import rope_frequencies
from ..resources import check_model
from ..tokenizer import HFTokenizer
from . import hf, llama

ARCHITECTURE = "llama"
# The tensor types llama.cpp writes for a Llama's weights that gguf.quants dequantizes (the K-quants: blocks of 256)
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
# Metadata values plus tensors a file may declare. Real files hold ~1e5 (SmolLM2) to ~1e6 (262k-token vocabularies
# with scores and types); the cap bounds what a crafted array length can make the reader build.
MAX_ENTRIES = 1 << 23

# GGUF metadata `llama.<key>` -> the LlamaConfig (config.json) field, and whether it must be there
CONFIG_KEYS = {"block_count": ("num_hidden_layers", True), "embedding_length": ("hidden_size", True),
               "feed_forward_length": ("intermediate_size", True),
               "attention.head_count": ("num_attention_heads", True),
               "attention.head_count_kv": ("num_key_value_heads", False), "attention.key_length": ("head_dim", False),
               "context_length": ("max_position_embeddings", False), "vocab_size": ("vocab_size", False),
               "attention.layer_norm_rms_epsilon": ("rms_norm_eps", False), "rope.freq_base": ("rope_theta", False)}
TOKEN_IDS = {"tokenizer.ggml.bos_token_id": "bos_token_id", "tokenizer.ggml.eos_token_id": "eos_token_id",
             "tokenizer.ggml.padding_token_id": "pad_token_id"}

# GGUF tensor names -> transformers' LlamaForCausalLM names (then ours via `llama.from_hf_key`)
TOP_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_TENSORS = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                 "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                 "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}
TOP_NAMES = {v: k for k, v in TOP_TENSORS.items()}      # (the inverses, for naming a missing tensor)
LAYER_NAMES = {v: k for k, v in LAYER_TENSORS.items()}
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1+: llama3 RoPE scaling as per-frequency divisors, not as metadata
# The llama3 scaling every Llama 3.1 / 3.2 / 3.3 uses, bar its factor (the largest divisor): checked, not assumed
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def import_gguf(path: str | Path, out_ckpt: str | Path) -> Path:
    """Write checkpoint `out_ckpt` holding the dense Llama in GGUF file `path`, with its tokenizer when the file
    has one."""
    path = Path(path)
    reader = read_gguf(path)
    fields = gguf_fields(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    cfg = Config(model=model_config(fields, tensors, path))
    check_model(cfg.model, "cpu", str(path), copies=2)  # (before building it: a crafted size fails at once)
    kinds = ", ".join(name for name, _ in Counter(t.tensor_type.name for t in reader.tensors).most_common())
    cfg.model.source = f"GGUF {ARCHITECTURE} ({kinds}) from {path.resolve()}"
    tokenizer = gguf_tokenizer(fields, cfg.model, path)  # (before dequantizing: a bad tokenizer fails fast)
    model = LlamaModel(cfg.model)
    model.load_state_dict(read_weights(tensors, model, path), strict=True)
    return save_model(out_ckpt, model, cfg, tokenizer)


# ---- reading ----------------------------------------------------------------------------------------------------

class _BoundedReader(gguf.GGUFReader):
    """GGUFReader refusing a file that declares more than MAX_ENTRIES metadata values and tensors, or whose
    metadata runs past its end. The reader walks every element of a declared array in Python, and reads past the
    end as empty arrays without complaint, so a crafted length (2**60) would otherwise spin or exhaust memory.
    (These hooks are the reader's internals; test_interop_gguf's crafted-array test fails if they are renamed.)"""

    def __init__(self, path):
        self._entries = 0
        super().__init__(path)

    def _count(self, offset: int) -> None:
        self._entries += 1
        if self._entries > MAX_ENTRIES:
            raise ValueError(f"more than {MAX_ENTRIES:,} metadata values and tensors")
        if offset >= len(self.data):
            raise ValueError("the header runs past the end of the file (truncated?)")

    def _get_field_parts(self, orig_offs, raw_type):
        self._count(orig_offs)
        return super()._get_field_parts(orig_offs, raw_type)

    def _get_tensor_info_field(self, orig_offs):
        self._count(orig_offs)
        return super()._get_tensor_info_field(orig_offs)


def read_gguf(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise UserError(f"{path}: missing, or not a regular file")
    try:
        return _BoundedReader(path)
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, OSError) as e:  # what a bad file raises
        raise UserError(f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e):.200})") from None


def gguf_fields(reader: gguf.GGUFReader, path: Path) -> dict[str, typing.Any]:
    """The file's metadata as a plain dict, key -> Python value (strings decoded, arrays as lists): what
    `HFTokenizer.from_gguf_fields` takes. The reader's own `GGUF.*` header entries are left out; a float32 value
    becomes its shortest decimal (rms eps 1e-05, not 9.999999747378752e-06: the same float32)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            out[key] = field.contents()
            if field.types == [gguf.GGUFValueType.FLOAT32]:
                out[key] = float(str(np.float32(out[key])))
        except (ValueError, IndexError) as e:  # a string that is not UTF-8, a malformed array
            raise UserError(f"{path}: metadata {key!r:.80} is unreadable ({type(e).__name__}: {str(e):.120})") from None
    return out


# ---- config -----------------------------------------------------------------------------------------------------

def model_config(fields: dict, tensors: dict, path: Path) -> ModelConfig:
    """Our ModelConfig from the `llama.*` metadata, via the config.json a LlamaForCausalLM would have."""
    def bad(why) -> typing.NoReturn:
        raise UserError(f"{path}: {why}")

    arch = fields.get("general.architecture")
    if arch != ARCHITECTURE:
        bad(f"general.architecture {arch!r:.60} is not supported; import-hf reads GGUF architecture "
            f"{ARCHITECTURE!r} (a dense Llama)")
    if fields.get("llama.expert_count"):
        bad(f"llama.expert_count is {fields['llama.expert_count']!r:.20}: mixture-of-experts GGUF files (Mixtral) "
            f"are not supported, only dense Llamas")
    scaling = fields.get("llama.rope.scaling.type", "none")
    if scaling != "none":
        bad(f"llama.rope.scaling.type {scaling!r:.40} is not supported (only unscaled RoPE, or Llama 3's "
            f"scaling as a rope_freqs tensor)")
    d = {"model_type": "llama", "architectures": [llama.ARCHITECTURE], "hidden_act": "silu",
         "tie_word_embeddings": "output.weight" not in tensors,  # (llama.cpp leaves a tied head out)
         "attention_bias": "blk.0.attn_q.bias" in tensors}
    for key, (theirs, required) in CONFIG_KEYS.items():
        value = fields.get(f"{ARCHITECTURE}.{key}")
        if value is None and required:
            bad(f"{ARCHITECTURE}.{key}: missing")
        if value is not None:
            d[theirs] = _number(value, f"{ARCHITECTURE}.{key}", float if theirs in ("rms_norm_eps", "rope_theta")
                                else int, bad)
    for key, theirs in TOKEN_IDS.items():
        if fields.get(key) is not None:
            d[theirs] = _number(fields[key], key, int, bad)
    d.setdefault("vocab_size", _vocab_size(fields, tensors))
    freqs = _rope_freqs(tensors, bad, path)
    if freqs is not None:
        d["rope_scaling"] = {"rope_type": "llama3", "factor": float(freqs.max()), **LLAMA3_ROPE}
    cfg = hf.model_config_from_hf(d, where=str(path))
    _check_rope(cfg, fields, freqs, bad)
    return cfg


def _rope_freqs(tensors: dict, bad, path: Path) -> torch.Tensor | None:
    """The rope_freqs tensor, if any, as a float32 vector (one divisor per rotary frequency: a few dozen)."""
    t = tensors.get(ROPE_FREQS)
    if t is None:
        return None
    if not 0 < t.n_elements <= 1 << 12:  # (read before the memory check: bounded here)
        bad(f"tensor {ROPE_FREQS} holds {t.n_elements} values, not one per rotary frequency")
    return dequantized(t, path).flatten()


def _number(value, key: str, kind: type, bad):
    """`value` if it is a number of `kind` (an int also passes as a float), else a one-line error naming `key`."""
    ok = (int, float) if kind is float else int
    if isinstance(value, bool) or not isinstance(value, ok):  # (a per-layer list: a model we cannot run)
        bad(f"{key}: expected {'a number' if kind is float else 'an integer'}, got {value!r:.60}")
    return value


def _vocab_size(fields: dict, tensors: dict) -> int | None:
    """llama.vocab_size is optional: else the token list's length, else the embedding's rows."""
    if isinstance(fields.get("tokenizer.ggml.tokens"), list):
        return len(fields["tokenizer.ggml.tokens"])
    embedding = tensors.get("token_embd.weight")
    return int(embedding.shape[-1]) if embedding is not None and len(embedding.shape) == 2 else None


def _check_rope(cfg: ModelConfig, fields: dict, freqs: torch.Tensor | None, bad) -> None:
    """Refuse a partial rotary embedding, values narrower than keys, or a rope_freqs tensor that is not the llama3
    scaling `model_config` read it as (compared as divisors of the unscaled frequencies, as llama.cpp stores them)."""
    key = f"{ARCHITECTURE}.rope.dimension_count"
    if fields.get(key, cfg.d_head) != cfg.d_head:
        bad(f"{key} {fields[key]!r:.20} differs from the head size {cfg.d_head}: partial RoPE is not supported")
    key = f"{ARCHITECTURE}.attention.value_length"
    if fields.get(key, cfg.d_head) != cfg.d_head:
        bad(f"{key} {fields[key]!r:.20} differs from the key length {cfg.d_head}: not supported")
    if freqs is None:
        return
    plain = rope_frequencies(dataclasses.replace(cfg, rope_type="default"))
    want = plain / rope_frequencies(cfg)
    if freqs.shape != want.shape or not torch.allclose(freqs, want, rtol=1e-4, atol=0):
        bad(f"tensor {ROPE_FREQS} is not Llama 3's RoPE scaling (factor {cfg.rope_factor:g}, low / high frequency "
            f"factors 1 / 4, original context 8192); other frequency scalings are not supported")


# ---- weights ----------------------------------------------------------------------------------------------------

def hf_name(name: str) -> str | None:
    """blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight; None for a name a dense Llama lacks."""
    stem, _, suffix = name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    if stem in TOP_TENSORS:
        return f"{TOP_TENSORS[stem]}.{suffix}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if m and m[2] in LAYER_TENSORS and str(int(m[1])) == m[1]:  # (blk.03 would alias blk.3)
        return f"model.layers.{m[1]}.{LAYER_TENSORS[m[2]]}.{suffix}"
    return None


def gguf_name(key: str) -> str:
    """Our state-dict key -> the GGUF tensor name it comes from (the inverse of hf_name + llama.from_hf_key)."""
    stem, _, suffix = llama.to_hf_key(key).rpartition(".")
    if stem in TOP_NAMES:
        return f"{TOP_NAMES[stem]}.{suffix}"
    _, _, n, module = stem.split(".", 3)  # model.layers.N.<module>
    return f"blk.{n}.{LAYER_NAMES[module]}.{suffix}"


def read_weights(tensors: dict, model: LlamaModel, path: Path) -> dict[str, torch.Tensor]:
    """Our float32 state dict from the file's tensors. Names, types and shapes are all checked before anything
    is dequantized; then each tensor must be finite."""
    ours = model.state_dict()
    found = {}  # our key -> GGUF tensor
    for name, t in tensors.items():
        if name == ROPE_FREQS:
            continue  # (read into the config)
        theirs = hf_name(name)
        key = llama.from_hf_key(theirs) if theirs else None
        if key not in ours:
            raise UserError(f"{path}: unexpected tensor {name!r:.80} (not part of a dense Llama with this metadata)")
        if t.tensor_type not in SUPPORTED_TYPES:
            raise UserError(f"{path}: tensor {name} has type {t.tensor_type.name}, which import cannot dequantize "
                            f"(supported: {', '.join(q.name for q in SUPPORTED_TYPES)})")
        shape = tuple(int(n) for n in reversed(t.shape))  # (GGUF lists the innermost dimension first)
        if shape != tuple(ours[key].shape):
            raise UserError(f"{path}: tensor {name} has shape {shape}, the metadata implies {tuple(ours[key].shape)}")
        found[key] = t
    tied = model.cfg.tie_word_embeddings  # (then the file has no output tensor; `ours` lists the head anyway)
    missing = [gguf_name(k) for k in ours if k not in found and not (tied and k == "lm_head.weight")]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{path}: missing tensor {missing[0]}{more}")
    sd = {key: dequantized(t, path) for key, t in found.items()}
    if tied:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    return sd


def dequantized(t, path: Path) -> torch.Tensor:
    """Tensor `t` of the reader as float32 in torch's dimension order, refused unless finite."""
    if t.tensor_type not in SUPPORTED_TYPES:
        raise UserError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which import cannot dequantize")
    values = gguf.quants.dequantize(t.data, t.tensor_type)  # numpy order already (F32: a view of the file)
    values = values.astype(np.float32, copy=not values.flags.writeable)
    if not np.isfinite(values).all():  # (numpy's check: several times faster than torch's on the CPU)
        raise UserError(f"{path}: tensor {t.name} has non-finite values (NaN or inf)")
    return torch.from_numpy(values).reshape(tuple(int(n) for n in reversed(t.shape)))


# ---- tokenizer --------------------------------------------------------------------------------------------------

def gguf_tokenizer(fields: dict, m: ModelConfig, path: Path) -> HFTokenizer | None:
    """The file's tokenizer rebuilt by `HFTokenizer.from_gguf_fields` (which refuses a model other than gpt2's
    byte-level BPE), or None when the file has none."""
    if "tokenizer.ggml.model" not in fields:
        return None
    try:
        tok = HFTokenizer.from_gguf_fields(fields)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    if tok.vocab_size > m.vocab_size:
        raise UserError(f"{path}: the tokenizer has {tok.vocab_size} tokens, more than the model's vocab_size "
                        f"{m.vocab_size}")
    return tok
