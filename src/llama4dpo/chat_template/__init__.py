"""A pretrained model's own chat template (Jinja), rendered the way transformers renders it - but safely.

    render_chat(template, [{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")

The template sees transformers' variables: `messages`, `add_generation_prompt`, `bos_token`, `eos_token`
(left undefined when None, as transformers leaves a missing special token out), `tools`=None,
`documents`=None and any extra keyword (e.g. `pad_token`, `unk_token`, `date_string`); and its globals
`raise_exception`, `strftime_now`, `namespace`, `dict`, `range`, `cycler`, `joiner`; and its `tojson` filter.
The environment is transformers' (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, loop controls,
and `{% generation %}` blocks, rendered as their body).

A template is untrusted input (it comes with a downloaded model). The sandbox stops it from reaching Python
internals (`''.__class__`, `cycler.__init__.__globals__`, ...); on top of that, a render is bounded:
at most MAX_OUTPUT_CHARS characters for the output and for every string, list or number built on the way
(checked before `*`, `+`, `~`, `%`, padding, `replace`, `join`, `indent` and format widths allocate), and at
most TIME_LIMIT_S seconds of template code. Every failure - syntax error, sandbox refusal, undefined call,
`raise_exception`, recursion, a bound exceeded - is a one-line UserError "chat template: ...".

Which token ends an assistant turn: `turn_end_token` renders a probe conversation and returns the special
token the template writes right after the assistant's content (`<|im_end|>` for ChatML/SmolLM2,
`<|eot_id|>` for Llama 3, or the eos token itself). Generation stops at it and at eos
(`HFTokenizer.stop_ids`).
"""

from .limits import MAX_OUTPUT_CHARS, TIME_LIMIT_S
from .render import render_chat, turn_end_token

__all__ = ["render_chat", "turn_end_token", "MAX_OUTPUT_CHARS", "TIME_LIMIT_S"]
