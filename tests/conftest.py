import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")       # tests never touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))
# train.threads=auto keeps a count the environment sets: the suite's runs, in this process and in the CLI processes
# it starts, compute with a fixed count (tests/test_threads.py takes it away to test auto)
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))


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


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A tiny Llama 4 pretrained for 20 steps on builtin:assistant (120 records) through the CLI: the --init of
    end-to-end tests of objectives, KTO and sweeps (read it only; copy it to change it)."""
    from pathlib import Path

    from llama4dpo.cli import main
    root = tmp_path_factory.mktemp("tiny_base")
    tiny = str(Path(__file__).parent.parent / "configs" / "tiny.toml")
    assert main(["pretrain", "--config", tiny, "--quiet", "--data", "builtin:assistant", "data.builtin_size=120",
                 "--out", str(root / "pre"), "train.max_steps=20"]) == 0
    return root / "pre"
