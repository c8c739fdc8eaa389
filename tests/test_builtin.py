"""The built-in task: ground-truth reward ranks every pair, held-out prompts are unseen, generation is
deterministic, and score() survives anything a model could generate."""

import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama4dpo.config import DataConfig
from llama4dpo.data import get_task, load_preference_data, training_texts
from llama4dpo.data.builtin import ANSWER, FACTS, FILLER, TEMPLATES, answer, question_of, score
from llama4dpo.errors import UserError
from llama4dpo.tokenizer import CharTokenizer


@pytest.fixture(scope="module")
def task():
    return get_task("assistant", seed=0, size=4000)


def test_chosen_always_scores_higher(task):
    for pair in task.pairs + task.heldout_pairs:
        assert score(pair["prompt"], pair["chosen"]) == 1.0 > score(pair["prompt"], pair["rejected"])


def test_heldout_prompts_are_unseen_but_their_facts_are_taught(task):
    train_prompts = {p for p, _ in task.corpus} | {p["prompt"] for p in task.pairs}
    assert 60 <= len(task.heldout_prompts) <= 130
    assert not set(task.heldout_prompts) & train_prompts
    assert {p["prompt"] for p in task.heldout_pairs} == set(task.heldout_prompts)
    train_answers = {answer(p) for p in train_prompts}
    assert all(answer(p) in train_answers for p in task.heldout_prompts)
    assert {question_of(p).split()[0] for p in task.heldout_prompts} >= {"What", "Compute", "Add"}


def test_deterministic_for_a_seed(task):
    again = get_task.__wrapped__("assistant", 0, 4000)  # bypass the cache
    assert again.corpus == task.corpus and again.pairs == task.pairs
    assert again.heldout_prompts == task.heldout_prompts
    other = get_task.__wrapped__("assistant", 1, 4000)
    assert other.pairs != task.pairs and other.heldout_prompts != task.heldout_prompts
    smaller = get_task.__wrapped__("assistant", 0, 500)
    assert smaller.heldout_prompts == task.heldout_prompts  # the held-out set does not depend on size


def test_corpus_is_mediocre(task):
    """~50% preferred style and ~70% correct, so a model imitating the corpus scores ~0.6."""
    style = [score("", r) for _, r in task.corpus]  # no question to parse: only the style half can score
    correct = [score(p, r) - s for (p, r), s in zip(task.corpus, style)]
    assert 0.45 <= statistics.mean(s == 0.5 for s in style) <= 0.55
    assert 0.65 <= statistics.mean(c == 0.5 for c in correct) <= 0.75
    assert 0.55 <= statistics.mean(score(p, r) for p, r in task.corpus) <= 0.65


def test_short_texts_small_alphabet(task):
    assert max(len(question_of(p)) for p in task.heldout_prompts + [p for p, _ in task.corpus]) <= 40
    assert max(len(r) for _, r in task.corpus) <= 40
    assert len(set("".join(task.corpus_texts))) <= 70


def test_every_question_parses_back_to_its_answer():
    for skill, facts in FACTS.items():
        for args in facts:
            slots = dict(zip("ab", args)) if len(args) == 2 else {"w": args[0]}
            right = ANSWER[skill](*args)
            assert right not in FILLER
            for template in TEMPLATES[skill]:
                assert answer(template.format(**slots)) == right


@pytest.mark.parametrize("prompt, response, expected", [
    ("\n\nHuman: What is 3 + 4?\n\nAssistant:", " The answer is 7.", 1.0),
    ("\n\nHuman: What is 3 + 4?\n\nAssistant:", " Um, maybe 7?", 0.5),
    ("\n\nHuman: What is 3 + 4?\n\nAssistant:", " The answer is 8.", 0.5),
    ("\n\nHuman: What is 3 + 4?\n\nAssistant:", " The answer is 17.", 0.5),
    ("\n\nHuman: What is 3 + 4?\n\nAssistant:", " 7 or 8", 0.0),
    ("\n\nHuman: Subtract 2 from 9.\n\nAssistant:", " The answer is 7.", 1.0),
    ("\n\nHuman: Write frog in capitals.\n\nAssistant:", " The answer is frog.", 0.5),
    ("\n\nHuman: Which letter follows h?\n\nAssistant:", " I think it is i, not sure.", 0.5),
    ("\n\nHuman: What is 3 + 4?\n\nAssistant:", " The answer is 7.\n\nHuman: more", 0.0),
    ("What is 12 + 30?", "The answer is 42.", 1.0),  # unseen operands are still checkable
    ("\n\nHuman: Tell me a joke.\n\nAssistant:", " The answer is 7.", 0.5),
])
def test_score_examples(prompt, response, expected):
    assert score(prompt, response) == expected


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80), st.text(max_size=80))
def test_score_never_crashes(prompt, response):
    assert 0.0 <= score(prompt, response) <= 1.0
    assert 0.0 <= score("\n\nHuman: What is " + prompt + "?\n\nAssistant:", response) <= 1.0


def test_builtin_source_through_the_pipeline():
    cfg = DataConfig(builtin_size=200)
    tok = CharTokenizer.train(training_texts("builtin:assistant", cfg))
    data = load_preference_data("builtin:assistant", cfg, tok)
    task = get_task("assistant", 0, 200)
    assert len(data.train) == 200 and len(data.eval) == len(task.heldout_pairs)
    assert data.eval_prompts == task.heldout_prompts and data.score is score
    assert sum(data.report.skipped.values()) == 0
    with pytest.raises(UserError, match="unknown built-in task 'nope'"):
        load_preference_data("builtin:nope", cfg, tok)
