"""Two tokenizers with one API: the notebook's character tokenizer and a byte-level BPE.

Both reserve the same special ids (<pad>=0, <bos>=1, <eos>=2, <unk>=3), normalise text with NFKC the same
way at train and encode time, and save to one JSON file (`tokenizer.json`, never pickle):

    {"type": "char", "version": 1, "specials": [...], "chars": ["\\n", " ", "!", ...]}
    {"type": "bpe",  "version": 1, "specials": [...], "tokenizer": "<Hugging Face tokenizers JSON string>"}

User text is data: a literal "<eos>" in it is encoded as ordinary characters/bytes. Only the `bos=True` /
`eos=True` flags of `encode` put special ids into a sequence.
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

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0..3 in both tokenizers
FORMAT_VERSION = 1


def normalize(text: str) -> str:
    """NFKC: folds compatibility forms ("ﬁ" -> "fi", "１２" -> "12") so training and inference agree."""
    return unicodedata.normalize("NFKC", text)


class _Tokenizer:
    """The shared half: special ids, bos/eos flags, decoding around specials, JSON save and fingerprint."""

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3
    unknown_chars = 0  # characters encoded as <unk> by this object so far (byte-level BPE: never any)

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
        out = self._encode_normalized([normalize(t) for t in texts])
        head, tail = [self.bos_id] * bos, [self.eos_id] * eos
        return [head + ids + tail for ids in out] if (bos or eos) else out

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


def build_tokenizer(kind: str, texts: Iterable[str], vocab_size: int = 1024) -> CharTokenizer | BPETokenizer:
    """Train a tokenizer of `kind` ("char" or "bpe"); `vocab_size` only applies to BPE."""
    if kind == "char":
        return CharTokenizer.train(texts)
    if kind == "bpe":
        return BPETokenizer.train(texts, vocab_size=vocab_size)
    raise UserError(f"unknown tokenizer kind {kind!r} (expected 'char' or 'bpe')")


def tokenizer_from_dict(d: dict) -> CharTokenizer | BPETokenizer:
    if not isinstance(d, dict) or d.get("type") not in ("char", "bpe"):
        kind = d.get("type") if isinstance(d, dict) else None
        raise UserError(f"unknown tokenizer type {kind!r} (expected 'char' or 'bpe')")
    if d.get("version") != FORMAT_VERSION or d.get("specials", list(SPECIALS)) != list(SPECIALS):
        raise UserError(f"unsupported tokenizer format (version {d.get('version')!r}, specials {d.get('specials')})")
    try:
        return CharTokenizer(d["chars"]) if d["type"] == "char" else BPETokenizer(d["tokenizer"])
    except Exception as e:  # a missing key, or a corrupt `tokenizers` JSON string (raised from Rust)
        first_line = (str(e).splitlines() or [""])[0]
        raise UserError(f"corrupt {d['type']} tokenizer: {type(e).__name__}: {first_line}") from e


def load_tokenizer(path_or_dir: str | Path) -> CharTokenizer | BPETokenizer:
    """Load `tokenizer.json` (or `DIR/tokenizer.json`). Every failure is a one-line UserError naming the file."""
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
    try:
        return tokenizer_from_dict(d)
    except UserError as e:
        raise UserError(f"tokenizer file {path}: {e}") from None
