"""ModelConfig: the Llama 4 (or dense Llama) architecture, with transformers' `Llama4TextConfig` field names,
its derived values (per-layer MoE and RoPE choices, widths) and its checks."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError


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
