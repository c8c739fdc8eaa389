"""A pretrained model's own tokenizer (HFTokenizer): the model's ids, special tokens and chat template, from
a transformers model directory, a saved dict or GGUF metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..chat_template import render_chat, turn_end_token
from ..errors import UserError
from .base import FORMAT_VERSION, _Tokenizer, _first_line, _valid_unicode
from .gguf import _hf_from_gguf
from .model_dir import _default_template, _read_json_object, _read_model_file, _token_content


class HFTokenizer(_Tokenizer):
    """A Hugging Face `tokenizers` tokenizer with the model's bos/eos/pad tokens and chat template.

    Ids are the model's: `encode(text)` equals transformers' `tokenizer(text, add_special_tokens=False)`;
    `bos=True` / `eos=True` add the model's bos (nothing if it has none) and eos ids. `add_bos_token` records
    whether the model's own pipeline prepends bos (transformers' `add_special_tokens=True`), for callers to
    pass as `bos=`; a Llama 3 style template writes `{{ bos_token }}` itself, so a rendered chat is encoded
    with `bos=False`. pad falls back to eos when the model names no pad token (the collators mask padding
    by attention mask, not by id). `unk_id` is the model's unknown token (None for byte-level BPE, which has
    none); `unknown_chars` stays 0.
    """

    applies_nfkc = False  # the model's pipeline carries its own normaliser (or none, as for Llama 3)

    def __init__(self, tokenizer_json: str, *, bos_token: str | None, eos_token: str | None,
                 pad_token: str | None = None, chat_template: str | None = None, add_bos_token: bool = False):
        from tokenizers import Tokenizer

        if eos_token is None:  # data preparation ends every response with it, generation stops at it
            raise UserError("the tokenizer names no eos token")
        _check_types(tokenizer_json=(tokenizer_json, str), bos_token=(bos_token, (str, type(None))),
                     eos_token=(eos_token, str), pad_token=(pad_token, (str, type(None))),
                     chat_template=(chat_template, (str, type(None))), add_bos_token=(add_bos_token, bool))
        self._json = tokenizer_json  # kept verbatim so save/load (and the fingerprint) round-trip exactly
        try:
            self._tok = Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # raised from Rust, any type
            raise UserError(f"not a Hugging Face tokenizers JSON: {_first_line(e)}") from None
        # Special tokens in text are the model's control tokens, as in transformers (see the module docstring).
        self._tok.encode_special_tokens = False
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token = eos_token if pad_token is None else pad_token
        self.chat_template, self.add_bos_token = chat_template, add_bos_token
        self.bos_id = None if bos_token is None else self._id_of(bos_token, "bos_token")
        self.eos_id = self._id_of(eos_token, "eos_token")
        self.pad_id = self._id_of(self.pad_token, "pad_token")
        self.unk_token = getattr(self._tok.model, "unk_token", None)
        self.unk_id = None if self.unk_token is None else self._tok.token_to_id(self.unk_token)
        # Ids may have holes (a removed token): the size is one past the largest id, so every id is < it.
        self._vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    def _id_of(self, token: str, what: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise UserError(f"{what} {token!r} is not in the tokenizer's vocabulary")
        return i

    # ---- constructors

    @classmethod
    def from_pretrained_dir(cls, path: str | Path) -> HFTokenizer:
        """A transformers model directory: tokenizer.json plus (optional) tokenizer_config.json,
        special_tokens_map.json and chat_template.jinja, read as transformers reads them. Every failure is a
        one-line UserError naming the directory."""
        d = Path(path)
        try:
            return cls._from_dir(d)
        except UserError as e:
            raise UserError(f"{d}: {e}") from None

    @classmethod
    def _from_dir(cls, d: Path) -> HFTokenizer:
        if not d.is_dir():
            raise UserError("not a directory")
        tokenizer_json = _read_model_file(d / "tokenizer.json", required=True)
        config = _read_json_object(d / "tokenizer_config.json")
        special_map = _read_json_object(d / "special_tokens_map.json")
        template_file = _read_model_file(d / "chat_template.jinja", required=False)

        def token(key: str) -> str | None:
            # transformers: special_tokens_map.json wins unless the config lists its added tokens.
            source = special_map if key in special_map and "added_tokens_decoder" not in config else config
            return _token_content(source.get(key, special_map.get(key)), key)

        template = template_file if template_file is not None else _default_template(config.get("chat_template"))
        tok = cls(tokenizer_json, bos_token=token("bos_token"), eos_token=token("eos_token"),
                  pad_token=token("pad_token"), chat_template=template)
        # transformers 5 ignores the config's add_bos_token when there is a tokenizer.json: the JSON's
        # post-processor decides. Read it off the pipeline itself.
        tok.add_bos_token = tok._pipeline_prepends_bos()
        return tok

    @classmethod
    def from_gguf_fields(cls, fields: dict) -> HFTokenizer:
        """A byte-level BPE (`tokenizer.ggml.model == "gpt2"`) rebuilt from GGUF metadata, `fields` mapping each
        key to a plain Python value. Control tokens (token type 3) become special added tokens, user-defined
        ones (type 4) plain added tokens; the pre-tokenizer follows `tokenizer.ggml.pre` (see _GGUF_PRE)."""
        try:
            return _hf_from_gguf(cls, fields)
        except UserError as e:
            raise UserError(f"GGUF tokenizer: {e}") from None

    # ---- the shared API

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def _encode_normalized(self, texts: list[str]) -> list[list[int]]:
        texts = [_valid_unicode(t) for t in texts]
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        """As transformers decodes; ids outside the vocabulary are dropped."""
        known = [i for i in map(int, ids) if 0 <= i < self._vocab_size]
        return self._tok.decode(known, skip_special_tokens=skip_special)

    def to_dict(self) -> dict:
        return {"type": "hf", "version": FORMAT_VERSION, "tokenizer": self._json, "bos_token": self.bos_token,
                "eos_token": self.eos_token, "pad_token": self.pad_token, "chat_template": self.chat_template,
                "add_bos_token": self.add_bos_token}

    # ---- special tokens and the chat template

    @property
    def special_tokens(self) -> list[str]:
        """The model's special (control) tokens, by id."""
        added = sorted(self._tok.get_added_tokens_decoder().items())
        return [t.content for _, t in added if t.special]

    def _template_tokens(self) -> dict:
        """The special-token variables transformers gives a chat template (those the model has)."""
        names = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                 "unk_token": self.unk_token}
        return {k: v for k, v in names.items() if v is not None or k in ("bos_token", "eos_token")}

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = False, **extra) -> str:
        """The model's chat template rendered (as text, like transformers' `tokenize=False`); see
        llama4dpo.chat_template for the variables and the bounds."""
        if self.chat_template is None:
            raise UserError("this tokenizer has no chat template")
        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           **{**self._template_tokens(), **extra})

    @property
    def stop_ids(self) -> list[int]:
        """eos, plus the special token the chat template writes right after an assistant message
        (`<|im_end|>`, `<|eot_id|>`, ...) when there is one: generation stops at either."""
        ids = {self.eos_id}
        if self.chat_template is not None:
            end = turn_end_token(self.chat_template, self.special_tokens, **self._template_tokens())
            if end is not None:
                ids.add(self._tok.token_to_id(end))
        return sorted(ids)

    def _pipeline_prepends_bos(self) -> bool:
        if self.bos_id is None:
            return False
        plain = self._tok.encode("a", add_special_tokens=False).ids
        return self._tok.encode("a", add_special_tokens=True).ids == [self.bos_id] + plain


def _check_types(**values: tuple) -> None:
    for name, (value, types) in values.items():
        if not isinstance(value, types):
            raise UserError(f"{name} has the wrong type {type(value).__name__}")
