"""A dense Llama (transformers' LlamaForCausalLM) through import-hf and export-hf: logit parity both ways on random
tiny configs, a negative control for the q/k row order, sharded weights, and one-line errors for what we cannot run."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from llama4dpo import Config, load_model  # noqa: E402
from llama4dpo.checkpoint import load_config  # noqa: E402
from llama4dpo.cli import main  # noqa: E402

from test_attack_interop import edit_config  # noqa: E402  (damages a copy's config.json)
from llama4dpo.errors import ConfigError  # noqa: E402
from llama4dpo.interop import llama as llama_interop  # noqa: E402

BASE = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=512)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16, "rope_theta": 500000.0}
# Together: GQA, MHA and MQA; tied and untied embeddings; llama3 RoPE scaling (with its theta inside
# rope_parameters, as transformers 5 writes it); q/k/v/o biases; a head_dim other than hidden / heads.
CONFIGS = {
    "gqa-untied": dict(num_key_value_heads=2),
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "gqa-llama3-rope": dict(num_key_value_heads=2, rope_parameters=LLAMA3),
    "mqa-bias-head_dim32": dict(num_key_value_heads=1, attention_bias=True, head_dim=32),
    "tied-bias-llama3": dict(num_key_value_heads=2, tie_word_embeddings=True, attention_bias=True,
                             rope_parameters=LLAMA3),
}


def hf_model(kw, base=BASE):
    """A LlamaForCausalLM with every parameter random and far from transformers' init (biases zero, norms one,
    std 0.02), so that attention is sharp and a wrong q/k order, bias or norm shows in the logits."""
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(LlamaConfig(**{**base, **kw}), attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.1)
    return model


def save(model, path, **kw):
    model.save_pretrained(path, safe_serialization=True, **kw)
    return path


def ids(batch=2, length=40, vocab=100):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


def max_diff(hf, ours, x):
    with torch.no_grad():
        return (hf(x, use_cache=False).logits - ours(x)).abs().max().item()


def import_hf(hf_dir, ckpt):
    assert main(["import-hf", str(hf_dir), str(ckpt)]) == 0
    return load_model(ckpt)


@pytest.mark.parametrize("name", CONFIGS)
def test_import_and_export_match_transformers(tmp_path, name):
    hf = hf_model(CONFIGS[name])
    ours = import_hf(save(hf, tmp_path / "hf"), tmp_path / "ours")
    x = ids()
    diff = max_diff(hf, ours, x)
    assert diff <= 1e-5, f"{name} import: max |diff| {diff}"
    m = load_config(tmp_path / "ours").model
    assert m.family == "llama" and m.source == f"LlamaForCausalLM from {(tmp_path / 'hf').resolve()}"
    assert m.moe_layer_ids == [] and all(m.rope_layer_flags) and not m.use_qk_norm

    assert main(["export-hf", str(tmp_path / "ours"), str(tmp_path / "out")]) == 0
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(back) is LlamaForCausalLM
    with torch.no_grad():
        diff = (hf(x, use_cache=False).logits - back(x, use_cache=False).logits).abs().max().item()
    assert diff <= 1e-5, f"{name} export: max |diff| {diff}"
    original, exported = hf.state_dict(), back.state_dict()  # the rows back in transformers' order, exactly
    assert set(original) == set(exported) and all(torch.equal(original[k], exported[k]) for k in original)


def test_export_reimports_unchanged(tmp_path):
    """Our export writes rope_theta and rope_scaling beside each other (what transformers 4 writes): read back too."""
    hf = hf_model(CONFIGS["tied-bias-llama3"])
    ours = import_hf(save(hf, tmp_path / "hf"), tmp_path / "ours")
    assert main(["export-hf", str(tmp_path / "ours"), str(tmp_path / "out")]) == 0
    assert "rope_scaling" in json.loads((tmp_path / "out" / "config.json").read_text())
    again = import_hf(tmp_path / "out", tmp_path / "again")
    x = ids()
    with torch.no_grad():
        assert torch.equal(ours(x), again(x))
    assert load_config(tmp_path / "again").model.rope_theta == 500000.0


def test_negative_control_without_the_qk_reorder_is_detected(tmp_path, monkeypatch):
    """The comparison is sharp enough to catch the mistake this mapping exists to avoid: rotate_half rows as ours."""
    hf = hf_model(CONFIGS["gqa-llama3-rope"])
    save(hf, tmp_path / "hf")
    x = ids()
    good = max_diff(hf, import_hf(tmp_path / "hf", tmp_path / "good"), x)
    monkeypatch.setattr(llama_interop, "to_interleaved", lambda t, heads: t)
    bad = max_diff(hf, import_hf(tmp_path / "hf", tmp_path / "bad"), x)
    assert good <= 1e-5 and bad > 1e-3, (good, bad)


def test_sharded_checkpoint(tmp_path):
    hf = hf_model(CONFIGS["gqa-untied"])
    save(hf, tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) >= 3
    diff = max_diff(hf, import_hf(tmp_path / "hf", tmp_path / "ours"), ids())
    assert diff <= 1e-5, diff


def test_stored_rotary_frequencies_are_skipped(tmp_path):
    """Older conversions saved each layer's rotary_emb.inv_freq; transformers and we recompute it."""
    hf = hf_model(CONFIGS["gqa-llama3-rope"])
    sd = load_file(str(save(hf, tmp_path / "hf") / "model.safetensors"))
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(sd, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    assert max_diff(hf, import_hf(tmp_path / "hf", tmp_path / "ours"), ids()) <= 1e-5


# ---- what we cannot run: one line naming it ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save(hf_model(CONFIGS["mha-tied"]), tmp_path_factory.mktemp("llama") / "hf")


def distinct_lm_head(hf):  # a tied config, yet a stored head that is not the embedding
    sd = load_file(str(hf / "model.safetensors"))
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"] + 1
    save_file(sd, str(hf / "model.safetensors"), metadata={"format": "pt"})


REFUSED = {
    "model_type-qwen2": (edit_config(model_type="qwen2", architectures=["Qwen2ForCausalLM"]),
                         ["config.json", "'qwen2'", "Qwen2ForCausalLM", "not supported"]),
    "architectures-classifier": (edit_config(architectures=["LlamaForSequenceClassification"]),
                                 ["config.json", "LlamaForSequenceClassification", "not supported"]),
    "mlp_bias": (edit_config(mlp_bias=True), ["config.json", "mlp_bias"]),
    "hidden_act-gelu": (edit_config(hidden_act="gelu"), ["config.json", "hidden_act", "gelu"]),
    "rope-linear": (edit_config(rope_parameters={"rope_type": "linear", "factor": 2.0}), ["config.json", "linear"]),
    "no-intermediate_size": (edit_config(intermediate_size=None), ["config.json", "intermediate_size"]),
    "a-trillion-layers": (edit_config(num_hidden_layers=10**12), ["config.json", "model.num_hidden_layers"]),
    "tied-distinct-lm_head": (distinct_lm_head, ["model.safetensors", "lm_head.weight", "not the embedding", "tie_word_embeddings"]),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused_input_is_one_line_error(saved, tmp_path, case, capsys):
    damage, names = REFUSED[case]
    hf = shutil.copytree(saved, tmp_path / "hf")
    damage(hf)
    assert main(["import-hf", str(hf), str(tmp_path / "back")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert all(name in err for name in names), (names, err)
    assert not (tmp_path / "back").exists()


# ---- the family field -------------------------------------------------------------------------------------------

def test_configs_without_family_or_source_load_as_llama4():
    d = Config.load("tiny").to_dict()
    del d["model"]["family"], d["model"]["source"]  # a checkpoint's config.json from before these fields
    m = Config.from_dict(d).model
    assert m.family == "llama4" and m.source is None


@pytest.mark.parametrize("overrides, message", [
    (["model.family=gpt2"], "model.family: must be 'llama4' or 'llama'"),
    (["model.family=llama"], "model.moe_layers: family 'llama' (a dense Llama) needs []"),
    (["model.family=llama", "model.moe_layers=[]"], "model.no_rope_layers"),
    (["model.family=llama", "model.moe_layers=[]", "model.no_rope_layers=[1,1,1,1]"], "model.attention_chunk_size"),
])
def test_family_llama_needs_a_dense_llama(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        Config.load("tiny", overrides)


def test_export_tokenizer_loads_with_autotokenizer_and_import_reads_the_models_own(tmp_path):
    """Our checkpoint's tokenizer exports for AutoTokenizer (same ids), and a transformers directory's own
    tokenizer.json comes back in as an HF tokenizer."""
    from transformers import AutoTokenizer

    from llama4dpo.checkpoint import load_tokenizer

    run = tmp_path / "run"
    assert main(["pretrain", "--config", "tiny", "--data", "builtin:assistant", "--quiet", "--out", str(run),
                 "train.max_steps=1"]) == 0
    assert main(["export-hf", str(run / "final"), str(tmp_path / "hf")]) == 0
    ours = load_tokenizer(run / "final")
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in ["What is 2 + 3?", "hello  world\n", "unseen ☃ chars"]:
        assert theirs(text)["input_ids"] == ours.encode(text, bos=True)
    (tmp_path / "hf" / "llama4dpo_tokenizer.json").unlink()  # as a model from elsewhere: only HF's files
    (tmp_path / "hf" / "manifest.json").unlink()
    assert main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    back = load_tokenizer(tmp_path / "back")
    assert type(back).__name__ == "HFTokenizer"
    assert back.encode("What is 2 + 3?", bos=True) == theirs("What is 2 + 3?")["input_ids"]


def hub_snapshot(hf_dir, root):
    """hf_dir laid out as the Hugging Face hub cache does: snapshots/REV/NAME -> ../../blobs/HASH."""
    repo = root / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(hf_dir.iterdir())):
        shutil.move(f, repo / "blobs" / f"blob{i}")
        (snap / f.name).symlink_to(f"../../blobs/blob{i}")
    return snap


def test_import_reads_a_hub_cache_snapshot_whose_files_are_links_into_blobs(tmp_path):
    hf = hf_model(CONFIGS["gqa-untied"])
    snap = hub_snapshot(save(hf, tmp_path / "hf"), tmp_path / "hub")
    assert all(f.is_symlink() for f in snap.iterdir())
    ours = import_hf(snap, tmp_path / "ours")
    assert max_diff(hf, ours, ids()) <= 1e-5


def test_a_hub_snapshot_link_leading_anywhere_but_its_blobs_is_refused(tmp_path, capsys):
    snap = hub_snapshot(save(hf_model(CONFIGS["gqa-untied"]), tmp_path / "hf"), tmp_path / "hub")
    elsewhere = tmp_path / "elsewhere.safetensors"
    shutil.copy(snap / "model.safetensors", elsewhere)
    (snap / "model.safetensors").unlink()
    (snap / "model.safetensors").symlink_to(elsewhere)  # a valid file, but outside the repository's blobs/
    capsys.readouterr()
    assert main(["import-hf", str(snap), str(tmp_path / "ours")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "symbolic link" in err
    assert not (tmp_path / "ours").exists()
