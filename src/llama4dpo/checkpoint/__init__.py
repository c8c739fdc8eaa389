"""Everything a run keeps on disk, and how a path becomes a checkpoint.

    files.py    atomic directory writes, manifest.json (sizes and SHA-256), write errors as one line
    model.py    a model checkpoint: config.json + model.safetensors (+ tokenizer.json); save, load, verify
    state.py    a training checkpoint: a model checkpoint plus optimizer, RNG and loop state; resume
    run_dir.py  run directories (fresh, resumed or refused; the lock; --overwrite) and `resolve_checkpoint`:
                a checkpoint directory, or a run directory's final/ or latest checkpoint
"""

from .files import (CONFIG, MANIFEST, MODEL_FILES, TOKENIZER, WEIGHTS, WRITE_ERRORS, WriteError, atomic_dir,
                    read_json, refuse_symlinks, verify_manifest, write_error_cause, write_manifest)
from .model import (ALLOW_NONFINITE, NonFiniteError, check_finite, has_tokenizer, load_config, load_model,
                    load_tokenizer, load_weights, model_state_dict, read_weights, save_model, write_model_files)
from .run_dir import resolve_checkpoint
from .state import checkpoint_dirs

__all__ = ["ALLOW_NONFINITE", "CONFIG", "MANIFEST", "MODEL_FILES", "TOKENIZER", "WEIGHTS", "WRITE_ERRORS",
           "NonFiniteError", "WriteError", "atomic_dir", "check_finite", "checkpoint_dirs", "has_tokenizer",
           "load_config", "load_model", "load_tokenizer", "load_weights", "model_state_dict", "read_json",
           "read_weights", "refuse_symlinks", "resolve_checkpoint", "save_model", "verify_manifest",
           "write_error_cause", "write_manifest", "write_model_files"]
