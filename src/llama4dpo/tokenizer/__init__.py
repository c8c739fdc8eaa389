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

from .base import FORMAT_VERSION, KINDS, SPECIALS, normalize
from .bpe import BPETokenizer
from .char import CharTokenizer
from .export import save_for_transformers
from .hf import HFTokenizer
from .load import build_tokenizer, load_tokenizer, tokenizer_from_dict

__all__ = ["SPECIALS", "FORMAT_VERSION", "KINDS", "normalize", "CharTokenizer", "BPETokenizer", "HFTokenizer",
           "save_for_transformers", "build_tokenizer", "tokenizer_from_dict", "load_tokenizer"]
