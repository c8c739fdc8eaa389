"""`llama4dpo chat`: an interactive multi-turn conversation through the chat template: the tokenizer's own
(a pretrained model's; generation stops at its end-of-turn token, and a message holding one of the model's
special tokens is refused in one line), else the HH convention of llama4dpo.data.chat.

The session is written against two functions, `read_line(prompt) -> str` (raises EOFError at end of
input) and `write(text)`, so it runs the same on a terminal and under a scripted test.
"""

from __future__ import annotations

from typing import Callable

from .data.chat import HUMAN, check_no_special_tokens, has_template, render_prompt, template_prompt
from .errors import UserError
from .generate import Sampling, generate

HELP = "Type a message and press Enter. /reset starts over, /quit (or Ctrl-D) leaves."


def chat_session(model, tokenizer, read_line: Callable[[str], str], write: Callable[[str], None],
                 sampling: Sampling, system: str | None = None) -> int:
    templated = has_template(tokenizer)
    if templated:  # the template's end-of-turn token stops generation (tokenizer.stop_ids)
        check_no_special_tokens(tokenizer, system or "", "the system message")
        render = lambda history: template_prompt(tokenizer, history)  # noqa: E731
    else:
        sampling.stop = list(dict.fromkeys([*sampling.stop, HUMAN]))  # the model must not speak for the user
        render = lambda history: render_prompt(history, getattr(tokenizer, "applies_nfkc", True))  # noqa: E731
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    write(HELP + "\n")
    while True:
        try:
            line = read_line("you> ")
        except EOFError:
            write("\nbye\n")
            return 0
        except KeyboardInterrupt:
            write("\ninterrupted, bye\n")
            return 0
        text = line.strip()
        if not text:
            write("(empty message: type something, or /quit)\n")
            continue
        if text in ("/quit", "/exit"):
            write("bye\n")
            return 0
        if text == "/reset":
            history = history[:1] if system else []
            write("(conversation cleared)\n")
            continue
        if templated:
            try:
                check_no_special_tokens(tokenizer, text)
            except UserError as e:
                write(f"(refused: {e})\n")
                continue
        history.append({"role": "user", "content": text})
        write("assistant>")
        try:
            reply = generate(model, tokenizer, [render(history)], sampling, stream=write)[0]
        except KeyboardInterrupt:
            write("\n(interrupted)\n")
            history.pop()
            continue
        except UserError as e:  # e.g. the conversation outgrew the context
            write(f"\n(error: {e}; /reset to start over)\n")
            history.pop()
            continue
        write("\n")
        history.append({"role": "assistant", "content": reply.strip()})
