"""export-hf / import-hf on crafted input: symlinks and paths outside the folder are refused, and every
malformed file (config, index, shard, tensor) is one `error:` line naming it - never a traceback, never a leak."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama4dpo import Config, LlamaModel, save_model
from llama4dpo.cli import main
from llama4dpo.interop import export_hf
from llama4dpo.tokenizer import CharTokenizer

SECRET = b"-----BEGIN PRIVATE KEY----- not for export"


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """A tiny checkpoint (with a tokenizer) and its valid transformers export, built once; tests damage copies."""
    root = tmp_path_factory.mktemp("originals")
    cfg = Config.load("tiny", ["model.vocab_size=40"])
    model = LlamaModel(cfg.model).init_weights(seed=0)
    ckpt = save_model(root / "ckpt", model, cfg, CharTokenizer.train(["hello world"]))
    return ckpt, export_hf(ckpt, root / "hf")


@pytest.fixture()
def ckpt(originals, tmp_path):
    return shutil.copytree(originals[0], tmp_path / "ckpt")


@pytest.fixture()
def hf(originals, tmp_path):
    return shutil.copytree(originals[1], tmp_path / "hf")


@pytest.fixture()
def secret(tmp_path):
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "id_rsa").write_bytes(SECRET)
    return tmp_path / "private" / "id_rsa"


def one_line_error(capsys, *names) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for name in names:
        assert name in err, (name, err)
    return err


def nothing_leaked(out, secret):
    """No export, and no copy of the secret anywhere beside it (a leftover temporary directory included)."""
    assert not out.exists(), "the export was written"
    copies = [f for f in out.parent.rglob("*") if f.is_file() and not f.is_symlink() and f != secret]
    assert not any(SECRET in f.read_bytes() for f in copies)


# ---- export-hf: a symlink in the checkpoint would be followed and its target copied out ----------------------

def drop_from_manifest(ckpt, name):
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"].pop(name, None)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def test_export_refuses_symlinked_tokenizer_and_leaks_nothing(ckpt, secret, tmp_path, capsys):
    (ckpt / "tokenizer.json").unlink()
    (ckpt / "tokenizer.json").symlink_to(secret)
    drop_from_manifest(ckpt, "tokenizer.json")
    out = tmp_path / "export"
    assert main(["export-hf", str(ckpt), str(out)]) == 2
    one_line_error(capsys, "tokenizer.json", "symbolic link")
    nothing_leaked(out, secret)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_export_refuses_any_symlinked_checkpoint_file(ckpt, tmp_path, name, capsys):
    # the link points at an identical copy, so the manifest still verifies: only the link itself is wrong
    shutil.move(ckpt / name, tmp_path / name)
    (ckpt / name).symlink_to(tmp_path / name)
    assert main(["export-hf", str(ckpt), str(tmp_path / "export")]) == 2
    one_line_error(capsys, name, "symbolic link")
    assert not (tmp_path / "export").exists()


# ---- import-hf: every file read must be a plain file inside HF_DIR --------------------------------------------

def write_index(hf, weight_map):
    (hf / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_import_refuses_weight_map_entry_outside_the_folder(hf, tmp_path, where, capsys):
    # a valid shard outside the folder: the old code read it and imported it without a word
    outside = tmp_path / "elsewhere" / "x.safetensors"
    outside.parent.mkdir()
    shutil.move(hf / "model.safetensors", outside)
    entry = "../elsewhere/x.safetensors" if where == "relative" else str(outside)
    write_index(hf, {k: entry for k in load_file(str(outside))})
    assert main(["import-hf", str(hf), str(tmp_path / "back")]) == 2
    one_line_error(capsys, entry, "outside")
    assert not (tmp_path / "back").exists()


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "llama4dpo_tokenizer.json"])
def test_import_refuses_symlinked_files(hf, tmp_path, name, capsys):
    shutil.move(hf / name, tmp_path / name)  # a valid file, so only the link is wrong
    (hf / name).symlink_to(tmp_path / name)
    assert main(["import-hf", str(hf), str(tmp_path / "back")]) == 2
    one_line_error(capsys, name, "symbolic link")
    assert not (tmp_path / "back").exists()


def test_import_refuses_symlinked_shard_named_by_the_index(hf, tmp_path, capsys):
    keys = load_file(str(hf / "model.safetensors"))
    shutil.move(hf / "model.safetensors", tmp_path / "real.safetensors")
    (hf / "model-00001-of-00001.safetensors").symlink_to(tmp_path / "real.safetensors")
    write_index(hf, {k: "model-00001-of-00001.safetensors" for k in keys})
    assert main(["import-hf", str(hf), str(tmp_path / "back")]) == 2
    one_line_error(capsys, "model-00001-of-00001.safetensors", "symbolic link")
    assert not (tmp_path / "back").exists()


# ---- import-hf: malformed files, each one line naming the file and key ----------------------------------------

def edit_config(**changes):
    def damage(hf):
        d = json.loads((hf / "config.json").read_text())
        d.update(changes)
        (hf / "config.json").write_text(json.dumps(d))
    return damage


def edit_tensor(key, make):
    def damage(hf):
        sd = load_file(str(hf / "model.safetensors"))
        sd[key] = make(sd[key])
        save_file(sd, str(hf / "model.safetensors"))
    return damage


def truncate_shard(hf):
    data = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(data[: len(data) // 2])


def index_naming_missing_shard(hf):
    write_index(hf, {k: "model-00002-of-00002.safetensors" for k in load_file(str(hf / "model.safetensors"))})


def with_nan(t):
    t = t.clone()
    t.view(-1)[3] = float("nan")
    return t


def with_inf(t):
    t = t.clone()
    t.view(-1)[0] = float("inf")
    return t


EMBED = "model.embed_tokens.weight"
MALFORMED = {
    "truncated-shard": (truncate_shard, ["model.safetensors"]),
    "missing-shard": (index_naming_missing_shard, ["model-00002-of-00002.safetensors", "missing"]),
    "index-a-list": (lambda hf: (hf / "model.safetensors.index.json").write_text("[1, 2]"),
                     ["model.safetensors.index.json", "weight_map"]),
    "index-no-weight_map": (lambda hf: (hf / "model.safetensors.index.json").write_text('{"metadata": {}}'),
                            ["model.safetensors.index.json", "weight_map"]),
    "weight_map-a-list": (lambda hf: write_index(hf, ["model.safetensors"]),
                          ["model.safetensors.index.json", "weight_map"]),
    "weight_map-int-values": (lambda hf: write_index(hf, {EMBED: 1}),
                              ["model.safetensors.index.json", EMBED]),
    "weight_map-nul-byte": (lambda hf: write_index(hf, {EMBED: "model\0.safetensors"}),
                            ["model.safetensors.index.json", "model\\x00.safetensors", "file name"]),
    "config-a-list": (lambda hf: (hf / "config.json").write_text("[1, 2, 3]"), ["config.json"]),
    "config-nested-too-deeply": (lambda hf: (hf / "config.json").write_text("[" * 100_000 + "]" * 100_000),
                                 ["config.json"]),
    "hidden_size-a-string": (edit_config(hidden_size="abc"), ["config.json", "hidden_size"]),
    "hidden_size-a-list": (edit_config(hidden_size=[32]), ["config.json", "hidden_size"]),
    "moe_layers-strings": (edit_config(moe_layers=["1", "3"]), ["config.json", "moe_layers"]),
    "rope_scaling-a-string": (edit_config(rope_scaling="llama3"), ["config.json", "rope_scaling"]),
    "rope_scaling-no-factor": (edit_config(rope_scaling={"rope_type": "llama3"}), ["config.json", "factor"]),
    "rope_theta-a-string": (edit_config(rope_theta="abc"), ["config.json", "rope_theta"]),
    "text_config-a-string": (edit_config(text_config="x"), ["config.json", "text_config"]),
    "shape-mismatch": (edit_tensor(EMBED, lambda t: t[:-1]), ["model.safetensors", EMBED, "shape"]),
    "int64-weights": (edit_tensor(EMBED, lambda t: t.to(torch.int64)), ["model.safetensors", EMBED, "int64"]),
    "bool-weights": (edit_tensor(EMBED, lambda t: t > 0), ["model.safetensors", EMBED, "bool"]),
    "nan-weights": (edit_tensor(EMBED, with_nan), ["model.safetensors", EMBED, "finite"]),
    "inf-weights": (edit_tensor(EMBED, with_inf), ["model.safetensors", EMBED, "finite"]),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_import_malformed_input_is_one_line_error(hf, tmp_path, case, capsys):
    damage, names = MALFORMED[case]
    damage(hf)
    assert main(["import-hf", str(hf), str(tmp_path / "back")]) == 2
    one_line_error(capsys, *names)
    assert not (tmp_path / "back").exists()



@pytest.mark.parametrize("command", ["export-hf", "import-hf"])
def test_the_output_folder_is_never_replaced_unless_it_holds_only_a_model(ckpt, hf, tmp_path, command, capsys):
    out = tmp_path / "home"
    (out / ".ssh").mkdir(parents=True)
    (out / ".ssh" / "id_rsa").write_bytes(SECRET)
    source = ckpt if command == "export-hf" else hf
    assert main([command, str(source), str(out)]) == 2
    one_line_error(capsys, "refusing to replace it")
    assert (out / ".ssh" / "id_rsa").read_bytes() == SECRET and [p.name for p in out.iterdir()] == [".ssh"]
    again = tmp_path / "again"  # a model written there before is replaced, as a re-export expects
    assert main([command, str(source), str(again)]) == 0 and main([command, str(source), str(again)]) == 0
