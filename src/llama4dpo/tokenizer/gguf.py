"""GGUF metadata to a byte-level BPE `tokenizers` pipeline: llama.cpp's pre-tokenizers (`tokenizer.ggml.pre`),
the vocabulary and merges, and the control/user-defined added tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import UserError
from .base import _first_line

if TYPE_CHECKING:
    from .hf import HFTokenizer


class _PreTokenizer:
    """How llama.cpp splits text for one `tokenizer.ggml.pre` value, as the original tokenizer.json does."""

    def __init__(self, build, *, ignore_merges: bool, add_bos_default: bool):
        self.build, self.ignore_merges, self.add_bos_default = build, ignore_merges, add_bos_default


# Llama 3's split regex, exactly as in its tokenizer.json (llama.cpp's "llama-bpe" uses the same, rewritten
# without the case-insensitive group).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _llama3_pre():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _gpt2_pre():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's own regex


def _smollm_pre():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_pre()])


# llama.cpp's values (llama-vocab.cpp): Llama 3 names ignore merges and add bos unless the file says otherwise.
_GGUF_PRE = {
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3"),
                    _PreTokenizer(_llama3_pre, ignore_merges=True, add_bos_default=True)),
    "gpt-2": _PreTokenizer(_gpt2_pre, ignore_merges=False, add_bos_default=False),
    "smollm": _PreTokenizer(_smollm_pre, ignore_merges=False, add_bos_default=False),
}
_CONTROL, _USER_DEFINED = 3, 4  # GGUF token types


def _gguf_list(fields: dict, key: str, item_type: type) -> list:
    value = fields.get(key)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, item_type) for v in value):
        raise UserError(f"{key} must be a list of {item_type.__name__}")
    return list(value)


def _gguf_token(fields: dict, key: str, tokens: list[str], *, required: bool) -> str | None:
    i = fields.get(key)
    if i is None and not required:
        return None
    if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(tokens):
        raise UserError(f"{key} must be a token id below {len(tokens)}, got {i!r}")
    return tokens[i]


def _hf_from_gguf(cls, fields: dict) -> HFTokenizer:
    if not isinstance(fields, dict):
        raise UserError("the fields must be a dict")
    model = fields.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise UserError(f"tokenizer.ggml.model {model!r} is not supported (only byte-level BPE, 'gpt2')")
    pre = fields.get("tokenizer.ggml.pre")
    if pre not in _GGUF_PRE:
        raise UserError(f"tokenizer.ggml.pre {pre!r} is not supported (supported: {', '.join(_GGUF_PRE)})")
    tokens = _gguf_list(fields, "tokenizer.ggml.tokens", str)
    merges = _gguf_list(fields, "tokenizer.ggml.merges", str)
    types = fields.get("tokenizer.ggml.token_type", [1] * len(tokens))
    if not isinstance(types, (list, tuple)) or len(types) != len(tokens):
        raise UserError("tokenizer.ggml.token_type must list one type per token")
    bos = _gguf_token(fields, "tokenizer.ggml.bos_token_id", tokens, required=False)
    eos = _gguf_token(fields, "tokenizer.ggml.eos_token_id", tokens, required=True)
    pad = _gguf_token(fields, "tokenizer.ggml.padding_token_id", tokens, required=False)
    add_bos = fields.get("tokenizer.ggml.add_bos_token", _GGUF_PRE[pre].add_bos_default)
    template = fields.get("tokenizer.chat_template")
    tok = _byte_level_bpe(tokens, merges, types, _GGUF_PRE[pre])
    if add_bos and bos is not None:  # as Llama 3's tokenizer.json: transformers' add_special_tokens adds bos
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(
            single=[bos, "$A"], pair=[bos, "$A", bos, "$B:1"], special_tokens=[(bos, tokens.index(bos))])
    return cls(tok.to_str(), bos_token=bos, eos_token=eos, pad_token=pad, chat_template=template,
               add_bos_token=bool(add_bos))


def _byte_level_bpe(tokens: list[str], merges: list[str], types, pre: _PreTokenizer):
    from tokenizers import AddedToken, Tokenizer, decoders, models

    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a repeated string keeps its first id; the later id is a hole
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")  # byte-level tokens never hold a space (it is "Ġ")
        if not sep or not left or not right:
            raise UserError(f"bad merge {m[:40]!r} in tokenizer.ggml.merges")
        pairs.append((left, right))
    try:
        tok = Tokenizer(models.BPE(vocab, pairs, ignore_merges=pre.ignore_merges))
    except Exception as e:  # e.g. a merge of tokens that are not in the vocabulary
        raise UserError(f"cannot build the BPE model: {_first_line(e)}") from None
    tok.pre_tokenizer = pre.build()
    tok.decoder = decoders.ByteLevel()
    # The added tokens are already in the vocabulary, so they keep their GGUF ids.
    added = [(i, t, ty) for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (_CONTROL, _USER_DEFINED)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for _, t, ty in added if ty == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for _, t, ty in added if ty == _USER_DEFINED])
    return tok
