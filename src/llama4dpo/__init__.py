"""llama4dpo: a compact, faithful Llama 4 text (MoE) model with pretraining, SFT and DPO."""

__version__ = "0.1.0"

from .checkpoint import load_model, load_tokenizer, save_model  # noqa: E402
from .config import Config, ModelConfig  # noqa: E402
from .model import LlamaModel  # noqa: E402

__all__ = ["Config", "ModelConfig", "LlamaModel", "load_model", "load_tokenizer", "save_model"]
