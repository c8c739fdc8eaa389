"""Preference formats: detect which one a record set uses, and turn a record into (prompt, chosen, rejected).

    explicit        {"prompt": str, "chosen": str, "rejected": str}; the texts are used as they are.
    hh              {"chosen": str, "rejected": str}, whole transcripts in HH-RLHF's "\\n\\nHuman: ...
                    \\n\\nAssistant: ..." convention; the prompt is everything up to and including the last
                    "\\n\\nAssistant:" both share (`chat.split_transcripts`).
    conversational  {"chosen": [messages], "rejected": [messages], "prompt": [messages] or str (optional)},
                    as in UltraFeedback-binarized; messages are {"role": "user"|"assistant"|"system",
                    "content": str}. The conversation before the final assistant message, rendered with
                    `chat.render_prompt`, is the prompt; " " + that message's content is the response.
                    In CSV, where a cell cannot hold a list, a message list is stored as a JSON string.

Detection (format "auto"): chosen holding a message list (or its JSON string) -> conversational; else a
prompt field -> explicit; else hh. A record set without chosen and rejected fields is a one-line error
listing the fields it has. Every text is NFKC-normalised (`chat.normalize_text`).
"""

from __future__ import annotations

import json

from ..errors import UserError
from .chat import ROLE_MARKERS, normalize_text, render_prompt, render_response, split_transcripts
from .report import Skip
from .sources import RawRecords

FORMATS = ("explicit", "hh", "conversational")


def detect_format(raw: RawRecords, requested: str = "auto") -> str:
    fields = raw.fields()
    if "chosen" not in fields or "rejected" not in fields:
        found = ", ".join(sorted(fields)) if fields else "none (no readable records)"
        raise UserError(f"{raw.source} is not a preference data set: it needs 'chosen' and 'rejected' fields "
                        f"(and 'prompt' for the explicit format); found fields: {found}")
    if requested == "explicit" and "prompt" not in fields:
        raise UserError(f"{raw.source}: data.format=explicit needs a 'prompt' field; found fields: "
                        f"{', '.join(sorted(fields))}")
    if requested != "auto":
        return requested
    for _, rec in raw.rows:
        if isinstance(rec, dict) and rec.get("chosen") is not None:
            if _as_message_list(rec["chosen"]) is not None:
                return "conversational"
            break
    return "explicit" if "prompt" in fields else "hh"


def extract_pair(rec: dict, fmt: str) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) texts of one record; raises `Skip` for a bad one."""
    if fmt == "explicit":
        prompt, chosen, rejected = _text(rec, "prompt"), _text(rec, "chosen"), _text(rec, "rejected")
    elif fmt == "hh":
        chosen, rejected = _text(rec, "chosen"), _text(rec, "rejected")
        if chosen == rejected:
            raise Skip("identical_responses")
        split = split_transcripts(chosen, rejected)
        if split is None:
            raise Skip("no_assistant_turn", "no shared '\\n\\nAssistant:' turn")
        prompt, chosen, rejected = split
    elif fmt == "conversational":
        prompt, chosen, rejected = _conversation(rec)
    else:
        raise ValueError(f"unknown preference format {fmt!r}")
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise Skip("empty_field", f"{name} response is empty")
    if chosen == rejected:
        raise Skip("identical_responses")
    return prompt, chosen, rejected


def _value(rec: dict, key: str):
    if key not in rec:
        raise Skip("missing_field", key)
    if rec[key] is None:
        raise Skip("null_field", key)
    return rec[key]


def _text(rec: dict, key: str) -> str:
    value = _value(rec, key)
    if not isinstance(value, str):
        raise Skip("non_string_field", f"{key} is a {type(value).__name__}")
    text = normalize_text(value)
    if not text.strip():
        raise Skip("empty_field", key)
    return text


def _as_message_list(value) -> list | None:
    """A list of dicts, or a JSON string of one (CSV); None for anything else."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            return None
    return value if isinstance(value, list) and all(isinstance(m, dict) for m in value) else None


def _messages(rec: dict, key: str) -> list[dict]:
    value = _value(rec, key)
    msgs = _as_message_list(value)
    if not msgs:
        raise Skip("bad_messages", f"{key} is not a non-empty list of messages")
    for m in msgs:
        if not isinstance(m.get("role"), str) or m["role"] not in ROLE_MARKERS or not isinstance(m.get("content"), str):
            shown = {k: m.get(k) for k in ("role", "content")}
            raise Skip("bad_messages", f"{key} has a message {str(shown)[:60]}")
    return [{"role": m["role"], "content": normalize_text(m["content"])} for m in msgs]


def _conversation(rec: dict) -> tuple[str, str, str]:
    chosen, rejected = _messages(rec, "chosen"), _messages(rec, "rejected")
    prompt = rec.get("prompt")
    if prompt is None:
        context: list[dict] = []
    elif isinstance(prompt, str) and _as_message_list(prompt) is None:
        context = [{"role": "user", "content": normalize_text(prompt)}]  # UltraFeedback's prompt string
    else:
        context = _messages(rec, "prompt")
    # UltraFeedback repeats the prompt inside chosen/rejected; TRL's format does not. Accept both.
    full_c = chosen if chosen[:len(context)] == context else context + chosen
    full_r = rejected if rejected[:len(context)] == context else context + rejected
    if full_c[-1]["role"] != "assistant" or full_r[-1]["role"] != "assistant":
        raise Skip("no_assistant_turn", "the last message is not the assistant's")
    if full_c[:-1] != full_r[:-1]:
        raise Skip("mismatched_prompts", "chosen and rejected continue different conversations")
    if not any(m["content"].strip() for m in full_c[:-1]):
        raise Skip("empty_field", "prompt")
    return render_prompt(full_c[:-1]), render_response(full_c[-1]["content"]), render_response(full_r[-1]["content"])
