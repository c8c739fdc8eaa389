"""What the commands share: argument types that refuse bad numbers in argparse's one line, the config from
--config plus overrides, checkpoint arguments, and sampling settings."""

from __future__ import annotations

import argparse
import math

from ..checkpoint import load_model, load_tokenizer, resolve_checkpoint
from ..config import Config
from ..errors import UserError
from ..generate import Sampling
from ..runtime import resolve_device

SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed overflows above this


# Argument types: argparse rejects a bad number with its one-line usage error naming the flag, before any
# model is loaded (a batch size of -1 used to generate nothing and exit 0; a seed of 10**30, a traceback).
def _integer(text: str, lo: int, hi: int | None = None) -> int:
    text = text.strip()  # (int() ignores surrounding whitespace; the message must not carry a newline)
    try:
        n = int(text)
    except ValueError:  # not an integer ("1e23", "2.5"), or too many digits to convert
        raise argparse.ArgumentTypeError(f"expected an integer, got {text[:40]!r}") from None
    if n < lo or (hi is not None and n > hi):
        bound = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise argparse.ArgumentTypeError(f"must be {bound}, got {text[:40]}")
    return n


def positive_int(text: str) -> int:
    return _integer(text, 1)


def non_negative_int(text: str) -> int:
    return _integer(text, 0)


def seed(text: str) -> int:
    return _integer(text, 0, SEED_MAX)


def _finite(text: str) -> float:
    text = text.strip()
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text[:40]!r}") from None
    if not math.isfinite(x):  # nan, inf, 1e999
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text[:40]}")
    return x


def non_negative_float(text: str) -> float:
    x = _finite(text)
    if x < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text[:40]}")
    return x


def probability(text: str) -> float:
    """A nucleus mass: 0 < p <= 1."""
    x = _finite(text)
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text[:40]}")
    return x


def config_of(args) -> Config:
    """--config (a preset name or TOML file) with the dotted `section.key=value` overrides."""
    overrides = list(args.overrides)
    if getattr(args, "strict", False):
        overrides.append("data.strict=true")
    return Config.load(args.config, overrides)


def checkpoint_arg(path: str):
    """A CKPT argument: a checkpoint directory, or a run directory (its final/, else its latest checkpoint).
    Anything else is returned as given, so that loading it names what is wrong (no such directory, ...)."""
    try:
        return resolve_checkpoint(path)
    except UserError:
        return path


def model_and_tokenizer(path):
    """The checkpoint (or run directory) `path` loaded on the best device, with its tokenizer."""
    path = resolve_checkpoint(path)
    return load_model(path, resolve_device("auto")), load_tokenizer(path)


def sampling_of(args) -> Sampling:
    return Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed, stop=list(args.stop or [])).validate()


def add_sampling_args(s: argparse.ArgumentParser, max_new_tokens: int = 64) -> None:
    s.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens)
    s.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-k", type=non_negative_int, default=0, help="0 = no top-k filter (default)")
    s.add_argument("--top-p", type=probability, default=1.0, help="in (0, 1]; 1 = no nucleus filter (default)")
    s.add_argument("--seed", type=seed, default=None, help=f"0..{SEED_MAX}")
    s.add_argument("--stop", action="append", help="stop string (repeatable)")

