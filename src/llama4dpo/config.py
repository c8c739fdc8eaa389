"""One typed config for everything: model architecture, data, training and the preference objective.

Model field names and meanings follow transformers' `Llama4TextConfig`, so a config translates 1:1
(see `interop/hf.py`). Presets are TOML files with one table per section:

    [model]
    hidden_size = 256
    [train]
    max_steps = 1000

and any field can be overridden from the command line with a dotted key: `model.num_local_experts=16`.
Unknown keys and impossible values are `ConfigError`s whose one-line message names the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .errors import ConfigError


@dataclass
class ModelConfig:
    vocab_size: int = 256
    hidden_size: int = 256                   # D, the residual width
    num_hidden_layers: int = 4
    num_attention_heads: int = 8             # H query heads
    num_key_value_heads: int | None = None   # K kv heads (GQA); None -> H
    head_dim: int | None = None              # None -> hidden_size // num_attention_heads
    intermediate_size: int | None = None     # width of each routed expert and of the shared expert; None -> see below
    intermediate_size_mlp: int | None = None  # width of the dense SwiGLU in non-MoE layers; None -> 2 * intermediate_size
    num_local_experts: int = 4               # E routed experts
    num_experts_per_tok: int = 1             # top-k
    interleave_moe_layer_step: int = 1       # 1: every layer MoE; 2: layers 1, 3, 5... MoE, the others dense
    moe_layers: list[int] | None = None      # explicit MoE layer indices (overrides the step)
    no_rope_layers: list[int] | None = None  # per layer, 1 = uses RoPE, 0 = NoPE (transformers' naming)
    no_rope_layer_interval: int = 4          # default no_rope_layers: every 4th layer (3, 7, ...) is NoPE
    attention_chunk_size: int | None = 8192  # RoPE layers attend within chunks of this many tokens; None -> full causal
    use_qk_norm: bool = True                 # weightless RMS norm of q and k on RoPE layers
    attn_temperature_tuning: bool = True     # position-dependent q scaling on NoPE layers
    floor_scale: int = 8192
    attn_scale: float = 0.1
    rope_theta: float = 500000.0
    rope_type: str = "default"               # "default" or "llama3" (frequency scaling, the fields below)
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    initializer_range: float = 0.02
    max_position_embeddings: int = 1024      # context length used by data preparation and generation
    router_aux_loss_coef: float = 0.0        # Switch-style load-balancing term; 0 keeps parity with transformers
    # "llama4", or "llama": a dense Llama (transformers' LlamaForCausalLM), exported as one - which needs every layer
    # dense and RoPE, without chunked attention, qk-norm or temperature tuning (checked in validate)
    family: str = "llama4"
    source: str | None = None                # where the weights came from: None if initialised here, else what
                                             # import-hf read ("LlamaForCausalLM from /path/to/folder")

    # ---- derived values ---------------------------------------------------------------------------
    @property
    def n_kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def d_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def expert_size(self) -> int:
        # Llama 4 Scout's ratio (8192 / 5120 = 1.6), rounded up to a multiple of 16.
        return self.intermediate_size or 16 * math.ceil(1.6 * self.hidden_size / 16)

    @property
    def dense_size(self) -> int:
        # Scout/Maverick: the dense MLP is twice as wide as an expert (16384 vs 8192).
        return self.intermediate_size_mlp or 2 * self.expert_size

    @property
    def moe_layer_ids(self) -> list[int]:
        if self.moe_layers is not None:
            return list(self.moe_layers)
        step = self.interleave_moe_layer_step
        return list(range(step - 1, self.num_hidden_layers, step))

    @property
    def rope_layer_flags(self) -> list[bool]:
        """Per layer: True if the layer uses RoPE (chunked attention, qk-norm), False for NoPE."""
        if self.no_rope_layers:
            return [bool(v) for v in self.no_rope_layers]
        n = self.no_rope_layer_interval
        return [(i + 1) % n != 0 for i in range(self.num_hidden_layers)]

    def is_moe_layer(self, i: int) -> bool:  # (per layer in O(1): building a deep model stays linear)
        if self.moe_layers is not None:
            return i in self.moe_layers
        return (i + 1) % self.interleave_moe_layer_step == 0

    def uses_rope(self, i: int) -> bool:
        """Layer i's entry of rope_layer_flags, without building the list."""
        if self.no_rope_layers:
            return bool(self.no_rope_layers[i])
        return (i + 1) % self.no_rope_layer_interval != 0

    def validate(self) -> None:
        def bad(key: str, why: str):
            raise ConfigError(f"model.{key}: {why}")

        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_local_experts", "num_experts_per_tok", "interleave_moe_layer_step",
                    "no_rope_layer_interval", "floor_scale", "max_position_embeddings"):
            if getattr(self, key) < 1:
                bad(key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("num_key_value_heads", "head_dim", "intermediate_size", "intermediate_size_mlp",
                    "attention_chunk_size"):
            v = getattr(self, key)
            if v is not None and v < 1:
                bad(key, f"must be >= 1 (or unset), got {v}")
        if self.num_attention_heads % self.n_kv_heads:
            bad("num_key_value_heads", f"num_attention_heads={self.num_attention_heads} is not divisible "
                                       f"by num_key_value_heads={self.n_kv_heads}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            bad("head_dim", f"unset, and hidden_size={self.hidden_size} is not divisible by "
                            f"num_attention_heads={self.num_attention_heads}; set it explicitly")
        if self.d_head % 2:
            bad("head_dim", f"must be even for rotary embeddings, got {self.d_head}")
        if self.num_experts_per_tok > self.num_local_experts:
            bad("num_experts_per_tok", f"top-k={self.num_experts_per_tok} exceeds "
                                       f"num_local_experts={self.num_local_experts}")
        if self.moe_layers is not None and any(not 0 <= i < self.num_hidden_layers for i in self.moe_layers):
            bad("moe_layers", f"indices must lie in [0, {self.num_hidden_layers}), got {self.moe_layers}")
        if self.no_rope_layers and len(self.no_rope_layers) != self.num_hidden_layers:
            bad("no_rope_layers", f"needs one entry per layer ({self.num_hidden_layers}), "
                                  f"got {len(self.no_rope_layers)}")
        if self.rope_type not in ("default", "llama3"):
            bad("rope_type", f"must be 'default' or 'llama3', got {self.rope_type!r}")
        if not 0.0 <= self.attention_dropout < 1.0:
            bad("attention_dropout", f"must be in [0, 1), got {self.attention_dropout}")
        if self.rms_norm_eps <= 0:
            bad("rms_norm_eps", f"must be > 0, got {self.rms_norm_eps}")
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            v = getattr(self, key)
            if v is not None and not 0 <= v < self.vocab_size:
                bad(key, f"must lie in [0, vocab_size={self.vocab_size}), got {v}")
        if self.family not in ("llama4", "llama"):
            bad("family", f"must be 'llama4' or 'llama', got {self.family!r:.60}")
        if self.family == "llama":
            for key, ok, needed in self._dense_llama_checks():
                if not ok:
                    bad(key, f"family 'llama' (a dense Llama) needs {needed}, got {getattr(self, key)!r:.80}")

    def _dense_llama_checks(self) -> list[tuple[str, bool, str]]:
        """(field, whether it fits, what fits) for each Llama 4 feature that LlamaForCausalLM lacks."""
        all_rope = bool(self.no_rope_layers) and all(self.no_rope_layers)  # (only a list of 1s rules NoPE out)
        return [("moe_layers", self.moe_layers == [], "[] (no MoE layer)"),
                ("no_rope_layers", all_rope, "a 1 (RoPE) for every layer"),
                ("attention_chunk_size", self.attention_chunk_size is None, "none (full causal attention)"),
                ("use_qk_norm", not self.use_qk_norm, "false"),
                ("attn_temperature_tuning", not self.attn_temperature_tuning, "false")]


@dataclass
class DataConfig:
    tokenizer: str = "char"          # "char" or "bpe"
    bpe_vocab_size: int = 1024
    format: str = "auto"             # preference format: auto | explicit | hh | conversational
    split: str = "train"
    max_samples: int | None = None
    eval_fraction: float = 0.05      # held-out share of the preference/SFT set (deterministic)
    eval_samples: int | None = None  # or an exact held-out count
    max_length: int = 512            # prompt + response tokens (TRL's name)
    max_prompt_length: int = 256     # prompt tokens kept (from the end) before responses are cut
    block_size: int = 256            # pretraining window
    strict: bool = False             # first bad record is an error instead of a counted skip
    num_proc: int = 1                # datasets.map workers for tokenisation
    builtin_size: int = 4000         # number of prompts generated for `builtin:` sources
    pad_to_multiple_of: int | None = None  # batch lengths rounded up to a multiple: fewer shapes to compile/record
    seed: int = 0

    def validate(self) -> None:
        if self.tokenizer not in ("char", "bpe"):
            raise ConfigError(f"data.tokenizer: must be 'char' or 'bpe', got {self.tokenizer!r}")
        if self.format not in ("auto", "explicit", "hh", "conversational"):
            raise ConfigError(f"data.format: must be auto|explicit|hh|conversational, got {self.format!r}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction: must be in [0, 1), got {self.eval_fraction}")
        for key in ("max_length", "max_prompt_length", "block_size", "bpe_vocab_size", "num_proc"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key}: must be >= 1, got {getattr(self, key)}")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ConfigError(f"data.pad_to_multiple_of: must be >= 1, got {self.pad_to_multiple_of}")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(f"data.max_prompt_length: must be < data.max_length={self.max_length}, "
                              f"got {self.max_prompt_length}")


# torch.compile's modes; the two with CUDA graphs record each compiled graph once per shape and replay it (on CUDA)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 8              # sequences (or pairs) per optimizer step, over all processes
    grad_accum_steps: int = 1        # micro-batches per optimizer step (batch_size is split across them)
    lr: float = 3e-4
    min_lr_ratio: float = 0.1        # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0           # max global grad norm; 0 disables
    precision: str = "fp32"          # "fp32" or "bf16" (autocast, fp32 master weights)
    device: str = "auto"             # "auto", "cpu", "cuda", "cuda:1", ...
    seed: int = 1337
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 500
    keep_last: int = 2
    log_every: int = 10
    compile: bool = False            # torch.compile the model (per block under FSDP2); CPU bf16 DPO step +23%
    compile_mode: str = "default"    # torch.compile's mode; "reduce-overhead": the compiled graphs as CUDA graphs
    activation_memory_budget: float = 1.0  # with compile, < 1 recomputes activations in backward to save memory
    tensorboard: bool = False

    def validate(self) -> None:
        for key in ("max_steps", "batch_size", "grad_accum_steps", "eval_every", "eval_batches",
                    "save_every", "keep_last", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}: must be >= 1, got {getattr(self, key)}")
        if self.batch_size % self.grad_accum_steps:
            raise ConfigError(f"train.grad_accum_steps: batch_size={self.batch_size} is not divisible "
                              f"by grad_accum_steps={self.grad_accum_steps}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr: must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"train.precision: must be 'fp32' or 'bf16', got {self.precision!r}")
        if not 0.0 <= self.activation_memory_budget <= 1.0:
            raise ConfigError(f"train.activation_memory_budget: must be in [0, 1], got {self.activation_memory_budget}")
        if self.activation_memory_budget < 1.0 and not self.compile:
            raise ConfigError("train.activation_memory_budget < 1 acts through torch.compile: set train.compile=true")
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"train.compile_mode: must be one of {', '.join(COMPILE_MODES)}; got {self.compile_mode!r}")
        if self.compile_mode != "default" and not self.compile:
            raise ConfigError(f"train.compile_mode={self.compile_mode!r} acts through torch.compile: "
                              "set train.compile=true")
        if self.compile_mode in CUDA_GRAPH_MODES and self.grad_accum_steps > 1:
            # a micro-batch's gradients, held as a CUDA graph's outputs, are overwritten by the next one's backward
            raise ConfigError(f"train.compile_mode={self.compile_mode!r} (CUDA graphs) loses gradients accumulated "
                              "over micro-batches (pytorch/pytorch#169545): set train.grad_accum_steps=1")


@dataclass
class DPOConfig:
    loss_type: str = "sigmoid"       # sigmoid (DPO/cDPO) | robust | ipo | hinge | simpo
    beta: float = 0.1                # the notebook's "gamma" for DPO is this beta
    label_smoothing: float = 0.0     # cDPO / rDPO label-noise rate
    gamma: float = 0.0               # SimPO target margin only
    sft_weight: float = 0.0          # RPO-style NLL term on the chosen response
    precompute_ref: bool = False     # reference log-probs computed once, cached; no reference model in memory
    share_prompt: bool = True        # one row [prompt | chosen | rejected] per pair: the prompt computed once

    def validate(self) -> None:
        if self.loss_type not in ("sigmoid", "robust", "ipo", "hinge", "simpo"):
            raise ConfigError(f"dpo.loss_type: must be sigmoid|robust|ipo|hinge|simpo, got {self.loss_type!r}")
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta: must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")


@dataclass
class DistributedConfig:
    """Used only under torchrun (WORLD_SIZE > 1); a single process ignores it."""
    strategy: str = "ddp"            # "ddp" (replicas) or "fsdp" (FSDP2 fully_shard per block)

    def validate(self) -> None:
        if self.strategy not in ("ddp", "fsdp"):
            raise ConfigError(f"distributed.strategy: must be 'ddp' or 'fsdp', got {self.strategy!r}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def validate(self) -> "Config":
        for section in (self.model, self.data, self.train, self.dpo, self.distributed):
            section.validate()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, *, where: str = "config") -> "Config":
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: a config must be a table/object of sections, got {type(d).__name__}")
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        kwargs = {}
        for name, value in d.items():
            if name not in sections:
                raise ConfigError(f"{where}: unknown section {name!r} (valid: {', '.join(sections)})")
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: [{name}] must be a table")
            kwargs[name] = _section_from_dict(_SECTION_TYPES[name], value, name)
        return cls(**kwargs).validate()

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] = ()) -> "Config":
        """Read a TOML preset (or the defaults when `path` is None) and apply dotted overrides."""
        d: dict = {}
        if path is not None:
            path = resolve_preset(path)
            if not _is_file(path):
                raise ConfigError(f"config file not found: {path}")
            try:
                d = tomllib.loads(path.read_text(encoding="utf-8"))
            except (ValueError, RecursionError, OSError) as e:  # TOMLDecodeError, bad UTF-8, absurd nesting
                raise ConfigError(f"{path}: not valid TOML ({type(e).__name__}: {e})") from None
        return cls.from_dict(_with_overrides(d, overrides), where=str(path) if path else "config")

    def with_overrides(self, overrides: list[str]) -> "Config":
        return Config.from_dict(_with_overrides(self.to_dict(), overrides)) if overrides else self

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load_json(cls, path: str | Path) -> "Config":
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise ConfigError(f"{path}: cannot read config ({e})") from None
        return cls.from_dict(d, where=str(path))


PRESETS = Path(__file__).resolve().parent / "configs"


def resolve_preset(path: str | Path) -> Path:
    """A file path, or the name of a shipped preset ("tiny", "demo", "llama4-100m")."""
    path = Path(path)
    if not _is_file(path) and path.parent == Path(".") and _is_file(PRESETS / f"{path.stem}.toml"):
        return PRESETS / f"{path.stem}.toml"
    return path


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long for the filesystem, a NUL byte
        return False


_SECTION_TYPES = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "dpo": DPOConfig,
                  "distributed": DistributedConfig}


class _RAW(str):
    """A value typed on the command line: parsed against the target field's type."""


def _with_overrides(d: dict, overrides: list[str]) -> dict:
    for item in overrides:
        key, value = parse_override(item)
        section, _, name = key.partition(".")
        d.setdefault(section, {})
        if not isinstance(d[section], dict):
            raise ConfigError(f"override {item!r}: {section!r} is not a section")
        d[section][name] = _RAW(value)  # parsed against the field's type in from_dict
    return d


def parse_override(item: str) -> tuple[str, str]:
    key, eq, value = item.partition("=")
    key = key.strip()
    if not eq or "." not in key or not key.split(".", 1)[1]:
        raise ConfigError(f"override {item!r}: expected section.key=value, e.g. model.num_local_experts=16")
    return key, value.strip()


def _section_from_dict(cls, d: dict, section: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in d.items():
        if key not in hints:
            raise ConfigError(f"unknown key {section}.{key} (valid keys: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    return cls(**kwargs)


def _coerce(value, tp, key: str):
    """Check (TOML) or parse (command line) `value` against the annotation `tp`."""
    raw = isinstance(value, _RAW)
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None or (raw and value.lower() in ("none", "null", "")):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is list:
        (elem,) = args
        if raw:
            text = value.strip()
            try:
                value = json.loads(text) if text.startswith("[") else [v for v in text.split(",") if v.strip()]
            except (ValueError, RecursionError):
                raise ConfigError(f"{key}: expected a list like [1,2,3], got {text!r}") from None
            if not isinstance(value, list):
                raise ConfigError(f"{key}: expected a list, got {text!r}")
            value = [_RAW(str(v)) if not isinstance(v, str) else _RAW(v) for v in value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, elem, key) for v in value]
    if tp is bool:
        if raw:
            low = value.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
        elif isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        v = value
        if raw:
            try:
                v = int(value)
            except ValueError:
                raise ConfigError(f"{key}: expected an integer, got {str(value)[:40]!r}") from None
        if not isinstance(v, int) or isinstance(v, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}"[:200])
        if abs(v) >= 2 ** 63:
            raise ConfigError(f"{key}: integer out of range")
        return v
    if tp is float:
        try:
            if raw:
                v = float(value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                v = float(value)
            else:
                raise TypeError
        except (ValueError, OverflowError):
            raise ConfigError(f"{key}: expected a finite number, got {str(value)[:40]!r}") from None
        except TypeError:
            raise ConfigError(f"{key}: expected a number, got {value!r}"[:200]) from None
        if not math.isfinite(v):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return v
    if tp is str:
        if isinstance(value, str):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config field type {tp} for {key}")  # a bug in this file, not user input
