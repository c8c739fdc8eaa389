"""Llama 4 text model components, named as in the original notebook."""

from .attention import Attention
from .cache import KVCache
from .moe import MoE, ExpertMLP, FeedForward
from .norm import RMSNorm
from .rope import RotaryPositionalEmbedding
from .transformer import LlamaModel, TransformerBlock

__all__ = ["Attention", "KVCache", "MoE", "ExpertMLP", "FeedForward", "RMSNorm",
           "RotaryPositionalEmbedding", "LlamaModel", "TransformerBlock"]
