"""The other config sections: data preparation, training (optimizer, precision, torch.compile), the
preference objective and the distributed strategy, each with its checks."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError


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
    unpair: bool = False             # KTO on pairs: each gives a desirable (chosen) and an undesirable example
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
    threads: int | str = "auto"      # CPU threads: a count, or "auto" - the cores other processes leave free

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
        if self.threads != "auto" and not (isinstance(self.threads, int) and self.threads >= 1):
            raise ConfigError(f"train.threads: must be 'auto' or a count >= 1, got {self.threads!r}")
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


# TRL's DPO loss_type names (and SimPO, ORPO); losses.py has each one's equation and paper
LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge", "simpo", "orpo", "sigmoid_norm", "exo_pair", "nca_pair", "bco_pair",
              "sppo_hard", "apo_zero", "apo_down", "aot", "kto")


@dataclass
class DPOConfig:
    loss_type: str = "sigmoid"       # sigmoid (DPO/cDPO) | robust | ipo | hinge | simpo | orpo | ... (LOSS_TYPES)
    beta: float = 0.1                # the notebook's "gamma" for DPO is this beta; ORPO's lambda
    label_smoothing: float = 0.0     # cDPO / rDPO label-noise rate; EXO's epsilon (> 0)
    gamma: float = 0.0               # SimPO target margin only
    sft_weight: float = 0.0          # RPO-style NLL term on the chosen response (ORPO has weight 1 built in)
    precompute_ref: bool = False     # reference log-probs computed once, cached; no reference model in memory
    share_prompt: bool = True        # one row [prompt | chosen | rejected] per pair: the prompt computed once
    desirable_weight: float = 1.0    # KTO's lambda_D and lambda_U
    undesirable_weight: float = 1.0

    def validate(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"dpo.loss_type: must be one of {', '.join(LOSS_TYPES)}; got {self.loss_type!r}")
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta: must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        for key in ("desirable_weight", "undesirable_weight"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"dpo.{key}: must be > 0, got {getattr(self, key)}")
        if self.loss_type == "exo_pair" and self.label_smoothing == 0:
            raise ConfigError("dpo.loss_type=exo_pair needs dpo.label_smoothing > 0 (EXO's epsilon, e.g. 1e-3)")


LORA_TARGETS = ("attention", "mlp", "shared_expert", "experts")


@dataclass
class LoRAConfig:
    """Low-rank adapters (model/lora.py) for sft and dpo; rank 0 trains every weight instead."""
    rank: int = 0                    # 0: full fine-tuning; 8 or 16 is usual
    alpha: float = 16.0              # updates scaled by alpha / rank
    dropout: float = 0.0             # on the adapters' input (linear layers; not the routed experts)
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # attention, mlp, shared_expert, experts
    train_router: bool = False       # the MoE routers train too (in full), saved with the adapters
    base_dtype: str = "auto"         # the frozen base matrices' dtype: "auto" = bf16 under train.precision=bf16
                                     # (the products autocast computes anyway, less memory, no casts), else fp32

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def validate(self) -> None:
        if self.rank < 0:
            raise ConfigError(f"lora.rank: must be >= 0 (0 trains every weight), got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha: must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or (self.enabled and not self.targets and not self.train_router):
            raise ConfigError(f"lora.targets: each one of {', '.join(LORA_TARGETS)} (at least one), "
                              f"got {self.targets}")
        if self.base_dtype not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"lora.base_dtype: must be 'auto', 'fp32' or 'bf16', got {self.base_dtype!r}")

    def bf16_base(self, precision: str) -> bool:
        """Whether the frozen base is held in bf16 under train.precision `precision`."""
        return self.base_dtype == "bf16" or (self.base_dtype == "auto" and precision == "bf16")


@dataclass
class DistributedConfig:
    """Used only under torchrun (WORLD_SIZE > 1); a single process ignores it."""
    strategy: str = "ddp"            # "ddp" (replicas) or "fsdp" (FSDP2 fully_shard per block)

    def validate(self) -> None:
        if self.strategy not in ("ddp", "fsdp"):
            raise ConfigError(f"distributed.strategy: must be 'ddp' or 'fsdp', got {self.strategy!r}")
