"""Fuzzed built-in chat template: `render_transcript` / `render_prompt` / `render_response` / `split_transcripts`.

Protects, for any valid conversation (contents full of turn markers, NFKC look-alikes, odd line endings):
the prompt is the transcript plus the assistant marker; the transcript holds exactly one turn marker per
message, in order (markers inside content are escaped); two answers to the same conversation split back
into that conversation's prompt and the two rendered responses (the HH implicit prompt); and on arbitrary
texts `split_transcripts` gives None or a split that puts the texts back together. Shared helpers:
tests/_fuzz.py.
"""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from llama4dpo.data import ASSISTANT, render_prompt, render_response, render_transcript, split_transcripts

from _fuzz import CONTENT, fuzz, messages, no_hang

MARKER = re.compile(r"\n\n(Human|Assistant|System):")
ROLE_OF = {"Human": "user", "Assistant": "assistant", "System": "system"}


@fuzz(500)
@given(msgs=messages(valid=True), a=CONTENT, b=CONTENT, other=st.tuples(CONTENT, CONTENT))
def test_fuzz_chat_template(msgs, a, b, other):
    with no_hang():
        transcript = render_transcript(msgs)
        prompt = render_prompt(msgs)
        assert prompt == transcript + ASSISTANT
        # exactly one turn marker per message, in order (markers inside content are escaped)
        assert [ROLE_OF[r] for r in MARKER.findall(transcript)] == [m["role"] for m in msgs]
        # the HH implicit prompt of two answers to the same conversation is that conversation's prompt
        chosen = render_transcript(msgs + [{"role": "assistant", "content": a}])
        rejected = render_transcript(msgs + [{"role": "assistant", "content": b}])
        assert chosen == prompt + render_response(a)
        assert split_transcripts(chosen, rejected) == (prompt, render_response(a), render_response(b))
        # on arbitrary texts: None, or a split that puts the texts back together
        c, r = other
        split = split_transcripts(c, r)
        if split is not None:
            p, c2, r2 = split
            assert p.endswith(ASSISTANT) and p + c2 == c and p + r2 == r
