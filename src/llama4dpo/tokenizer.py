"""Three tokenizers with one API: the notebook's character tokenizer, a byte-level BPE, and a pretrained
model's own tokenizer (HFTokenizer).

Ours (char, bpe) reserve the same special ids (<pad>=0, <bos>=1, <eos>=2, <unk>=3) and normalise text with
NFKC the same way at train and encode time. A pretrained one keeps the model's ids, special tokens,
normaliser and chat template, and is NOT NFKC-normalised by us (`applies_nfkc` is False): NFKC on top of
the model's own pipeline would give ids the model never saw. All save to one JSON file (`tokenizer.json`,
never pickle):

    {"type": "char", "version": 1, "specials": [...], "chars": ["\\n", " ", "!", ...]}
    {"type": "bpe",  "version": 1, "specials": [...], "tokenizer": "<Hugging Face tokenizers JSON string>"}
    {"type": "hf",   "version": 1, "tokenizer": "<tokenizers JSON string>", "bos_token": ..., "eos_token": ...,
     "pad_token": ..., "chat_template": ..., "add_bos_token": ...}

For char and bpe, user text is data: a literal "<eos>" in it is encoded as ordinary characters/bytes; only
the `bos=True` / `eos=True` flags of `encode` put special ids into a sequence. An HFTokenizer encodes text
exactly as transformers' tokenizer of the same model does (`tokenizer(text, add_special_tokens=False)`), and
that recognises the model's special tokens in text: it has to, because a rendered chat template is text
holding them ("<|im_start|>user\\n..."). So message content should be checked for control tokens before it
is rendered into a template, if users must not be able to write them.

`save_for_transformers` writes any of the three as a transformers tokenizer directory giving the same ids.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .errors import UserError

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0..3 in the char and bpe tokenizers
FORMAT_VERSION = 1
KINDS = ("char", "bpe", "hf")


def normalize(text: str) -> str:
    """NFKC: folds compatibility forms ("ﬁ" -> "fi", "１２" -> "12") so training and inference agree."""
    return unicodedata.normalize("NFKC", text)


class _Tokenizer:
    """The shared half: special ids, bos/eos flags, decoding around specials, JSON save and fingerprint."""

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3
    unknown_chars = 0  # characters encoded as <unk> by this object so far (byte-level BPE: never any)
    applies_nfkc = True  # encode() NFKC-normalises text first (see `normalize`)
    chat_template: str | None = None  # a Jinja chat template (pretrained models only)

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def _encode_normalized(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def _decode_plain(self, ids: list[int]) -> str:  # ids contain no specials
        raise NotImplementedError

    def to_dict(self) -> dict:
        raise NotImplementedError

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        return self.encode_batch([text], bos=bos, eos=eos)[0]

    def encode_batch(self, texts: list[str], *, bos: bool = False, eos: bool = False) -> list[list[int]]:
        """`bos=True` adds nothing for a model that has no bos token (bos_id None)."""
        out = self._encode_normalized([normalize(t) for t in texts] if self.applies_nfkc else list(texts))
        head = [self.bos_id] if bos and self.bos_id is not None else []
        tail = [self.eos_id] if eos else []
        return [head + ids + tail for ids in out] if (head or tail) else out

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end a generated answer: eos (an HFTokenizer adds its chat template's end-of-turn token)."""
        return [self.eos_id]

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = False, **extra) -> str:
        raise UserError(f"this {type(self).__name__} has no chat template (our own tokenizers use the "
                        "transcript format of llama4dpo.data.chat)")

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        """Ids outside the vocabulary (e.g. a model's padded vocab rows) are treated as <unk>."""
        pieces: list[str] = []
        run: list[int] = []  # consecutive ordinary ids, decoded together so multi-byte characters survive
        for i in map(int, ids):
            if len(SPECIALS) <= i < self.vocab_size:
                run.append(i)
                continue
            if run:
                pieces.append(self._decode_plain(run))
                run = []
            if not skip_special:
                pieces.append(SPECIALS[i] if 0 <= i < len(SPECIALS) else SPECIALS[self.unk_id])
        if run:
            pieces.append(self._decode_plain(run))
        return "".join(pieces)

    def save(self, path: str | Path) -> Path:
        """Write JSON to `path` (or to `path/tokenizer.json` if `path` is a directory); returns the file."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        return path

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON: equal fingerprints <=> the same token ids for every text."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class CharTokenizer(_Tokenizer):
    """One id per character seen in training (sorted by code point, after the 4 specials); others -> <unk>,
    counted in `unknown_chars`."""

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise ValueError("chars must be distinct single characters")
        self.itos = list(SPECIALS) + chars  # id -> string (specials render as their names)
        self.stoi = {c: i for i, c in enumerate(self.itos)}  # specials are multi-char, so never match text
        # Encoding is a table lookup over code points. The table stops one past the largest code point in the
        # vocabulary and its last entry is <unk>, so clipping a code point to the end maps any unseen
        # character (including ones beyond the table) to <unk> without a Python-level loop.
        codes = [ord(c) for c in chars]
        self._lut = np.full(max(codes, default=0) + 2, self.unk_id, dtype=np.int32)
        self._lut[codes] = np.arange(len(SPECIALS), len(self.itos), dtype=np.int32)

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        seen: set[str] = set()
        for t in texts:
            seen.update(normalize(t))
        return cls(sorted(seen))

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def _encode_normalized(self, texts: list[str]) -> list[list[int]]:
        out = []
        for t in texts:
            # surrogatepass: a lone surrogate (possible in Python str, e.g. from JSON) becomes <unk>, not an error
            codes = np.frombuffer(t.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
            ids = self._lut[np.minimum(codes, len(self._lut) - 1)]
            # Counted so that data preparation and generation can say how much text the model never sees.
            self.unknown_chars += int(np.count_nonzero(ids == self.unk_id))
            out.append(ids.tolist())
        return out

    def _decode_plain(self, ids: list[int]) -> str:
        return "".join(self.itos[i] for i in ids)

    def to_dict(self) -> dict:
        return {"type": "char", "version": FORMAT_VERSION, "specials": list(SPECIALS), "chars": self.itos[4:]}


_SURROGATE = re.compile("[\ud800-\udfff]")


class BPETokenizer(_Tokenizer):
    """Byte-level BPE (Hugging Face `tokenizers`): every byte is in the vocabulary, so nothing is ever <unk>."""

    def __init__(self, tokenizer_json: str):
        from tokenizers import Tokenizer

        self._json = tokenizer_json  # kept verbatim so save/load (and the fingerprint) round-trip exactly
        self._tok = Tokenizer.from_str(tokenizer_json)
        # The specials are registered "added tokens", which `tokenizers` would otherwise cut out of raw text
        # ("<eos>" typed by a user -> id 2). This flag is not serialised, so set it on every construction.
        self._tok.encode_special_tokens = True
        if [self._tok.token_to_id(s) for s in SPECIALS] != list(range(len(SPECIALS))):
            raise ValueError(f"BPE tokenizer must have the special tokens {SPECIALS} at ids 0..3")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 1024) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 byte symbols
        if vocab_size < len(SPECIALS) + len(alphabet):
            raise UserError(f"BPE vocab_size must be at least {len(SPECIALS) + len(alphabet)}, got {vocab_size}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        # No normaliser inside the pipeline: `normalize` runs in Python, one NFKC implementation for both classes.
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=list(SPECIALS), initial_alphabet=alphabet, show_progress=False
        )
        tok.train_from_iterator((_valid_unicode(normalize(t)) for t in texts), trainer=trainer)
        return cls(tok.to_str())

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _encode_normalized(self, texts: list[str]) -> list[list[int]]:
        texts = [_valid_unicode(t) for t in texts]
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def _decode_plain(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def to_dict(self) -> dict:
        return {"type": "bpe", "version": FORMAT_VERSION, "specials": list(SPECIALS), "tokenizer": self._json}


def _valid_unicode(text: str) -> str:
    """A lone surrogate has no UTF-8 bytes, so byte-level BPE cannot encode it: it becomes U+FFFD."""
    return _SURROGATE.sub("\ufffd", text) if _SURROGATE.search(text) else text


# ---------------------------------------------------------------------------------------------------------
# A pretrained model's own tokenizer


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
        from .chat_template import render_chat

        if self.chat_template is None:
            raise UserError("this tokenizer has no chat template")
        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           **{**self._template_tokens(), **extra})

    @property
    def stop_ids(self) -> list[int]:
        """eos, plus the special token the chat template writes right after an assistant message
        (`<|im_end|>`, `<|eot_id|>`, ...) when there is one: generation stops at either."""
        from .chat_template import turn_end_token

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


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0][:300]


def _token_content(value, key: str) -> str | None:
    """A special token in tokenizer_config.json: a string, an AddedToken dict {"content": ...}, or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise UserError(f"{key} must be a string or an object with a string 'content', got {type(value).__name__}")


def _default_template(value) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of {"name", "template"}: take "default"."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        template = named.get("default")
        if template is None or isinstance(template, str):
            return template
    raise UserError("chat_template must be a string or a list of {'name', 'template'} objects")


_MAX_MODEL_FILE_BYTES = 1 << 30  # the largest real tokenizer.json is tens of MB


def _read_model_file(path: Path, *, required: bool) -> str | None:
    """A file of a model directory as text. Symlinks are followed: a Hugging Face cache snapshot is all
    symlinks into its blob store."""
    try:
        if not path.exists():
            if required:
                raise UserError(f"no {path.name}" + (" (only a slow tokenizer.model: convert it with transformers "
                                                      "first)" if (path.parent / "tokenizer.model").exists() else ""))
            return None
        if not path.is_file():
            raise UserError(f"{path.name} is not a regular file")
        if path.stat().st_size > _MAX_MODEL_FILE_BYTES:
            raise UserError(f"{path.name} is larger than {_MAX_MODEL_FILE_BYTES >> 20} MiB")
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"cannot read {path.name}: {type(e).__name__}: {_first_line(e)}") from None


def _read_json_object(path: Path) -> dict:
    """An optional JSON object file ({} when absent)."""
    text = _read_model_file(path, required=False)
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path.name} is not valid JSON: {e.msg} (line {e.lineno})") from None
    except RecursionError:
        raise UserError(f"{path.name} is nested too deeply") from None
    if not isinstance(value, dict):
        raise UserError(f"{path.name} must hold a JSON object, not {type(value).__name__}")
    return value


# ---------------------------------------------------------------------------------------------------------
# GGUF: byte-level BPE rebuilt from the metadata


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


# ---------------------------------------------------------------------------------------------------------
# Export for transformers


def save_for_transformers(tokenizer: CharTokenizer | BPETokenizer | HFTokenizer, out_dir: str | Path, *,
                          model_max_length: int | None = None) -> Path:
    """Write tokenizer.json (tokenizers' format), tokenizer_config.json and special_tokens_map.json into
    `out_dir` so that `transformers.AutoTokenizer.from_pretrained(out_dir)` gives our ids:
    `tok(text, add_special_tokens=False)` == `encode(text)`, and `tok(text)` == `encode(text, bos=True)` for
    char/bpe (and for a pretrained tokenizer, whatever its own pipeline adds). Returns `out_dir`.

    char and bpe are exported with NFKC inside the pipeline and `split_special_tokens` (so "<eos>" typed in
    text stays text, as in ours); a char tokenizer becomes a WordLevel over single characters, an unseen
    character -> <unk> (id 3) each. One caveat: transformers' NFKC is tokenizers' (Rust, an older Unicode
    table) and ours is Python's; they differ on a few dozen recently assigned characters.
    """
    tokenizer_json, split_specials = _transformers_pipeline(tokenizer)
    specials = _special_token_strings(tokenizer)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials,
              "add_bos_token": bool(getattr(tokenizer, "add_bos_token", True)), "add_eos_token": False,
              "split_special_tokens": split_specials, "clean_up_tokenization_spaces": False}
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    if tokenizer.chat_template is not None:
        config["chat_template"] = tokenizer.chat_template
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / "tokenizer.json", tokenizer_json)
    _write_text(out / "tokenizer_config.json", json.dumps(config, ensure_ascii=False, indent=2) + "\n")
    _write_text(out / "special_tokens_map.json", json.dumps(specials, ensure_ascii=False, indent=2) + "\n")
    return out


def _write_text(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def _special_token_strings(tokenizer) -> dict:
    if isinstance(tokenizer, HFTokenizer):
        names = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
                 "pad_token": tokenizer.pad_token, "unk_token": tokenizer.unk_token}
        return {k: v for k, v in names.items() if v is not None}
    pad, bos, eos, unk = SPECIALS
    return {"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk}


def _transformers_pipeline(tokenizer) -> tuple[str, bool]:
    """(tokenizers JSON, split_special_tokens) reproducing our encode inside a transformers tokenizer."""
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer._json, False
    from tokenizers import Tokenizer, normalizers, processors

    if isinstance(tokenizer, BPETokenizer):
        tok = Tokenizer.from_str(tokenizer._json)
    elif isinstance(tokenizer, CharTokenizer):
        tok = _char_pipeline(tokenizer)
    else:
        raise TypeError(f"not a llama4dpo tokenizer: {type(tokenizer).__name__}")
    tok.normalizer = normalizers.NFKC()  # ours runs in Python before encoding (`normalize`)
    bos = SPECIALS[tokenizer.bos_id]
    tok.post_processor = processors.TemplateProcessing(  # tok(text) == encode(text, bos=True), as Llama's
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, tokenizer.bos_id)])
    return tok.to_str(), True


def _char_pipeline(tokenizer: CharTokenizer):
    """A WordLevel model over single characters: every character is its own pre-token, looked up whole."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {s: i for i, s in enumerate(tokenizer.itos)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIALS[tokenizer.unk_id]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # any one character
    tok.decoder = decoders.Fuse()  # tokens are joined with nothing between them
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return tok


# ---------------------------------------------------------------------------------------------------------
# Building, saving and loading


def build_tokenizer(kind: str, texts: Iterable[str], vocab_size: int = 1024) -> CharTokenizer | BPETokenizer:
    """Train a tokenizer of `kind` ("char" or "bpe"); `vocab_size` only applies to BPE."""
    if kind == "char":
        return CharTokenizer.train(texts)
    if kind == "bpe":
        return BPETokenizer.train(texts, vocab_size=vocab_size)
    raise UserError(f"unknown tokenizer kind {kind!r} (expected 'char' or 'bpe')")


def tokenizer_from_dict(d: dict) -> CharTokenizer | BPETokenizer | HFTokenizer:
    kind = d.get("type") if isinstance(d, dict) else None
    if kind not in KINDS:
        raise UserError(f"unknown tokenizer type {kind!r} (expected 'char', 'bpe' or 'hf')")
    specials_ok = kind == "hf" or d.get("specials", list(SPECIALS)) == list(SPECIALS)
    if d.get("version") != FORMAT_VERSION or not specials_ok:
        raise UserError(f"unsupported tokenizer format (version {d.get('version')!r}, specials {d.get('specials')})")
    try:
        if kind == "char":
            return CharTokenizer(d["chars"])
        if kind == "bpe":
            return BPETokenizer(d["tokenizer"])
        return HFTokenizer(d["tokenizer"], bos_token=d["bos_token"], eos_token=d["eos_token"],
                           pad_token=d.get("pad_token"), chat_template=d.get("chat_template"),
                           add_bos_token=d.get("add_bos_token", False))
    except Exception as e:  # a missing key, or a corrupt `tokenizers` JSON string (raised from Rust)
        raise UserError(f"corrupt {kind} tokenizer: {type(e).__name__}: {_first_line(e)}") from e


def load_tokenizer(path_or_dir: str | Path) -> CharTokenizer | BPETokenizer | HFTokenizer:
    """Load `tokenizer.json` (or `DIR/tokenizer.json`). Every failure is a one-line UserError naming the file.

    A transformers model's own tokenizer.json (tokenizers' format, no "type") loads its whole directory
    with HFTokenizer.from_pretrained_dir."""
    path = Path(path_or_dir)
    try:
        if path.is_dir():
            path = path / "tokenizer.json"
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"tokenizer file not found: {path}") from None
    except (OSError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"cannot read tokenizer file {path}: {type(e).__name__}: {e}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"tokenizer file {path} is not valid JSON: {e.msg} (line {e.lineno})") from None
    except ValueError as e:  # e.g. a NUL byte in the path
        raise UserError(f"cannot read tokenizer file {path!r}: {e}") from None
    if _is_transformers_tokenizer(d) and path.name == "tokenizer.json":
        return HFTokenizer.from_pretrained_dir(path.parent)
    try:
        return tokenizer_from_dict(d)
    except UserError as e:
        raise UserError(f"tokenizer file {path}: {e}") from None


def _is_transformers_tokenizer(d) -> bool:
    return isinstance(d, dict) and "type" not in d and isinstance(d.get("model"), dict)
