import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")       # tests never touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Factories shared across test files. Each is session-scoped (hypothesis tests may use them) and hands out
# either a fresh object per call or, for tokenizers, an object nothing mutates, so tests cannot see each
# other's state.


@pytest.fixture(scope="session")
def tiny_config():
    """tiny_config(overrides=()) -> a fresh `Config.load("tiny", overrides)` (a new object on every call)."""
    from llama4dpo.config import Config

    def make(overrides=()):
        return Config.load("tiny", list(overrides))

    return make


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """tiny_tokenizer("char" | "bpe") -> that tokenizer trained on a small corpus of chat turns, NFKC forms,
    emoji and special-token look-alikes (tests/_fuzz.py: CORPUS; BPE: 300 tokens). One object per kind for
    the whole session: use it read-only."""
    from _fuzz import tokenizer

    return tokenizer


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    """tiny_model(tok, overrides=()) -> a fresh untrained (seed 0) tiny `LlamaModel` in eval mode, its
    vocab_size set to `tok.vocab_size` (a new model on every call: cache it yourself if you only read it)."""
    from llama4dpo.model import LlamaModel

    def make(tok, overrides=()):
        cfg = tiny_config([f"model.vocab_size={tok.vocab_size}", *overrides])
        return LlamaModel(cfg.model).init_weights(seed=0).eval()

    return make
