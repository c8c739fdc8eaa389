"""Shared helpers of the fuzz tests (tests/test_fuzz_*.py): hypothesis settings, the hang guard, the allowed
outcomes, scratch files, and the input strategies more than one area draws from.

The fuzz tests (issue 6, item 5) are property-based tests over every place user input enters: the config
parser, file paths, both tokenizers, the three preference formats, the chat template and `generate`. About
4,000 examples in ~30-40 s on 2 cores; LLAMA4DPO_FUZZ_SCALE=N multiplies them.

The only allowed outcomes are success or the project's documented one-line error (`UserError`, or its
subclass `ConfigError` for configs); any other exception is a traceback a user would see, and every example
runs under an alarm so a hang fails too. Successful results are checked as well.

Inputs that once crashed a reader are kept out of the property strategies (e.g. key names without newlines,
ints below 2**200, no empty parquet file) and each has its own deterministic test instead, named after the
input and the behaviour it must keep (`..._is_accepted_or_rejected_in_one_line`); each exclusion in the
strategies names that test.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import signal
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st

from llama4dpo.errors import UserError
from llama4dpo.tokenizer import BPETokenizer, CharTokenizer

HANG_SECONDS = 20  # one example of any fuzz test takes well under a second
# Multiplies every test's example count, e.g. LLAMA4DPO_FUZZ_SCALE=20 for a nightly or a local bug hunt.
SCALE = float(os.environ.get("LLAMA4DPO_FUZZ_SCALE", "1"))


def fuzz(n: int, *extra_checks):
    return settings(max_examples=max(1, round(n * SCALE)), deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, *extra_checks])


@contextlib.contextmanager
def no_hang(seconds: float = HANG_SECONDS):
    """Fail (instead of hanging the suite) if the body runs longer than `seconds`."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"hang: no result after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def assert_one_line(exc: BaseException, kind: type = UserError) -> None:
    """The documented error: a `kind` whose message is one non-empty line (the CLI prints `error: <msg>`)."""
    assert isinstance(exc, kind), f"expected {kind.__name__}, got {type(exc).__name__}: {exc}"
    msg = str(exc)
    assert msg.strip(), f"empty {type(exc).__name__} message"
    assert "\n" not in msg and "\r" not in msg, f"multi-line {type(exc).__name__}: {msg!r}"


def attempt(fn, *args, kind: type = UserError, **kwargs):
    """(result, None) on success, (None, error) on a one-line `kind`; any other exception propagates."""
    with no_hang():
        try:
            result = fn(*args, **kwargs)
        except kind as e:
            assert_one_line(e, kind)
            event(f"{fn.__name__}: {kind.__name__}")
            return None, e
    event(f"{fn.__name__}: success")
    return result, None


def expect_success_or_one_line(fn, *args, kind=UserError, **kwargs):
    """For the deterministic tests: the result on success, None on a one-line `kind`; anything else fails."""
    try:
        return fn(*args, **kwargs)
    except kind as e:
        assert_one_line(e, kind)


# ---------------------------------------------------------------------------------------------------------
# scratch files (hypothesis and function-scoped tmp_path do not mix)
# ---------------------------------------------------------------------------------------------------------

TMP = tempfile.TemporaryDirectory(prefix="llama4dpo-fuzz-")  # removed at interpreter exit
_COUNTER = itertools.count()


def tmp_path_for(suffix: str) -> Path:
    """A fresh file name per example."""
    return Path(TMP.name) / f"f{next(_COUNTER)}{suffix}"


def write(suffix: str, data: str | bytes) -> Path:
    """A fresh file holding `data` (str is written as UTF-8, lone surrogates kept as they are)."""
    path = tmp_path_for(suffix)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
    return path


# ---------------------------------------------------------------------------------------------------------
# the tokenizers the tests share (also drawn from by strategies, so a plain cached function, not a fixture;
# conftest's `tiny_tokenizer` fixture hands out this same function)
# ---------------------------------------------------------------------------------------------------------

CORPUS = ["Hello world! The answer is 7.", "\n\nHuman: What is 3 + 4?\n\nAssistant: The answer is 7.",
          "na\u00efve caf\u00e9 \u65e5\u672c\u8a9e \ufb01le \uff11\uff12 <bos> <eos> \t \U0001f600",
          "Reverse the word 'stone'. enots", "The capital of Peru is Lima."] * 20


@functools.lru_cache(maxsize=None)
def tokenizer(kind: str):
    """The "char" or "bpe" tokenizer trained on CORPUS; one object per kind, shared read-only."""
    return CharTokenizer.train(CORPUS) if kind == "char" else BPETokenizer.train(CORPUS, vocab_size=300)


# ---------------------------------------------------------------------------------------------------------
# strategies shared by several areas
# ---------------------------------------------------------------------------------------------------------


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """Like one_of, with weights (one_of flattens nested one_ofs, so each of their branches counts as one)."""
    return st.sampled_from([s for w, s in choices for _ in range(w)]).flatmap(lambda s: s)


# Text without line breaks, for names that end up inside error messages
# (see test_override_unknown_key_with_newline_is_accepted_or_rejected_in_one_line and the like).
NO_NL = st.characters(exclude_characters="\n\r", exclude_categories=["Cs"])
NAME_TEXT = st.text(NO_NL, max_size=10)

# Chat-template fragments that stress the turn markers, NFKC and line endings.
FRAGMENTS = ["\n\nHuman:", "\n\nAssistant:", "\n\nSystem:", "\nAssistant:", "\n\n\n", "\r\n", "\r\n\r\nHuman:",
             "Assistant:", " ", "\n", "\uff1a", "\uff21ssistant\uff1a", "\ufb01", "\uff11\uff12", "<bos>", "<eos>",
             "\u00e9", "e\u0301", "\U0001f600", "\t", "\u2028", "\x00", "\x85", ":"]
CONTENT = st.lists(st.one_of(st.text(max_size=6), st.sampled_from(FRAGMENTS)), max_size=6).map("".join)
WORDS = ["What is 3 + 4?", "The answer is 7.", "hi", "Hello", " ", "caf\u00e9", "Reverse 'stone'.", "Lima", "?", "7"]
PHRASE = st.lists(weighted((4, st.sampled_from(WORDS)), (1, st.text(max_size=6)), (1, st.sampled_from(FRAGMENTS))),
                  min_size=1, max_size=6).map("".join)  # mostly readable, rarely empty

# far beyond any config field's use, below float overflow
# (test_toml_float_field_with_int_too_big_for_float_is_accepted_or_rejected_in_one_line)
BIG = 2**200
# Arbitrary JSON-like values (the data a TOML/JSON file or a Python caller can hand to a reader).
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-BIG, BIG), st.floats(), st.text(max_size=8))
JSONISH = st.recursive(SCALARS, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(NAME_TEXT, c, max_size=3)),
                       max_leaves=6)

ROLES = ["user", "assistant", "system"]
# Field values: mostly text, sometimes missing in action. Unhashable roles and lone surrogates are kept out
# (test_conversational_record_with_list_role_is_accepted_or_rejected_in_one_line,
# test_lone_surrogate_in_{prompt,response}_is_accepted_or_rejected_in_one_line).
JUNK_VALUE = st.one_of(st.none(), st.integers(), st.floats(), st.booleans(), st.just(""), st.just("  \n"),
                       st.lists(st.integers(), max_size=2), st.dictionaries(NAME_TEXT, st.integers(), max_size=2))


@st.composite
def messages(draw, min_size=0, max_size=4, valid=None):
    """A list of chat messages; `valid=False` (or, when None, one draw in ten) allows junk roles and contents."""
    valid = draw(st.integers(0, 9)) > 0 if valid is None else valid
    role = st.sampled_from(ROLES) if valid else st.one_of(st.sampled_from(ROLES + ["bot", "User", ""]),
                                                          st.none(), st.integers())
    content = weighted((3, PHRASE), (1, CONTENT)) if valid else weighted((1, CONTENT), (1, JUNK_VALUE))
    out = []
    for _ in range(draw(st.integers(min_size, max_size))):
        m = {"role": draw(role), "content": draw(content)}
        if not valid and draw(st.integers(0, 5)) == 0:
            m.pop(draw(st.sampled_from(["role", "content"])))
        out.append(m)
    return out
