"""The notebook's character tokenizer: one id per character seen in training, a numpy lookup table."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from .base import FORMAT_VERSION, SPECIALS, _Tokenizer, normalize


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
