"""`llama4dpo chat`: an interactive multi-turn conversation through the one chat template.

The session is written against two functions, `read_line(prompt) -> str` (raises EOFError at end of
input) and `write(text)`, so it runs the same on a terminal and under a scripted test.
"""

from __future__ import annotations

from typing import Callable

from .data.chat import HUMAN, render_prompt
from .errors import UserError
from .generate import Sampling, generate

HELP = "Type a message and press Enter. /reset starts over, /quit (or Ctrl-D) leaves."


def chat_session(model, tokenizer, read_line: Callable[[str], str], write: Callable[[str], None],
                 sampling: Sampling, system: str | None = None) -> int:
    sampling.stop = list(dict.fromkeys([*sampling.stop, HUMAN]))  # the model must not speak for the user
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
        history.append({"role": "user", "content": text})
        write("assistant>")
        try:
            reply = generate(model, tokenizer, [render_prompt(history)], sampling, stream=write)[0]
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
