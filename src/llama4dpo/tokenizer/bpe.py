"""Our byte-level BPE, trained with Hugging Face `tokenizers` (imported lazily): nothing is ever <unk>."""

from __future__ import annotations

from typing import Iterable

from ..errors import UserError
from .base import FORMAT_VERSION, SPECIALS, _Tokenizer, _valid_unicode, normalize


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
