"""Collators and the truncation policy: the docstring's worked example, and a property test over arbitrary text."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama4dpo.data import IGNORE_INDEX, collate_preference, collate_sft, extract_pair, prepare_pair, truncate_pair
from llama4dpo.data.report import Skip
from llama4dpo.tokenizer import BPETokenizer, CharTokenizer

EXAMPLES = [{"prompt_ids": [1, 5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 2]},
            {"prompt_ids": [1, 5], "chosen_ids": [7, 7, 2], "rejected_ids": [9, 2]}]


def test_collate_preference_worked_example():
    """The example in collate_preference's docstring, verbatim."""
    batch = collate_preference(EXAMPLES, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 2, 0],
                                           [1, 5, 7, 7, 2, 0],
                                           [1, 5, 6, 8, 9, 2],
                                           [1, 5, 9, 2, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0],
                                                [1, 1, 1, 1, 1, 0],
                                                [1, 1, 1, 1, 1, 1],
                                                [1, 1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 7, 2, -100],
                                        [-100, -100, 7, 7, 2, -100],
                                        [-100, -100, -100, 8, 9, 2],
                                        [-100, -100, 9, 2, -100, -100]]


def test_pad_to_multiple_and_sft():
    batch = collate_preference(EXAMPLES, pad_id=0, pad_to_multiple_of=4)
    assert batch["input_ids"].shape == (4, 8) and (batch["labels"][:, 6:] == IGNORE_INDEX).all()
    sft = collate_sft([{"prompt_ids": ex["prompt_ids"], "response_ids": ex["chosen_ids"]} for ex in EXAMPLES], pad_id=0)
    assert sft["input_ids"].tolist() == [[1, 5, 6, 7, 2], [1, 5, 7, 7, 2]]
    assert sft["labels"].tolist() == [[-100, -100, -100, 7, 2], [-100, -100, 7, 7, 2]]
    resp = collate_sft([{"prompt_ids": [1, 4], "response_ids": [6, 2]}], pad_id=0)
    assert resp["labels"].tolist() == [[-100, -100, 6, 2]]


def test_truncation_policy():
    # the docstring example: prompt keeps bos + its end; the responses keep their start, a cut one loses eos
    assert truncate_pair([1, 10, 11, 12, 13], [20, 21, 2], [30, 2], max_length=5, max_prompt_length=3) == \
        ([1, 12, 13], [20, 21], [30, 2])
    assert truncate_pair([1, 10, 11], [20, 2], [30, 2], 8, 4) == ([1, 10, 11], [20, 2], [30, 2])  # fits
    assert truncate_pair([1, 10, 11], [20, 2], [30, 2], 4, 1) == ([1], [20, 2], [30, 2])  # max_prompt_length=1


def test_prepare_pair_bos_eos_and_boundary():
    tok = CharTokenizer.train(["\n\nHuman: hi?\n\nAssistant: The answer."])
    ex = prepare_pair(tok, "\n\nHuman: hi?\n\nAssistant:", " The answer.", " hi.", 64, 32)
    assert ex["prompt_ids"][0] == tok.bos_id and tok.bos_id not in ex["prompt_ids"][1:]
    assert ex["chosen_ids"][-1] == tok.eos_id and ex["chosen_ids"].count(tok.eos_id) == 1
    assert tok.decode(ex["prompt_ids"]) + tok.decode(ex["chosen_ids"]) == "\n\nHuman: hi?\n\nAssistant: The answer."


TOKENIZERS = {"char": CharTokenizer(list(" abcdefghijklmnopqrstuvwxyz.\n:")),
              "bpe": BPETokenizer.train(["the cat sat on the mat.\n\nHuman: hi\n\nAssistant: ok"] * 20, vocab_size=280)}


@pytest.mark.parametrize("tok_name", list(TOKENIZERS))
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.text(max_size=40), chosen=st.text(max_size=40), rejected=st.text(max_size=40),
       hh=st.booleans(), max_length=st.integers(2, 48), data=st.data())
def test_arbitrary_text_never_crashes_and_masks_are_exact(tok_name, prompt, chosen, rejected, hh, max_length, data):
    tok = TOKENIZERS[tok_name]
    max_prompt_length = data.draw(st.integers(1, max_length - 1))
    if hh:  # as transcripts, with a shared Assistant turn somewhere or not
        record = {"chosen": prompt + "\n\nAssistant:" + chosen, "rejected": prompt + "\n\nAssistant:" + rejected}
    else:
        record = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    try:
        p, c, r = extract_pair(record, "hh" if hh else "explicit")
    except Skip:
        return  # counted as a bad record, never a crash
    ex = prepare_pair(tok, p, c, r, max_length, max_prompt_length)
    prompt_ids = [tok.bos_id] + tok.encode(p)  # (one longer than max_length too: truncated, never skipped)
    batch = collate_preference([ex], tok.pad_id)
    kept_prompt = len(ex["prompt_ids"])
    assert kept_prompt == min(len(prompt_ids), max_prompt_length)
    assert ex["prompt_ids"] == prompt_ids[:1] + prompt_ids[len(prompt_ids) - kept_prompt + 1:]
    for row, response in ((0, c), (1, r)):
        survived = (tok.encode(response) + [tok.eos_id])[:max_length - kept_prompt]
        assert len(survived) >= 1
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        selected = labels != IGNORE_INDEX
        assert labels[selected].tolist() == survived                               # exactly the survivors
        assert selected.nonzero().flatten().tolist() == list(range(kept_prompt, kept_prompt + len(survived)))
        assert ids[selected].tolist() == survived and ids[0] == tok.bos_id
        assert (ids == tok.bos_id).sum() == 1 and (ids == tok.eos_id).sum() <= 1  # one bos; eos unless cut
        assert batch["attention_mask"][row].sum() == kept_prompt + len(survived) <= max_length
