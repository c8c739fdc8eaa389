"""llama4dpo: a compact, faithful Llama 4 text (MoE) model with pretraining, SFT and DPO."""

__version__ = "0.1.0"

from .config import Config, ModelConfig  # noqa: E402
