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

from .coerce import _coerce  # noqa: F401 (interop/hf.py imports it from here)
from .load import PRESETS, Config, parse_override, resolve_preset
from .model import ModelConfig
from .sections import (COMPILE_MODES, CUDA_GRAPH_MODES, DataConfig, DistributedConfig, DPOConfig, LORA_TARGETS,
                       LoRAConfig, TrainConfig)

__all__ = ["Config", "ModelConfig", "DataConfig", "TrainConfig", "DPOConfig", "DistributedConfig", "LoRAConfig", "LORA_TARGETS",
           "COMPILE_MODES",
           "CUDA_GRAPH_MODES", "PRESETS", "resolve_preset", "parse_override"]
