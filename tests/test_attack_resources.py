"""Issue #21: memory estimated from the config before anything large is allocated; a config too large for the
machine fails at once with one line naming the setting and the estimate."""

import dataclasses
import re
import time

import pytest
import torch

from llama4dpo import resources
from llama4dpo.cli import main
from llama4dpo.config import PRESETS, Config, ModelConfig
from llama4dpo.data import builtin
from llama4dpo.errors import UserError
from llama4dpo.generate import Sampling, generate_ids
from llama4dpo.model import LlamaModel

SIZE = re.compile(r"\d[\d,.]* (B|KB|MB|GB|TB|PB)\b")
SMALL = 1 << 20  # "available memory" for the monkeypatched checks: 1 MB


def built_count(m: ModelConfig) -> int:
    with torch.device("meta"):  # shapes only: no memory, no init
        return LlamaModel(m).num_params()[0]


EDGE = {
    "dense": dict(moe_layers=[]),
    "tied": dict(tie_word_embeddings=True),
    "bias_no_qk_norm": dict(attention_bias=True, use_qk_norm=False),
    "explicit_layers": dict(num_hidden_layers=5, moe_layers=[1, 1, 4], no_rope_layers=[1, 0, 1, 1, 0]),
    "head_dim_gqa_top2": dict(num_attention_heads=6, num_key_value_heads=3, head_dim=12, num_local_experts=3,
                              num_experts_per_tok=2, interleave_moe_layer_step=3, intermediate_size=40),
    "derived_widths": dict(hidden_size=80, num_attention_heads=5, num_key_value_heads=None, intermediate_size=None,
                           intermediate_size_mlp=None),
}


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESETS.glob("*.toml")))
def test_parameter_count_matches_built_model_on_presets(preset):
    m = Config.load(preset).model
    assert resources.parameter_count(m) == built_count(m)


@pytest.mark.parametrize("edge", sorted(EDGE))
def test_parameter_count_matches_built_model_on_edge_configs(edge):
    m = dataclasses.replace(Config.load("tiny").model, **EDGE[edge])
    m.validate()
    assert resources.parameter_count(m) == built_count(m)


def test_parameter_count_is_constant_time_in_the_layers():
    t = time.perf_counter()
    n = resources.parameter_count(ModelConfig(num_hidden_layers=10 ** 7))
    assert time.perf_counter() - t < 0.1
    assert n > 10 ** 12


def small_memory(monkeypatch, n=SMALL):
    monkeypatch.setattr(resources, "available_bytes", lambda device="cpu": n)


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg and SIZE.search(msg), msg
    return msg


def test_available_bytes_is_a_positive_count():
    n = resources.available_bytes("cpu")
    assert isinstance(n, int) and n > 0
    assert resources.available_bytes(torch.device("cpu")) > 0


def test_available_bytes_on_cuda_counts_the_allocators_unused_cache(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (5 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 << 30)
    assert resources.available_bytes(torch.device("cuda:0")) == 7 << 30
    assert resources.available_bytes("meta") is None


def test_checks_pass_for_the_tiny_preset():
    cfg = Config.load("tiny")
    est = resources.check_training(cfg, "cpu", reference=True, command="dpo")
    assert est["parameters"] == 4 * resources.parameter_count(cfg.model) == est["reference"]
    assert est["optimizer"] == 2 * est["parameters"] and est["activations"] > 0
    resources.check_model(cfg.model, "cpu", "tiny/config.json")
    resources.check_generation(cfg.model, 16, 128, "cpu", max_new_tokens=64)


def test_check_training_names_the_model_when_the_parameters_do_not_fit(monkeypatch):
    small_memory(monkeypatch)
    cfg = Config.load("tiny", ["model.hidden_size=4096"])
    with pytest.raises(UserError) as e:
        resources.check_training(cfg, "cpu", reference=True)
    msg = one_line(e)
    assert "model.hidden_size=4096" in msg and "AdamW" in msg and "reference" in msg and "1.0 MB available" in msg


def test_check_training_names_the_batch_size_when_activations_do_not_fit(monkeypatch):
    cfg = Config.load("tiny", ["train.batch_size=64", "train.grad_accum_steps=2"])
    est = resources.estimate_training(cfg)
    small_memory(monkeypatch, est["parameters"] * 4 + est["activations"] // 2)  # the weights fit, not the batch
    with pytest.raises(UserError) as e:
        resources.check_training(cfg, "cpu", reference=False)
    msg = one_line(e)
    assert msg.startswith("train.batch_size=64") and "32 rows" in msg and "train.grad_accum_steps" in msg
    assert "data.block_size" in msg
    # raising grad_accum_steps halves the micro-batch: it fits
    resources.check_training(cfg.with_overrides(["train.grad_accum_steps=4"]), "cpu", reference=False)


def test_check_training_names_the_row_length_when_one_row_does_not_fit(monkeypatch):
    cfg = Config.load("tiny", ["data.max_length=1000000", "train.batch_size=1"])
    small_memory(monkeypatch, 10 ** 9)
    with pytest.raises(UserError) as e:
        resources.check_training(cfg, "cpu", reference=False, command="sft")
    assert one_line(e).startswith("data.max_length=1000000")


def test_check_training_counts_processes_and_shards(monkeypatch):
    cfg = Config.load("tiny", ["train.batch_size=8"])
    one = resources.estimate_training(cfg)
    four = resources.estimate_training(cfg, world_size=4, sharded=True)
    assert four["parameters"] == one["parameters"] // 4 and four["activations"] == one["activations"] // 4


@pytest.mark.parametrize("key,value", [("vocab_size", 10 ** 9), ("num_hidden_layers", 10 ** 7),
                                       ("hidden_size", 10 ** 6)])
def test_check_model_refuses_a_crafted_config_with_real_memory(key, value):
    m = ModelConfig(**{key: value})
    t = time.perf_counter()
    with pytest.raises(UserError) as e:
        resources.check_model(m, "cpu", "ckpt/config.json")
    assert time.perf_counter() - t < 1
    msg = one_line(e)
    assert msg.startswith("ckpt/config.json: ") and f"model.{key}={value}" in msg


def test_check_model_counts_copies(monkeypatch):
    m = Config.load("tiny").model
    need = resources.check_model(m, "cpu", "x")
    small_memory(monkeypatch, need + 1)
    resources.check_model(m, "cpu", "x")
    with pytest.raises(UserError):
        resources.check_model(m, "cpu", "x", copies=2)


def test_check_generation_names_batch_and_max_new_tokens(monkeypatch):
    m = Config.load("tiny").model
    est = resources.estimate_generation(m, 4, 100)
    assert est["kv_cache"] == m.num_hidden_layers * 2 * 4 * m.n_kv_heads * m.d_head * 100 * 4
    small_memory(monkeypatch, 1000)
    with pytest.raises(UserError) as e:
        resources.check_generation(m, 4, 100, "cpu", max_new_tokens=60)
    msg = one_line(e)
    assert "batch size 4" in msg and "max_new_tokens=60" in msg


def test_generate_ids_checks_before_allocating(monkeypatch):
    m = dataclasses.replace(Config.load("tiny").model, vocab_size=40)
    model = LlamaModel(m).init_weights(seed=0).eval()
    s = Sampling(max_new_tokens=8)
    out = generate_ids(model, [[1, 2, 3], [4, 5]], s, eos_id=0, pad_id=0)
    assert [len(o) <= 8 for o in out] == [True, True]
    small_memory(monkeypatch, 1000)
    with pytest.raises(UserError) as e:
        generate_ids(model, [[1, 2, 3], [4, 5]], s, eos_id=0, pad_id=0)
    msg = one_line(e)
    assert "batch size 2" in msg and "max_new_tokens=8" in msg


def test_builtin_size_is_refused_before_generating(monkeypatch):
    def never(seed, size):
        assert size == builtin.SAMPLE_SIZE, f"generated {size} records"
        return builtin.make_assistant(seed, size)
    monkeypatch.setitem(builtin.TASKS, "assistant", never)
    t = time.perf_counter()
    with pytest.raises(UserError) as e:
        builtin.get_task.__wrapped__("assistant", 0, 10 ** 9)
    assert time.perf_counter() - t < 2
    assert one_line(e).startswith("data.builtin_size=1000000000")
    with pytest.raises(UserError, match="data.builtin_size"):
        builtin.get_task.__wrapped__("assistant", 0, 0)
    small_memory(monkeypatch, 10 ** 6)  # 1 MB holds a few hundred records, not 4000
    with pytest.raises(UserError, match="data.builtin_size=4000"):
        builtin.get_task.__wrapped__("assistant", 0, 4000)
    monkeypatch.setitem(builtin.TASKS, "assistant", builtin.make_assistant)
    assert len(builtin.get_task.__wrapped__("assistant", 0, 300).pairs) == 300


# ---- through the CLI: the acceptance criteria of #21 ----------------------------------------------------------

def run_cli(tmp_path, capsys, monkeypatch, override):
    def no_model(*a, **k):
        raise AssertionError("the model was built: no resource check ran before it")
    monkeypatch.setattr("llama4dpo.train.recipes.LlamaModel", no_model)  # fail fast, never allocate the batch
    capsys.readouterr()
    t = time.perf_counter()
    rc = main(["pretrain", "--config", "tiny", "--data", "builtin:assistant", "--quiet", "--out",
               str(tmp_path / "r"), override])
    elapsed = time.perf_counter() - t
    err = capsys.readouterr().err
    assert rc == 2, err
    assert elapsed < 5, f"{override}: {elapsed:.1f} s"
    assert err.startswith("error: ") and err.count("\n") == 1 and SIZE.search(err), err
    return err


def test_cli_hidden_size_fails_fast(tmp_path, capsys, monkeypatch):
    err = run_cli(tmp_path, capsys, monkeypatch, "model.hidden_size=1000000")
    assert "model.hidden_size=1000000" in err and "TB" in err


def test_cli_batch_size_fails_fast(tmp_path, capsys, monkeypatch):
    cfg = Config.load("tiny", ["train.batch_size=100000"])
    avail = resources.available_bytes("cpu")
    if sum(resources.estimate_training(cfg).values()) < avail:
        pytest.skip(f"this machine has {resources.human(avail)} available: batch 100000 of the tiny model fits")
    err = run_cli(tmp_path, capsys, monkeypatch, "train.batch_size=100000")
    assert "train.batch_size=100000" in err and "GB" in err


def test_cli_builtin_size_fails_fast(tmp_path, capsys, monkeypatch):
    err = run_cli(tmp_path, capsys, monkeypatch, "data.builtin_size=1000000000")
    assert "data.builtin_size=1000000000" in err


def test_fsdp_counts_the_whole_model_each_process_builds_before_sharding(monkeypatch):
    cfg = Config.load("tiny")
    whole = resources.parameter_count(cfg.model) * 4
    monkeypatch.setattr(resources, "available_bytes", lambda device: whole - 1)  # shards fit, the whole does not
    with pytest.raises(UserError, match="before FSDP2 shards it"):
        resources.check_training(cfg, "cuda", reference=False, world_size=8, sharded=True)
