"""HFTokenizer and save_for_transformers: the same ids as transformers' AutoTokenizer, from a transformers
directory, from GGUF metadata, and for our own char/bpe tokenizers exported to transformers."""

import json
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama4dpo.errors import UserError
from llama4dpo.tokenizer import (
    BPETokenizer,
    CharTokenizer,
    HFTokenizer,
    load_tokenizer,
    save_for_transformers,
    tokenizer_from_dict,
)

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
from tokenizers import (  # noqa: E402
    Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers)

CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>"]
CHATML_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
                   "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = ["The cat sat on the mat. It's 12345 o'clock!", "naïve café 日本語 ﬁle １２ \t\tindent\n\nnew  lines",
          "def f(x):\n    return x ** 2  # comment", "Hello, WORLD... I'LL be back 🙂 — ok?",
          "<|im_start|>user\nhi<|im_end|>"] * 40

# ≥ 1,000 strings per property test: BATCH strings per example, EXAMPLES examples.
BATCH, EXAMPLES = 8, 130
PROPERTY = settings(max_examples=EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
WHITESPACE = st.text(alphabet=" \t\n\r\u00a0\u3000\u2028", min_size=1, max_size=6)
WORDS = st.sampled_from(["'s", "'LL", "123456", "ﬁ", "é", "e\u0301", "日本語", "🙂", "x" * 30, "<eos>", "<bos>",
                         *CHATML_SPECIALS, *LLAMA3_SPECIALS])


def texts(chars=None):
    piece = st.one_of(st.text(max_size=12) if chars is None else st.text(alphabet=chars, max_size=12),
                      WHITESPACE, WORDS)
    return st.lists(st.lists(piece, max_size=8).map("".join), min_size=BATCH, max_size=BATCH)


def nfkc_agrees(text: str) -> bool:
    """Python's NFKC (ours) and tokenizers' (transformers') use different Unicode versions."""
    return normalizers.NFKC().normalize_str(text) == unicodedata.normalize("NFKC", text)


def byte_level_bpe(specials, pre_tokenizer, *, ignore_merges=False, vocab_size=600) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if ignore_merges:  # as Llama 3's tokenizer.json
        d = json.loads(tok.to_str())
        d["model"]["ignore_merges"] = True
        tok = Tokenizer.from_str(json.dumps(d))
    return tok


def smollm_pre():
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])


def llama3_pre():
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    """A SmolLM2-like model directory, written by transformers itself (chat_template.jinja, no pad token)."""
    tok = byte_level_bpe(CHATML_SPECIALS, smollm_pre())
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                                eos_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    d = tmp_path_factory.mktemp("chatml")
    fast.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    """A Llama-3-like directory in the transformers 4 layout: AddedToken dicts, named chat templates,
    special_tokens_map.json, and a post-processor that prepends <|begin_of_text|>."""
    tok = byte_level_bpe(LLAMA3_SPECIALS, llama3_pre(), ignore_merges=True)
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    d = tmp_path_factory.mktemp("llama3")
    (d / "tokenizer.json").write_text(tok.to_str())
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for t in LLAMA3_SPECIALS}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": added,
              "bos_token": {"__type": "AddedToken", "content": bos, "lstrip": False, "normalized": False,
                            "rstrip": False, "single_word": False, "special": True},
              "eos_token": "<|eot_id|>",
              "pad_token": "<|end_of_text|>", "clean_up_tokenization_spaces": False,
              "chat_template": [{"name": "tool_use", "template": "{{ 'tools' }}"},
                                {"name": "default", "template": LLAMA3_TEMPLATE}]}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "special_tokens_map.json").write_text(json.dumps({"bos_token": bos, "eos_token": "<|eot_id|>"}))
    return d


@pytest.fixture(scope="module", params=["chatml", "llama3"])
def model_dir(request, chatml_dir, llama3_dir):
    return chatml_dir if request.param == "chatml" else llama3_dir


def auto(path):
    return transformers.AutoTokenizer.from_pretrained(str(path))


# ---------------------------------------------------------------------------------------------------------
# From a transformers directory


@PROPERTY
@given(batch=texts())
def test_ids_equal_transformers(model_dir, batch):
    ours, theirs = HFTokenizer.from_pretrained_dir(model_dir), auto(model_dir)
    for text in batch:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ours.encode(text, bos=ours.add_bos_token) == theirs.encode(text)  # transformers' default call
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special=False) == theirs.decode(ids, skip_special_tokens=False)


def test_directory_fields(chatml_dir, llama3_dir):
    chatml = HFTokenizer.from_pretrained_dir(chatml_dir)
    assert (chatml.bos_token, chatml.eos_token, chatml.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert chatml.pad_id == chatml.eos_id  # no pad token: pad falls back to eos
    assert chatml.chat_template == CHATML_TEMPLATE and chatml.add_bos_token is False
    assert chatml.special_tokens == CHATML_SPECIALS and chatml.unk_id is None and chatml.unknown_chars == 0
    assert chatml.vocab_size == auto(chatml_dir).vocab_size == len(auto(chatml_dir))

    llama = HFTokenizer.from_pretrained_dir(llama3_dir)
    assert llama.bos_token == "<|begin_of_text|>" and llama.eos_token == "<|eot_id|>"
    assert llama.pad_token == "<|end_of_text|>" and llama.pad_id != llama.eos_id
    assert llama.chat_template == LLAMA3_TEMPLATE  # the "default" of the named templates
    assert llama.add_bos_token is True  # read off the post-processor
    assert llama.encode("hi", bos=True, eos=True) == [llama.bos_id, *llama.encode("hi"), llama.eos_id]


def test_not_nfkc_normalized(chatml_dir):
    tok = HFTokenizer.from_pretrained_dir(chatml_dir)
    assert tok.applies_nfkc is False
    assert tok.encode("ﬁ") != tok.encode("fi") and tok.decode(tok.encode("ﬁ１")) == "ﬁ１"


def test_special_tokens_in_text_are_control_tokens_like_transformers(chatml_dir):
    tok = HFTokenizer.from_pretrained_dir(chatml_dir)
    ids = tok.encode("a<|im_end|>b")
    assert tok.eos_id in ids and tok.decode(ids) == "ab" and tok.decode(ids, skip_special=False) == "a<|im_end|>b"


def test_out_of_range_ids_are_dropped(chatml_dir):
    tok = HFTokenizer.from_pretrained_dir(chatml_dir)
    assert tok.decode([tok.vocab_size, -1, 10**9]) == ""


def test_save_load_round_trip(llama3_dir, tmp_path):
    tok = HFTokenizer.from_pretrained_dir(llama3_dir)
    path = tok.save(tmp_path)
    assert json.loads(path.read_text())["type"] == "hf"
    for loaded in (load_tokenizer(tmp_path), tokenizer_from_dict(tok.to_dict())):
        assert type(loaded) is HFTokenizer and loaded.fingerprint() == tok.fingerprint()
        assert loaded.to_dict() == tok.to_dict() and loaded.vocab_size == tok.vocab_size
        assert loaded.encode_batch(CORPUS[:5], bos=True) == tok.encode_batch(CORPUS[:5], bos=True)
    assert HFTokenizer.from_pretrained_dir(llama3_dir).fingerprint() == tok.fingerprint()
    # A transformers directory loads through load_tokenizer too.
    assert load_tokenizer(llama3_dir).fingerprint() == tok.fingerprint()


def test_corrupt_hf_dict_is_one_line_user_error(llama3_dir):
    d = HFTokenizer.from_pretrained_dir(llama3_dir).to_dict()
    for key, value in [("tokenizer", "{oops"), ("eos_token", "<|nope|>"), ("bos_token", 5), ("tokenizer", None)]:
        with pytest.raises(UserError, match="corrupt hf tokenizer") as e:
            tokenizer_from_dict({**d, key: value})
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("change, match", [
    (lambda d: (d / "tokenizer.json").unlink(), "no tokenizer.json"),
    (lambda d: (d / "tokenizer.json").write_text("{not json"), "not a Hugging Face tokenizers JSON"),
    (lambda d: (d / "tokenizer_config.json").write_text("[1]"), "must hold a JSON object"),
    (lambda d: (d / "tokenizer_config.json").write_text("{"), "tokenizer_config.json is not valid JSON"),
    (lambda d: (d / "tokenizer_config.json").write_text('{"eos_token": "<|missing|>"}'), "not in the tokenizer"),
    (lambda d: (d / "tokenizer_config.json").write_text('{"eos_token": 7}'), "eos_token must be a string"),
    (lambda d: (d / "tokenizer_config.json").write_text('{"eos_token": null}'), "names no eos token"),
    (lambda d: (d / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>", "chat_template": 3}'),
     "chat_template must be"),
    (lambda d: (d / "chat_template.jinja").mkdir(), "not a regular file"),
])
def test_bad_directory_is_one_line_user_error(chatml_dir, tmp_path, change, match):
    for f in chatml_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "chat_template.jinja").unlink()
    change(tmp_path)
    with pytest.raises(UserError, match=match) as e:
        HFTokenizer.from_pretrained_dir(tmp_path)
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)


# ---------------------------------------------------------------------------------------------------------
# From GGUF metadata


def write_gguf(path, tok: Tokenizer, *, pre: str, bos: str | None, eos: str, pad: str | None, add_bos: bool,
               template: str | None):
    """A GGUF holding only tokenizer metadata, as llama.cpp's convert_hf_to_gguf writes it for a BPE model."""
    gguf = pytest.importorskip("gguf")
    d = json.loads(tok.to_str())
    by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    tokens = [by_id[i] for i in range(len(by_id))]
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in d["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(tokens.index(eos))
    if bos is not None:
        w.add_bos_token_id(tokens.index(bos))
    if pad is not None:
        w.add_pad_token_id(tokens.index(pad))
    w.add_add_bos_token(add_bos)
    if template is not None:
        w.add_chat_template(template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_gguf_fields(path) -> dict:
    """What the GGUF importer hands over: key -> plain Python value."""
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(path))
    return {name: field.contents() for name, field in reader.fields.items() if name.startswith("tokenizer.")}


@pytest.fixture(scope="module", params=["llama3", "smollm"])
def gguf_pair(request, tmp_path_factory, chatml_dir, llama3_dir):
    """(the source directory's tokenizer, the one rebuilt from its GGUF)."""
    path = tmp_path_factory.mktemp("gguf") / "model.gguf"
    if request.param == "llama3":
        source = HFTokenizer.from_pretrained_dir(llama3_dir)
        write_gguf(path, source._tok, pre="llama-bpe", bos="<|begin_of_text|>", eos="<|eot_id|>",
                   pad="<|end_of_text|>", add_bos=True, template=LLAMA3_TEMPLATE)
    else:
        source = HFTokenizer.from_pretrained_dir(chatml_dir)
        write_gguf(path, source._tok, pre="smollm", bos="<|im_start|>", eos="<|im_end|>", pad=None,
                   add_bos=False, template=CHATML_TEMPLATE)
    return source, HFTokenizer.from_gguf_fields(read_gguf_fields(path))


@PROPERTY
@given(batch=texts())
def test_gguf_ids_equal_source(gguf_pair, batch):
    source, rebuilt = gguf_pair
    assert rebuilt.encode_batch(batch, bos=True) == source.encode_batch(batch, bos=True)
    for text in batch:
        assert rebuilt.decode(source.encode(text)) == source.decode(source.encode(text))


def test_gguf_fields(gguf_pair):
    source, rebuilt = gguf_pair
    same = ("bos_id", "eos_id", "pad_id", "vocab_size", "chat_template", "add_bos_token", "special_tokens")
    assert {k: getattr(rebuilt, k) for k in same} == {k: getattr(source, k) for k in same}
    assert rebuilt.stop_ids == source.stop_ids
    assert tokenizer_from_dict(rebuilt.to_dict()).fingerprint() == rebuilt.fingerprint()


@pytest.mark.parametrize("change, match", [
    ({"tokenizer.ggml.model": "llama"}, "tokenizer.ggml.model 'llama' is not supported"),
    ({"tokenizer.ggml.model": None}, "tokenizer.ggml.model None is not supported"),
    ({"tokenizer.ggml.pre": "qwen2"}, "tokenizer.ggml.pre 'qwen2' is not supported"),
    ({"tokenizer.ggml.eos_token_id": None}, "eos_token_id must be a token id"),
    ({"tokenizer.ggml.bos_token_id": 10**9}, "bos_token_id must be a token id"),
    ({"tokenizer.ggml.tokens": "abc"}, "tokens must be a list of str"),
    ({"tokenizer.ggml.merges": ["nospace"]}, "bad merge"),
    ({"tokenizer.ggml.merges": ["zz yy"]}, "cannot build the BPE model"),
    ({"tokenizer.ggml.token_type": [1]}, "one type per token"),
])
def test_bad_gguf_fields_are_one_line_user_error(change, match):
    tokens = ["a", "b", "ab", "<|end|>"]
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": tokens,
              "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.token_type": [1, 1, 1, 3],
              "tokenizer.ggml.eos_token_id": 3}
    assert HFTokenizer.from_gguf_fields(fields).encode("ab<|end|>") == [2, 3]
    with pytest.raises(UserError, match=match) as e:
        HFTokenizer.from_gguf_fields({**fields, **change})
    assert "\n" not in str(e.value) and str(e.value).startswith("GGUF tokenizer:")


# ---------------------------------------------------------------------------------------------------------
# save_for_transformers: char, bpe and HF kinds


CHAR_CORPUS = ["the cat sat on the mat", "naïve café ﬁle １２ <eos>", "Hello, World! 42\n\ttab"]


@pytest.fixture(scope="module")
def char_export(tmp_path_factory):
    tok = CharTokenizer.train(CHAR_CORPUS)
    return tok, auto(save_for_transformers(tok, tmp_path_factory.mktemp("char"), model_max_length=64))


@pytest.fixture(scope="module")
def bpe_export(tmp_path_factory):
    tok = BPETokenizer.train(CORPUS, vocab_size=400)
    return tok, auto(save_for_transformers(tok, tmp_path_factory.mktemp("bpe")))


@pytest.fixture(scope="module")
def hf_export(tmp_path_factory, llama3_dir):
    tok = HFTokenizer.from_pretrained_dir(llama3_dir)
    return tok, auto(save_for_transformers(tok, tmp_path_factory.mktemp("hf")))


def check_same_ids(ours, theirs, batch):
    for text in filter(nfkc_agrees, batch):
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), text
        assert ours.encode(text, bos=getattr(ours, "add_bos_token", True)) == theirs.encode(text), text
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs.encode(text), skip_special_tokens=True)


# Characters of the char tokenizer's vocabulary, plus unseen ones (each -> <unk>, id 3, in both).
CHAR_ALPHABET = sorted(set("".join(CHAR_CORPUS)) | set("fi12€日\u00a0\U0001f600"))


@PROPERTY
@given(batch=texts(chars=CHAR_ALPHABET))
def test_char_export_gives_our_ids(char_export, batch):
    check_same_ids(*char_export, batch)


@PROPERTY
@given(batch=texts())
def test_bpe_export_gives_our_ids(bpe_export, batch):
    check_same_ids(*bpe_export, batch)


@PROPERTY
@given(batch=texts())
def test_hf_export_gives_our_ids(hf_export, batch):
    check_same_ids(*hf_export, batch)


def test_char_export_unknown_characters_are_unk(char_export):
    ours, theirs = char_export
    assert ours.encode("a€b") == theirs.encode("a€b", add_special_tokens=False)
    assert ours.encode("a€b")[1] == ours.unk_id == theirs.unk_token_id == 3
    assert ours.encode("x<eos>") == theirs.encode("x<eos>", add_special_tokens=False)  # specials stay text


def test_export_config_files(char_export, hf_export, tmp_path):
    ours, theirs = char_export
    assert theirs.model_max_length == 64
    assert (theirs.bos_token, theirs.eos_token, theirs.pad_token, theirs.unk_token) == ("<bos>", "<eos>", "<pad>",
                                                                                      "<unk>")
    tok, theirs = hf_export
    assert theirs.eos_token == tok.eos_token and theirs.chat_template == tok.chat_template
    out = save_for_transformers(tok, tmp_path)
    assert {p.name for p in out.iterdir()} == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["chat_template"] == tok.chat_template
    assert "model_max_length" not in config
    # The export reads back as the same tokenizer.
    assert HFTokenizer.from_pretrained_dir(out).fingerprint() == tok.fingerprint()
