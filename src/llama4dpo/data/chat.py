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

A tokenizer with its own chat template (a pretrained model's HFTokenizer, `has_template`) replaces this
convention everywhere (data preparation, SFT, DPO, eval, generate, chat): the prompt is
`apply_chat_template(turns, add_generation_prompt=True)` (`template_prompt`), a response is the full render
with the answer minus that prompt (`template_response`), and user text holding one of the model's special
tokens is refused (`check_no_special_tokens`). Such a tokenizer applies no NFKC, and neither does the data
preparation for it (`normalize_text(..., nfkc=False)`).
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


def normalize_text(text: str, nfkc: bool = True) -> str:
    """NFKC (as the tokenizer does) plus Windows line endings -> "\\n", so turn markers are found in CSVs.
    Lone surrogates (a JSON "\\ud800" escape) cannot be encoded as UTF-8 and become U+FFFD. `nfkc=False`
    (a tokenizer whose `applies_nfkc` is False: a pretrained model's own pipeline) skips the NFKC step."""
    text = _LONE_SURROGATE.sub("\ufffd", unicodedata.normalize("NFKC", text) if nfkc else text)
    return text.replace("\r\n", "\n") if "\r" in text else text


def escape_content(content: str, nfkc: bool = True) -> str:
    """Normalise, then collapse turn markers inside a message to one newline so they cannot start a turn."""
    return _MARKER_IN_CONTENT.sub(r"\n\1:", normalize_text(content, nfkc))


def render_transcript(messages: list[dict], nfkc: bool = True) -> str:
    """All messages as one text: each turn is its marker, a space and the (escaped) content."""
    return "".join(f"{ROLE_MARKERS[m['role']]} {escape_content(m['content'], nfkc)}" for m in messages)


def render_prompt(messages: list[dict], nfkc: bool = True) -> str:
    """The messages followed by the generation prompt "\\n\\nAssistant:" (the model continues with " ...")."""
    return render_transcript(messages, nfkc) + ASSISTANT


def render_response(content: str, nfkc: bool = True) -> str:
    """An assistant message as a response text: " " + content, the part after the generation prompt."""
    return " " + escape_content(content, nfkc)


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


# ---- a tokenizer's own chat template (a pretrained model's HFTokenizer)

_MARKER_SPLIT = re.compile(r"(\n\n(?:Human|Assistant|System):)")
_ROLE_OF_MARKER = {marker: role for role, marker in ROLE_MARKERS.items()}


def parse_transcript(text: str) -> list[dict] | None:
    """An HH transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") as messages, or None when it does not start
    with a turn marker. Each content is stripped of the spaces around it.

    >>> parse_transcript("\\n\\nHuman: Hi\\n\\nAssistant: Hello.")
    [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello.'}]
    """
    parts = _MARKER_SPLIT.split(text)
    if parts[0].strip() or len(parts) < 3:
        return None
    return [{"role": _ROLE_OF_MARKER[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]


def has_template(tokenizer) -> bool:
    """Whether `tokenizer` renders chats with its own template (a pretrained model's HFTokenizer)."""
    return getattr(tokenizer, "chat_template", None) is not None


def template_prompt(tokenizer, messages: list[dict]) -> str:
    """The messages rendered by the tokenizer's template with its generation prompt."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def template_response(tokenizer, context: list[dict], prompt: str, answer: str) -> str:
    """The text the template writes for the assistant `answer` after `prompt` (the render of `context` with the
    generation prompt): the full render minus the prompt. Raises ValueError("template_not_prefix") when the
    prompt is not a prefix of the full render (a template that renders earlier turns differently)."""
    full = tokenizer.apply_chat_template(context + [{"role": "assistant", "content": answer}])
    if not full.startswith(prompt):
        raise ValueError("template_not_prefix")
    return full[len(prompt):]


def check_no_special_tokens(tokenizer, text: str, what: str = "the message") -> None:
    """User text must not carry the model's control tokens (it could open or close turns itself): a one-line
    UserError naming the token."""
    from ..errors import UserError

    for token in getattr(tokenizer, "special_tokens", None) or []:
        if token and token in text:
            raise UserError(f"{what} contains the model's special token {token!r}; remove it (control tokens "
                            "cannot be typed)")
