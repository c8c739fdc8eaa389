"""Built-in task `builtin:assistant`: a tiny assistant whose answers a program can check, plus a style to prefer.

The task. A user asks one short question (<= 40 characters) of 8 skills, each phrased 3 ways:

    add       What is 3 + 4? | Compute 3 plus 4. | Add 3 and 4.                                   -> 7
    sub       What is 9 - 2? | Compute 9 minus 2. | Subtract 2 from 9.                             -> 7
    reverse   Reverse the word lamp. | Spell lamp backwards. | What is lamp reversed?            -> pmal
    upper     Uppercase the word frog. | Write frog in capitals. | What is frog in upper case?    -> FROG
    length    How many letters are in frog? | Count the letters in frog. | ...                    -> 4
    next      What letter comes after c? | Which letter follows c? | Name the letter after c.      -> d
    capital   What is the capital of Peru? | Name the capital of Peru. | ...                       -> Lima
    opposite  What is the opposite of hot? | Name the opposite of hot. | Give the antonym of hot.  -> cold

and the assistant answers in one line (<= 40 characters), e.g. " The answer is 7." or " Um, maybe 8?".
Prompts are rendered with the chat template: "\\n\\nHuman: What is 3 + 4?\\n\\nAssistant:".

The reward: score(prompt, response) = 0.5 * correct + 0.5 * style, so 0, 0.5 or 1.
    correct  the response names exactly the right answer: once filler words ("The", "answer", "is", "Um",
             "maybe", "I", ...) are dropped, its only word is the answer (case-sensitive: "FROG", not "frog";
             "i" is the letter after "h", "I" is filler).
    style    the response is exactly "The answer is X." (concise, no hedging, ends with a period).
The question is parsed back out of the prompt text, so `score` rates anything a model generates, garbage
included, and never raises.

The data, a deterministic function of (seed, size):
    (a) corpus: `size` transcripts over the training prompts; 50% in the preferred style, 50% hedged
        (" Um, maybe 7?", " I think it is 7, not sure.", ...); 70% correct, 30% wrong: mean score 0.6.
    (b) pairs: `size` pairs on training prompts. chosen is correct and in style (score 1); rejected is
        hedged, wrong, or both (0.5, 0.5 or 0), so chosen always scores strictly higher.
    (c) held-out prompts: for about a third of the facts one of the three phrasings never appears in (a)
        or (b); the fact is still taught by the other two. `heldout_pairs` holds one pair per held-out prompt.

Why DPO has room to improve: a reference model trained on (a) imitates it: it hedges about half the time
and is wrong at least 30% of the time, so it scores ~0.5-0.6 on held-out prompts. The style is the same
for every question, so DPO on (b) learns it reliably (+0.25 once always in style), and pairs whose rejected
answer is wrong move probability toward the answers the model already knows.
"""

from __future__ import annotations

import functools
import random
import re
import sys
from dataclasses import dataclass, field
from typing import Callable

from .. import resources
from ..errors import UserError
from .chat import render_prompt

TEMPLATES = {
    "add": ("What is {a} + {b}?", "Compute {a} plus {b}.", "Add {a} and {b}."),
    "sub": ("What is {a} - {b}?", "Compute {a} minus {b}.", "Subtract {b} from {a}."),
    "reverse": ("Reverse the word {w}.", "Spell {w} backwards.", "What is {w} reversed?"),
    "upper": ("Uppercase the word {w}.", "Write {w} in capitals.", "What is {w} in upper case?"),
    "length": ("How many letters are in {w}?", "Count the letters in {w}.", "What is the length of {w}?"),
    "next": ("What letter comes after {w}?", "Which letter follows {w}?", "Name the letter after {w}."),
    "capital": ("What is the capital of {w}?", "Name the capital of {w}.", "Which city is the capital of {w}?"),
    "opposite": ("What is the opposite of {w}?", "Name the opposite of {w}.", "Give the antonym of {w}."),
}
WORDS = ("cat", "dog", "sun", "lamp", "frog", "milk", "tree", "bird", "fish", "moon",
         "star", "rain", "book", "door", "cake", "ship", "wolf", "corn", "desk", "rose")
CAPITALS = {"Peru": "Lima", "France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
            "Egypt": "Cairo", "Kenya": "Nairobi", "Chile": "Santiago", "Cuba": "Havana", "Greece": "Athens",
            "Norway": "Oslo", "Poland": "Warsaw", "Germany": "Berlin", "Ireland": "Dublin",
            "Austria": "Vienna", "Portugal": "Lisbon"}
_PAIRS = [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("old", "new"), ("wet", "dry"),
          ("dark", "light"), ("open", "closed"), ("full", "empty"), ("hard", "soft"), ("high", "low"),
          ("left", "right"), ("early", "late"), ("rich", "poor"), ("loud", "quiet"), ("happy", "sad")]
OPPOSITES = {**dict(_PAIRS), **{b: a for a, b in _PAIRS}}

FACTS = {  # skill -> every argument tuple a question can be asked about
    "add": [(a, b) for a in range(10) for b in range(10)],
    "sub": [(a, b) for a in range(10) for b in range(a + 1)],
    "reverse": [(w,) for w in WORDS], "upper": [(w,) for w in WORDS], "length": [(w,) for w in WORDS],
    "next": [(c,) for c in "abcdefghijklmnopqrstuvwxy"],
    "capital": [(w,) for w in CAPITALS], "opposite": [(w,) for w in OPPOSITES],
}
ANSWER: dict[str, Callable[..., str | None]] = {
    "add": lambda a, b: str(int(a) + int(b)),
    "sub": lambda a, b: str(int(a) - int(b)),
    "reverse": lambda w: w[::-1],
    "upper": lambda w: w.upper(),
    "length": lambda w: str(len(w)),
    "next": lambda w: chr(ord(w) + 1) if len(w) == 1 and "a" <= w < "z" else None,
    "capital": lambda w: CAPITALS.get(w),
    "opposite": lambda w: OPPOSITES.get(w),
}

GOOD = " The answer is {x}."
HEDGED = (" Um, maybe {x}?", " I think it is {x}, not sure.", " Hmm... {x} I guess.", " Well, probably {x}!")
FILLER = frozenset("The the answer is Um um maybe I think it not sure Hmm hmm guess Well well probably".split())
_STYLE = re.compile(r"The answer is [A-Za-z0-9]+\.")
_WORD = re.compile(r"[A-Za-z0-9]+")


def _template_regex(template: str) -> re.Pattern:
    groups = {"{a}": r"(?P<a>\d{1,3})", "{b}": r"(?P<b>\d{1,3})", "{w}": r"(?P<w>[A-Za-z]{1,20})"}
    parts = re.split(r"(\{[abw]\})", template)
    return re.compile("".join(groups.get(p, re.escape(p)) for p in parts))


_PARSERS = [(skill, _template_regex(t)) for skill, ts in TEMPLATES.items() for t in ts]


def question_of(prompt: str) -> str:
    """The last user turn of a rendered prompt (or the text itself when it has no turn markers)."""
    return prompt.rsplit("Human:", 1)[-1].split("\n\nAssistant:", 1)[0].strip()


def answer(prompt: str) -> str | None:
    """The right answer to the question in `prompt`, or None when it is not one of the task's questions."""
    q = question_of(str(prompt))
    for skill, regex in _PARSERS:
        m = regex.fullmatch(q)
        if m:
            return ANSWER[skill](**m.groupdict())  # by name: "Subtract {b} from {a}"
    return None


def score(prompt: str, response: str) -> float:
    """Ground-truth reward in [0, 1]: 0.5 * correct + 0.5 * style (see the module docstring)."""
    response = str(response)
    right = answer(prompt)
    words = [w for w in _WORD.findall(response) if w not in FILLER]
    correct = right is not None and words == [right]
    style = _STYLE.fullmatch(response.strip()) is not None
    return 0.5 * correct + 0.5 * style


@dataclass
class Task:
    name: str
    seed: int
    corpus: list[tuple[str, str]]       # (a) (prompt, response) of mixed quality
    pairs: list[dict]                   # (b) {"prompt", "chosen", "rejected"}, chosen scores higher
    heldout_prompts: list[str]          # (c) never in corpus or pairs
    heldout_pairs: list[dict]           # pairs on the held-out prompts (eval)
    score: Callable[[str, str], float] = field(repr=False, default=score)

    @property
    def corpus_texts(self) -> list[str]:
        return [p + r for p, r in self.corpus]


def _response(skill: str, args: tuple, rng: random.Random, *, good: bool, correct: bool) -> str:
    right = ANSWER[skill](*args)
    x = right
    if not correct:
        if right.isdigit():
            x = str(max(0, int(right) + rng.choice((-2, -1, 1, 2, 3))))
            x = x if x != right else str(int(right) + 1)
        else:
            x = rng.choice(sorted({ANSWER[skill](*f) for f in FACTS[skill]} - {right}))
    return (GOOD if good else rng.choice(HEDGED)).format(x=x)


def make_assistant(seed: int = 0, size: int = 4000) -> Task:
    split_rng = random.Random(f"assistant/{seed}/heldout")  # independent of `size`
    train, heldout = [], []
    for skill, facts in FACTS.items():
        for args in facts:
            held = split_rng.randrange(3) if split_rng.random() < 1 / 3 else None
            slots = dict(zip("ab", args)) if len(args) == 2 else {"w": args[0]}
            for i, template in enumerate(TEMPLATES[skill]):
                prompt = render_prompt([{"role": "user", "content": template.format(**slots)}])
                (heldout if i == held else train).append((prompt, skill, args))

    rng = random.Random(f"assistant/{seed}/data")

    def cycle(n):  # shuffled passes over the training prompts: every one appears once size >= len(train)
        out = []
        while len(out) < n:
            out += rng.sample(train, len(train))
        return out[:n]

    corpus = [(p, _response(s, a, rng, good=rng.random() < 0.5, correct=rng.random() < 0.7))
              for p, s, a in cycle(size)]

    def pair(p, s, a):
        bad_style, wrong = rng.choice(((True, False), (False, True), (True, True)))
        return {"prompt": p, "chosen": _response(s, a, rng, good=True, correct=True),
                "rejected": _response(s, a, rng, good=not bad_style, correct=not wrong)}

    pairs = [pair(*x) for x in cycle(size)]
    return Task("assistant", seed, corpus, pairs, [p for p, _, _ in heldout], [pair(*x) for x in heldout])


TASKS: dict[str, Callable[[int, int], Task]] = {"assistant": make_assistant}


@functools.lru_cache(maxsize=8)
def get_task(name: str, seed: int = 0, size: int = 4000) -> Task:
    """The task behind `builtin:NAME` (cached: generation is deterministic in (name, seed, size)).
    A size whose records would not fit in this machine's available memory is refused up front."""
    if name not in TASKS:
        raise UserError(f"unknown built-in task {name!r} (available: {', '.join(sorted(TASKS))})")
    check_size(name, seed, size)
    return TASKS[name](seed, size)


SAMPLE_SIZE = 64  # records generated to measure a record's size
TOKEN_BYTES = 4   # an int32 token id per character (the character tokenizer; BPE needs fewer)


def record_bytes(name: str, seed: int = 0) -> float:
    """Memory per unit of `size` (one transcript and one pair), measured on a small sample: the Python strings,
    tuples and dicts generated (prompts are shared, not counted), the corpus text joined for pretraining, and
    their token ids at TOKEN_BYTES a character. A lower bound: tokenised tables and batches come on top."""
    task = TASKS[name](seed, SAMPLE_SIZE)
    size = sys.getsizeof
    n = 0
    for p, r in task.corpus:
        n += 8 + size((p, r)) + size(r) + size(p + r) + TOKEN_BYTES * len(p + r)   # (8: the list's slot)
    for pair in task.pairs:
        n += 8 + size(pair) + sum(size(v) for k, v in pair.items() if k != "prompt")
        n += TOKEN_BYTES * sum(len(v) for v in pair.values())
    return n / SAMPLE_SIZE


def check_size(name: str, seed: int, size: int) -> None:
    """One-line UserError naming data.builtin_size when it is < 1, or when `size` records (at `record_bytes`
    each) exceed the memory available: data.builtin_size=1000000000 would need ~0.5 TB and hours to generate."""
    if size < 1:
        raise UserError(f"data.builtin_size: must be >= 1, got {size}")
    available = resources.available_bytes("cpu")
    if available is None or size <= SAMPLE_SIZE:
        return
    need = size * record_bytes(name, seed)
    if need > available:
        raise UserError(f"data.builtin_size={size}: builtin:{name} would generate {size:,} transcripts and "
                        f"{size:,} pairs, at least {resources.human(need)} with their tokens, this machine has "
                        f"{resources.human(available)} available; lower data.builtin_size")
