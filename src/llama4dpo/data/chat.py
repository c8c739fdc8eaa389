"""The one chat template, used by data preparation and by generation: Anthropic HH-RLHF's convention.

    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "What is 3 + 4?"},
     {"role": "assistant", "content": "The answer is 7."}]

renders as the transcript

    "\\n\\nSystem: Be brief.\\n\\nHuman: What is 3 + 4?\\n\\nAssistant: The answer is 7."

A prompt is the render of the messages before the answer followed by the generation prompt "\\n\\nAssistant:";
the response is the text after it, so it starts with a space: prompt + response == transcript.

Turn markers inside message content ("...\\n\\nAssistant: ..." typed by a user) would make a transcript
ambiguous, so `render_*` rewrite a marker inside content to a single newline ("\\nAssistant:"), after
the same NFKC normalisation the tokenizer applies (NFKC can turn a full-width colon into ":"). The
rendered text then has exactly one marker per message, and splitting it again gives the messages back.
"""

from __future__ import annotations

import re
import unicodedata

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"  # also the generation prompt
SYSTEM = "\n\nSystem:"
ROLE_MARKERS = {"user": HUMAN, "assistant": ASSISTANT, "system": SYSTEM}

# Two or more newlines, then a role name and a colon: a turn marker (possibly preceded by extra newlines).
_MARKER_IN_CONTENT = re.compile(r"\n\n+(Human|Assistant|System):")


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def normalize_text(text: str) -> str:
    """NFKC (as the tokenizer does) plus Windows line endings -> "\\n", so turn markers are found in CSVs.
    Lone surrogates (a JSON "\\ud800" escape) cannot be encoded as UTF-8 and become U+FFFD."""
    text = _LONE_SURROGATE.sub("\ufffd", unicodedata.normalize("NFKC", text))
    return text.replace("\r\n", "\n") if "\r" in text else text


def escape_content(content: str) -> str:
    """Normalise, then collapse turn markers inside a message to one newline so they cannot start a turn."""
    return _MARKER_IN_CONTENT.sub(r"\n\1:", normalize_text(content))


def render_transcript(messages: list[dict]) -> str:
    """All messages as one text: each turn is its marker, a space and the (escaped) content."""
    return "".join(f"{ROLE_MARKERS[m['role']]} {escape_content(m['content'])}" for m in messages)


def render_prompt(messages: list[dict]) -> str:
    """The messages followed by the generation prompt "\\n\\nAssistant:" (the model continues with " ...")."""
    return render_transcript(messages) + ASSISTANT


def render_response(content: str) -> str:
    """An assistant message as a response text: " " + content, the part after the generation prompt."""
    return " " + escape_content(content)


def split_transcripts(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """HH-RLHF's implicit prompt: everything up to and including the last "\\n\\nAssistant:" that both
    transcripts share. Returns (prompt, chosen_response, rejected_response), or None when the shared
    prefix contains no assistant turn.

    >>> split_transcripts("\\n\\nHuman: Hi\\n\\nAssistant: Hello.", "\\n\\nHuman: Hi\\n\\nAssistant: Go away.")
    ('\\n\\nHuman: Hi\\n\\nAssistant:', ' Hello.', ' Go away.')
    """
    end = len(chosen)
    while (i := chosen.rfind(ASSISTANT, 0, end)) >= 0:  # last marker first; HH has a handful of turns
        cut = i + len(ASSISTANT)
        if rejected.startswith(chosen[:cut]):
            return chosen[:cut], chosen[cut:], rejected[cut:]
        end = i  # markers cannot overlap, so the next candidate ends before this one starts
    return None
