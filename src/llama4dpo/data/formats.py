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
listing the fields it has. Every text is NFKC-normalised (`chat.normalize_text`), unless the tokenizer
does not apply NFKC itself (`applies_nfkc` False: a pretrained model's HFTokenizer).

With a tokenizer that has a chat template (`extract_pair(..., tokenizer=tok)`), the pair is rendered by that
template instead: an explicit prompt string is one user turn, HH transcripts are parsed into turns, message
lists are used as they are; the prompt is `apply_chat_template(context, add_generation_prompt=True)` and each
response is the full render with the assistant answer minus the prompt (`chat.template_response`).
"""

from __future__ import annotations

import json

from ..errors import UserError
from .chat import (ASSISTANT, ROLE_MARKERS, has_template, normalize_text, parse_transcript, render_prompt,
                   render_response, split_transcripts, template_prompt, template_response)
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


def extract_pair(rec: dict, fmt: str, tokenizer=None) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) texts of one record; raises `Skip` for a bad one.
    `tokenizer`: the model's, for its NFKC choice and its chat template (None: NFKC and the HH convention)."""
    nfkc = tokenizer is None or tokenizer.applies_nfkc
    templated = has_template(tokenizer)
    if fmt == "explicit":
        prompt, chosen, rejected = (_text(rec, k, nfkc) for k in ("prompt", "chosen", "rejected"))
        context = [{"role": "user", "content": prompt}]
    elif fmt == "hh":
        chosen, rejected = _text(rec, "chosen", nfkc), _text(rec, "rejected", nfkc)
        if chosen == rejected:
            raise Skip("identical_responses")
        split = split_transcripts(chosen, rejected)
        if split is None:
            raise Skip("no_assistant_turn", "no shared '\\n\\nAssistant:' turn")
        prompt, chosen, rejected = split
        if templated:
            context = parse_transcript(prompt[:-len(ASSISTANT)])
            if context is None:
                raise Skip("bad_transcript", "text before the first turn marker")
            chosen, rejected = chosen.strip(), rejected.strip()
    elif fmt == "conversational":
        context, chosen, rejected = _conversation(rec, nfkc)
        if not templated:
            prompt, chosen, rejected = (render_prompt(context, nfkc), render_response(chosen, nfkc),
                                        render_response(rejected, nfkc))
    else:
        raise ValueError(f"unknown preference format {fmt!r}")
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise Skip("empty_field", f"{name} response is empty")
    if chosen == rejected:
        raise Skip("identical_responses")
    if templated:
        return render_pair(tokenizer, context, chosen, rejected)
    return prompt, chosen, rejected


def detect_unpaired_format(raw: RawRecords, requested: str = "auto") -> str:
    """KTO's unpaired records, {"prompt", "completion", "label": bool} (TRL's format): explicit (texts) or
    conversational (message lists)."""
    fields = raw.fields()
    if not {"prompt", "completion", "label"} <= set(fields):
        found = ", ".join(sorted(fields)) if fields else "none (no readable records)"
        raise UserError(f"{raw.source} is not an unpaired (KTO) data set: it needs 'prompt', 'completion' and "
                        f"'label' fields (or data.unpair=true for a paired one); found fields: {found}")
    if requested in ("explicit", "conversational"):
        return requested
    if requested != "auto":
        raise UserError(f"data.format={requested} does not apply to unpaired records (explicit or conversational)")
    for _, rec in raw.rows:
        if isinstance(rec, dict) and rec.get("completion") is not None:
            return "conversational" if _as_message_list(rec["completion"]) is not None else "explicit"
    return "explicit"


def extract_completion(rec: dict, fmt: str, tokenizer=None) -> tuple[str, str, bool]:
    """(prompt, response, label) of one unpaired record, rendered as `extract_pair` renders a pair's; `Skip`
    for a bad one."""
    nfkc = tokenizer is None or tokenizer.applies_nfkc
    label = _value(rec, "label")
    if isinstance(label, int) and not isinstance(label, bool) and label in (0, 1):
        label = bool(label)
    if not isinstance(label, bool):
        raise Skip("bad_label", f"label is {str(label)[:20]!r}, not true or false")
    if fmt == "conversational":
        raw_prompt = _value(rec, "prompt")
        context = ([{"role": "user", "content": normalize_text(raw_prompt, nfkc)}]
                   if isinstance(raw_prompt, str) and _as_message_list(raw_prompt) is None
                   else _messages(rec, "prompt", nfkc))
        answer = _messages(rec, "completion", nfkc)
        if answer[-1]["role"] != "assistant":
            raise Skip("no_assistant_turn", "the completion's last message is not the assistant's")
        completion = answer[-1]["content"]
        if not any(m["content"].strip() for m in context):
            raise Skip("empty_field", "prompt")
        prompt = render_prompt(context, nfkc)
    else:
        prompt, completion = _text(rec, "prompt", nfkc), _text(rec, "completion", nfkc)
        context = [{"role": "user", "content": prompt}]
    if not completion.strip():
        raise Skip("empty_field", "completion")
    if has_template(tokenizer):
        prompt, completion, _ = render_pair(tokenizer, context, completion, completion)
    elif fmt == "conversational":
        completion = render_response(completion, nfkc)
    return prompt, completion, label


def render_pair(tokenizer, context: list[dict], chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) rendered by the tokenizer's chat template; a template that
    fails on the conversation, or whose prompt is not a prefix of the full render, is a `Skip`; so is a text
    holding one of the model's special tokens, which would be encoded as that control token."""
    for token in getattr(tokenizer, "special_tokens", None) or []:
        for text in (chosen, rejected, *(m["content"] for m in context)):
            if token and token in text:
                raise Skip("special_token_in_text", f"the text holds the model's special token {token!r}")
    try:
        prompt = template_prompt(tokenizer, context)
        return (prompt, template_response(tokenizer, context, prompt, chosen),
                template_response(tokenizer, context, prompt, rejected))
    except ValueError as e:
        raise Skip(str(e), "the rendered prompt is not a prefix of the rendered conversation") from None
    except UserError as e:
        raise Skip("template_error", str(e)[:120]) from None


def _value(rec: dict, key: str):
    if key not in rec:
        raise Skip("missing_field", key)
    if rec[key] is None:
        raise Skip("null_field", key)
    return rec[key]


def _text(rec: dict, key: str, nfkc: bool = True) -> str:
    value = _value(rec, key)
    if not isinstance(value, str):
        raise Skip("non_string_field", f"{key} is a {type(value).__name__}")
    text = normalize_text(value, nfkc)
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


def _messages(rec: dict, key: str, nfkc: bool = True) -> list[dict]:
    value = _value(rec, key)
    msgs = _as_message_list(value)
    if not msgs:
        raise Skip("bad_messages", f"{key} is not a non-empty list of messages")
    for m in msgs:
        if not isinstance(m.get("role"), str) or m["role"] not in ROLE_MARKERS or not isinstance(m.get("content"), str):
            shown = {k: m.get(k) for k in ("role", "content")}
            raise Skip("bad_messages", f"{key} has a message {str(shown)[:60]}")
    return [{"role": m["role"], "content": normalize_text(m["content"], nfkc)} for m in msgs]


def _conversation(rec: dict, nfkc: bool = True) -> tuple[list[dict], str, str]:
    """(the messages before the answer, chosen answer, rejected answer)."""
    chosen, rejected = _messages(rec, "chosen", nfkc), _messages(rec, "rejected", nfkc)
    prompt = rec.get("prompt")
    if prompt is None:
        context: list[dict] = []
    elif isinstance(prompt, str) and _as_message_list(prompt) is None:
        context = [{"role": "user", "content": normalize_text(prompt, nfkc)}]  # UltraFeedback's prompt string
    else:
        context = _messages(rec, "prompt", nfkc)
    # UltraFeedback repeats the prompt inside chosen/rejected; TRL's format does not. Accept both.
    full_c = chosen if chosen[:len(context)] == context else context + chosen
    full_r = rejected if rejected[:len(context)] == context else context + rejected
    if full_c[-1]["role"] != "assistant" or full_r[-1]["role"] != "assistant":
        raise Skip("no_assistant_turn", "the last message is not the assistant's")
    if full_c[:-1] != full_r[:-1]:
        raise Skip("mismatched_prompts", "chosen and rejected continue different conversations")
    if not any(m["content"].strip() for m in full_c[:-1]):
        raise Skip("empty_field", "prompt")
    return full_c[:-1], full_c[-1]["content"], full_r[-1]["content"]
