"""LoRA runs through the real CLI (issue #24): sft and dpo train only the adapters, DPO's reference is the policy
with its adapters off (loss ln 2 at step 0, the base checkpoint's own log-probs), adapter checkpoints name and
check their base, resume after SIGKILL is bitwise exact, `merge` folds the adapters in (then transformers loads
the export), and generate/eval/info read adapter checkpoints directly."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llama4dpo import Config, ModelConfig, LlamaModel, load_model, save_model
from llama4dpo.checkpoint import load_tokenizer
from llama4dpo.checkpoint.adapters import base_record
from llama4dpo.cli import main
from llama4dpo.data import load_preference_data, preference_collator
from llama4dpo.metrics import read_metrics
from llama4dpo.model.lora import ExpertAdapters, WithoutAdapters, apply_lora, lora_modules
from llama4dpo.objectives import pair_logps

from test_train_cli import run_cli, strip_timing

TINY = str(Path(__file__).parent.parent / "configs" / "tiny.toml")
COMMON = ["--config", TINY, "--data", "builtin:assistant", "--quiet", "data.builtin_size=120", "train.batch_size=4"]
LORA = ["lora.rank=4", "lora.alpha=8"]


def dpo(out, init, *extra):
    return main(["dpo", *COMMON, "--out", str(out), "--init", str(init), *LORA, "train.lr=3e-3", *extra])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A briefly pretrained base, and LoRA DPO on it for 8 steps."""
    root = tmp_path_factory.mktemp("lora")
    assert main(["pretrain", *COMMON, "--out", str(root / "pre"), "train.max_steps=20"]) == 0
    assert dpo(root / "dpo", root / "pre", "train.max_steps=8", "train.eval_every=4", "train.log_every=1") == 0
    return root


def test_dpo_starts_at_ln2_and_writes_only_the_adapters(runs):
    rows = read_metrics(runs / "dpo" / "metrics.jsonl")
    assert rows[0]["step"] == 0 and rows[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[1]["step"] == 1 and rows[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[-1]["eval_loss"] < math.log(2) - 1e-3  # and it learned something
    final = runs / "dpo" / "final"
    assert not (final / "model.safetensors").exists()
    saved = load_file(str(final / "adapters.safetensors"))
    adapted = load_model(final, merge=False)
    assert set(saved) == {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert all(".lora_" in k or ".adapters." in k for k in saved)
    assert json.loads((final / "base.json").read_text())["base"] == str((runs / "pre" / "final").resolve())


def pairs_batch(ckpt):
    tok = load_tokenizer(ckpt)
    cfg = Config.load(TINY, ["data.builtin_size=120"])
    data = load_preference_data("builtin:assistant", cfg.data, tok)
    return preference_collator(True)([data.eval[i] for i in range(6)], pad_id=tok.pad_id)


def test_reference_with_adapters_off_is_the_base_checkpoint(runs):
    adapted = load_model(runs / "dpo" / "final", merge=False)
    base = load_model(runs / "pre" / "final")
    assert any(m.gate_up_B.abs().sum() > 0 for m in lora_modules(adapted) if isinstance(m, ExpertAdapters))
    batch = pairs_batch(runs / "pre" / "final")
    with torch.no_grad():
        ref, _ = pair_logps(WithoutAdapters(adapted), batch)
        own, _ = pair_logps(base, batch)
        policy, _ = pair_logps(adapted, batch)
    assert (ref - own).abs().max() <= 1e-6
    assert (policy - own).abs().max() > 1e-3  # (the adapters do change the policy)


def test_info_prints_the_trainable_share(runs, capsys):
    assert main(["info", str(runs / "dpo")]) == 0
    out = capsys.readouterr().out
    assert "LoRA adapters" in out and "trainable parameters of" in out and str((runs / "pre" / "final").resolve()) in out


def test_merge_equals_the_adapted_model_and_exports_to_transformers(runs, tmp_path):
    transformers = pytest.importorskip("transformers")
    assert main(["merge", str(runs / "dpo"), str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    adapted = load_model(runs / "dpo" / "final", merge=False)
    merged = load_model(tmp_path / "merged")
    x = torch.randint(0, adapted.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = adapted(x)
        assert (merged(x) - want).abs().max() <= 1e-5
    assert main(["export-hf", str(tmp_path / "merged"), str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    with torch.no_grad():
        assert (hf(x, use_cache=False).logits - want).abs().max() <= 1e-5
    assert main(["merge", str(tmp_path / "merged"), str(tmp_path / "again")]) == 2  # nothing to merge: one line
    assert main(["merge", str(runs / "dpo"), str(runs / "pre" / "final")]) == 2  # over its own base: refused
    assert (runs / "pre" / "final" / "model.safetensors").is_file()


def test_dense_llama_merge_exports_as_llama(tmp_path):
    """A dense Llama (SmolLM2's family) adapted on attention and MLP: merged, then transformers' LlamaForCausalLM."""
    transformers = pytest.importorskip("transformers")
    cfg = Config(model=ModelConfig(vocab_size=60, hidden_size=32, intermediate_size=48, intermediate_size_mlp=48,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, family="llama",
                                   moe_layers=[], no_rope_layers=[1, 1], use_qk_norm=False,
                                   attn_temperature_tuning=False,
                                   attention_chunk_size=None, tie_word_embeddings=True))
    save_model(tmp_path / "base", LlamaModel(cfg.model).init_weights(seed=1), cfg)
    cfg.lora.rank = 4
    model = apply_lora(load_model(tmp_path / "base"), cfg.lora)
    with torch.no_grad():
        for m in lora_modules(model):
            m.lora_B.normal_(0, 0.2)
    save_model(tmp_path / "adapted", model, cfg, base=base_record(tmp_path / "base"))
    assert main(["merge", str(tmp_path / "adapted"), str(tmp_path / "merged")]) == 0
    assert main(["export-hf", str(tmp_path / "merged"), str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    x = torch.randint(0, 60, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.eval()(x)
        assert (hf(x, use_cache=False).logits - want).abs().max() <= 1e-5
        assert (want - load_model(tmp_path / "base")(x)).abs().max() > 1e-3


def test_generate_and_eval_read_adapter_checkpoints(runs, tmp_path, capsys):
    assert main(["merge", str(runs / "dpo"), str(tmp_path / "merged")]) == 0
    outs = []
    for model in (runs / "dpo", tmp_path / "merged"):
        capsys.readouterr()
        assert main(["generate", "--model", str(model), "--prompt", "What is 2 + 3?", "--max-new-tokens", "12"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].strip()
    assert main(["eval", "--model", str(runs / "dpo"), "--ref", str(runs / "pre"), "--data", "builtin:assistant",
                 "--max-new-tokens", "8", "--limit", "4", "--out", str(tmp_path / "eval.json"),
                 "data.builtin_size=120"]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())


def test_a_changed_base_is_refused_in_one_line(runs, tmp_path, capsys):
    shutil.copytree(runs / "pre" / "final", tmp_path / "base")
    assert dpo(tmp_path / "run", tmp_path / "base", "train.max_steps=2") == 0
    model = load_model(tmp_path / "base")
    with torch.no_grad():
        model.norm.weight.mul_(1.01)
    save_model(tmp_path / "base", model, Config.load_json(tmp_path / "base" / "config.json"),
               load_tokenizer(tmp_path / "base"))
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "run"), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "changed since these adapters were trained" in err[0]
    # resuming the run against the changed base: refused before anything trains
    assert dpo(tmp_path / "run", tmp_path / "base", "train.max_steps=4") == 2
    assert "changed since these adapters were trained" in capsys.readouterr().err


def test_an_adapter_checkpoint_starts_full_training_and_its_base_is_not_overwritten(runs, tmp_path, capsys):
    assert main(["sft", *COMMON, "--out", str(tmp_path / "full"), "--init", str(runs / "dpo"),
                 "train.max_steps=2"]) == 0  # the merged model, every weight trainable again
    assert (tmp_path / "full" / "final" / "model.safetensors").is_file()
    capsys.readouterr()
    assert main(["sft", *COMMON, "--out", str(runs / "pre"), "--init", str(runs / "dpo"), "--overwrite",
                 "train.max_steps=2"]) == 2
    assert "the base of --init" in capsys.readouterr().err
    assert (runs / "pre" / "final" / "model.safetensors").is_file()


def test_sft_precomputed_reference_and_bf16_base(runs, tmp_path):
    assert main(["sft", *COMMON, "--out", str(tmp_path / "sft"), "--init", str(runs / "pre"), *LORA,
                 "train.max_steps=3"]) == 0
    assert (tmp_path / "sft" / "final" / "adapters.safetensors").is_file()
    # LoRA DPO on LoRA SFT: the init is the merged SFT model, and so is the reference
    assert dpo(tmp_path / "live", tmp_path / "sft", "train.max_steps=3", "train.log_every=1") == 0
    assert dpo(tmp_path / "cached", tmp_path / "sft", "train.max_steps=3", "train.log_every=1",
               "dpo.precompute_ref=true") == 0
    a, b = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("live", "cached"))
    assert [r["loss"] for r in a if "loss" in r] == pytest.approx([r["loss"] for r in b if "loss" in r], abs=1e-5)
    # under bf16 autocast a bf16 base (the default, "auto") computes what an fp32 one does
    for base_dtype in ("fp32", "auto"):
        assert dpo(tmp_path / base_dtype, runs / "pre", "train.max_steps=3", "train.log_every=1",
                   "train.precision=bf16", f"lora.base_dtype={base_dtype}") == 0
    a, b = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("fp32", "auto"))
    assert [r["loss"] for r in a if "loss" in r] == pytest.approx([r["loss"] for r in b if "loss" in r], abs=1e-5)
    saved = load_file(str(tmp_path / "auto" / "final" / "adapters.safetensors"))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in saved.values())


@pytest.mark.parametrize("args, message", [
    (["pretrain", *COMMON, "lora.rank=4"], "pretraining trains every weight"),
    (["dpo", *COMMON, "--init", "X", "lora.rank=4", "lora.base_dtype=bf16"], "set train.precision=bf16"),
    (["dpo", *COMMON, "--init", "X", "lora.targets=attention,router"], "lora.targets"),
    (["dpo", *COMMON, "--init", "X", "lora.rank=-1"], "lora.rank"),
])
def test_bad_lora_settings_are_one_line_errors(tmp_path, capsys, args, message):
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_resume_after_sigkill_is_bitwise_identical(runs, tmp_path):
    args = ["dpo", *COMMON, "--init", str(runs / "pre"), *LORA, "lora.train_router=true", "train.max_steps=10",
            "train.save_every=4", "train.log_every=2", "train.eval_every=4"]
    assert run_cli(args + ["--out", str(tmp_path / "straight")]).returncode == 0
    assert run_cli(args + ["--out", str(tmp_path / "killed")], fault="step:6").returncode == -9
    resumed = run_cli(args + ["--out", str(tmp_path / "killed")])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout + resumed.stderr
    a, b = (load_file(str(tmp_path / d / "final" / "adapters.safetensors")) for d in ("straight", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(".router." in k for k in a)
    ra, rb = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("straight", "killed"))
    assert strip_timing(ra) == strip_timing(rb)


@pytest.mark.slow
def test_compiled_lora_dpo_gives_the_eager_losses(runs, tmp_path):
    """torch.compile with adapters: the reference call (adapters off) and the policy's are two guarded graphs."""
    for name, extra in (("eager", []), ("compiled", ["train.compile=true"])):
        assert dpo(tmp_path / name, runs / "pre", "train.max_steps=4", "train.log_every=1", *extra) == 0
    a, b = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("eager", "compiled"))
    assert [r["loss"] for r in a if "loss" in r] == pytest.approx([r["loss"] for r in b if "loss" in r], abs=1e-5)
