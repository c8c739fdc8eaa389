"""Fuzzed `generate`: arbitrary prompt strings and sampling settings on an untrained tiny model.

Protects: `generate` fails with a one-line `UserError` exactly when the request is invalid (max_new_tokens
< 1, a non-finite or negative temperature, a negative top_k, top_p outside (0, 1], or a prompt that does not
fit the context), and otherwise returns one string per prompt with no stop string in it, with or without
the KV cache. NaN, infinite and vanishing temperatures or top_p give greedy decoding or the one-line error,
never a crash. Shared helpers: tests/_fuzz.py; fixtures: tests/conftest.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llama4dpo.generate import Sampling, generate

from _fuzz import CONTENT, PHRASE, attempt, expect_success_or_one_line, fuzz, weighted


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The tiny model is ~10x faster on one thread than on two contended ones (a shared 2-core CI box)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def models(tiny_tokenizer, tiny_model):
    """One untrained tiny model per tokenizer kind, shared read-only by this module's tests (nothing trains)."""
    return {kind: tiny_model(tiny_tokenizer(kind)) for kind in ("char", "bpe")}


PROMPT = weighted((2, CONTENT), (2, PHRASE), (1, st.text(max_size=30)),
                  (1, st.tuples(st.text(min_size=1, max_size=8), st.integers(5, 40)).map(lambda t: t[0] * t[1])))
# Includes NaN, inf and vanishing temperatures and top_p (see the deterministic tests below): errors or greedy,
# never a crash.
TEMPERATURE = weighted((2, st.just(0.0)), (3, st.floats(1e-3, 5.0)), (1, st.floats(1e-60, 1e-3)),
                       (1, st.just(math.inf)), (1, st.just(math.nan)), (1, st.floats(-10, -1e-12)))
TOP_P = weighted((3, st.just(1.0)), (4, st.floats(1e-60, 1.0)), (1, st.floats()), (1, st.floats(-1.0, 2.0)))


@fuzz(400)
@given(kind=st.sampled_from(["char", "bpe"]), prompts=st.lists(PROMPT, min_size=1, max_size=3),
       max_new_tokens=weighted((6, st.integers(1, 4)), (1, st.integers(-1, 0))), temperature=TEMPERATURE,
       top_k=weighted((3, st.just(0)), (3, st.integers(1, 400)), (1, st.integers(-2, -1))), top_p=TOP_P,
       seed=st.one_of(st.none(), st.integers(0, 2**32)), stop=st.lists(st.text(max_size=3), max_size=2),
       use_cache=st.integers(0, 7).map(bool))
def test_fuzz_generate(tiny_tokenizer, models, kind, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop,
                       use_cache):
    tok, model = tiny_tokenizer(kind), models[kind]
    s = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop)
    out, err = attempt(generate, model, tok, prompts, s, use_cache=use_cache)
    valid = max_new_tokens >= 1 and math.isfinite(temperature) and temperature >= 0 and top_k >= 0 and 0 < top_p <= 1
    fits = max(len(tok.encode(p, bos=True)) for p in prompts) + max_new_tokens <= model.cfg.max_position_embeddings
    assert (err is None) == (valid and fits), f"unexpected outcome: {err!r}"
    if out is not None:
        assert len(out) == len(prompts) and all(isinstance(t, str) for t in out)
        assert not any(x and x in t for x in stop for t in out)


# ---------------------------------------------------------------------------------------------------------
# deterministic sampling settings that once crashed `generate`: success or a one-line UserError
# ---------------------------------------------------------------------------------------------------------


def test_generate_with_nan_temperature_succeeds_or_is_rejected_in_one_line(tiny_tokenizer, models):
    s = Sampling(max_new_tokens=2, temperature=math.nan, seed=0)
    expect_success_or_one_line(generate, models["char"], tiny_tokenizer("char"), ["Hi"], s)


def test_generate_with_vanishing_temperature_succeeds_or_is_rejected_in_one_line(tiny_tokenizer, models):
    s = Sampling(max_new_tokens=2, temperature=1e-40, seed=0)
    expect_success_or_one_line(generate, models["char"], tiny_tokenizer("char"), ["Hi"], s)


def test_generate_with_vanishing_top_p_succeeds_or_is_rejected_in_one_line(tiny_tokenizer, models):
    s = Sampling(max_new_tokens=2, temperature=1.0, top_p=1e-50, seed=0)
    expect_success_or_one_line(generate, models["char"], tiny_tokenizer("char"), ["Hi"], s)
