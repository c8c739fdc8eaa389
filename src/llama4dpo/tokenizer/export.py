"""`save_for_transformers`: any of our tokenizers written as a transformers tokenizer directory giving the
same ids."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from .base import SPECIALS
from .bpe import BPETokenizer
from .char import CharTokenizer
from .hf import HFTokenizer


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
