"""What every tokenizer shares: the special tokens and ids, NFKC `normalize`, and the base class with
encode/decode around specials, JSON save and the fingerprint."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from pathlib import Path
from typing import Sequence

from ..errors import UserError

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


_SURROGATE = re.compile("[\ud800-\udfff]")


def _valid_unicode(text: str) -> str:
    """A lone surrogate has no UTF-8 bytes, so byte-level BPE cannot encode it: it becomes U+FFFD."""
    return _SURROGATE.sub("\ufffd", text) if _SURROGATE.search(text) else text


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0][:300]
