"""Every shipped config loads; bad keys and impossible values are one-line errors naming the key."""

from pathlib import Path

import pytest
import torch

from llama4dpo import Config, LlamaModel
from llama4dpo.cli import main
from llama4dpo.errors import ConfigError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))


def test_configs_exist():
    assert {"tiny.toml", "demo.toml", "llama4-100m.toml"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_builds(path):
    cfg = Config.load(path)
    with torch.device("meta"):  # shapes only: the 100M preset needs no memory
        model = LlamaModel(cfg.model)
    total, active = model.num_params()
    assert 0 < active <= total


def test_overrides_are_typed():
    cfg = Config.load(CONFIGS[0], ["model.num_local_experts=16", "model.moe_layers=[0,2]", "train.lr=1e-4",
                                   "model.use_qk_norm=false", "model.attention_chunk_size=none", "dpo.loss_type=ipo"])
    assert cfg.model.num_local_experts == 16 and cfg.model.moe_layers == [0, 2]
    assert cfg.train.lr == 1e-4 and cfg.model.use_qk_norm is False and cfg.model.attention_chunk_size is None
    assert cfg.dpo.loss_type == "ipo"


def test_derived_values():
    m = Config.load(None, ["model.hidden_size=64", "model.num_attention_heads=4", "model.num_hidden_layers=8",
                           "model.interleave_moe_layer_step=2"]).model
    assert m.d_head == 16 and m.n_kv_heads == 4
    assert m.moe_layer_ids == [1, 3, 5, 7]
    assert m.rope_layer_flags == [True, True, True, False, True, True, True, False]
    assert m.expert_size == 112 and m.dense_size == 224  # 1.6 x 64 rounded up to 16; twice that


@pytest.mark.parametrize("override, message", [
    ("model.foo=1", "unknown key model.foo"),
    ("modle.hidden_size=1", "unknown section 'modle'"),
    ("model.num_key_value_heads=3", "model.num_key_value_heads"),
    ("model.num_experts_per_tok=9", "model.num_experts_per_tok"),
    ("model.hidden_size=abc", "model.hidden_size: expected an integer"),
    ("model.use_qk_norm=maybe", "model.use_qk_norm: expected true or false"),
    ("model.moe_layers=[0,99]", "model.moe_layers"),
    ("train.lr=-1", "train.lr"),
    ("train.precision=fp8", "train.precision"),
    ("distributed.strategy=zero3", "distributed.strategy"),
    ("dpo.loss_type=nope", "dpo.loss_type"),
    ("train.lr=nan", "train.lr: expected a finite number"),
    ("hidden_size=3", "expected section.key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
        Config.load(CONFIGS[0], [override])
    assert "\n" not in str(e.value)


def test_bad_toml_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nhidden_size = 'big'\n")
    with pytest.raises(ConfigError, match="model.hidden_size: expected an integer"):
        Config.load(bad)
    bad.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Config.load(bad)
    with pytest.raises(ConfigError, match="not found"):
        Config.load(tmp_path / "missing.toml")


def test_json_round_trip(tmp_path):
    cfg = Config.load(CONFIGS[0], ["model.moe_layers=[1]"])
    cfg.save_json(tmp_path / "c.json")
    assert Config.load_json(tmp_path / "c.json") == cfg


def test_pad_to_multiple_of_must_be_positive():
    assert Config.load(None, ["data.pad_to_multiple_of=64"]).data.pad_to_multiple_of == 64
    with pytest.raises(ConfigError, match="data.pad_to_multiple_of: must be >= 1, got 0"):
        Config.load(None, ["data.pad_to_multiple_of=0"])
