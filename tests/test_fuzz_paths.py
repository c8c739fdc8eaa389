"""Fuzzed file paths handed to every reader: `Config.load`, `Config.load_json`, `load_tokenizer`, `read_pairs`.

Protects: any path a user can type (a missing file, a directory, an odd, over-long or unencodable name, a
NUL byte or a line break in it) gives success or a one-line `UserError` (`ConfigError` for configs), never a
traceback or a hang. Shared helpers: tests/_fuzz.py; fixtures: tests/conftest.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llama4dpo.config import Config
from llama4dpo.data import read_pairs
from llama4dpo.errors import ConfigError
from llama4dpo.tokenizer import load_tokenizer

from _fuzz import TMP, attempt, expect_success_or_one_line, fuzz

# Components stay < 255 bytes; no NUL or line breaks (test_load_tokenizer_path_with_nul_byte_..., and
# test_config_path_with_newline_...: both _is_accepted_or_rejected_in_one_line).
PATH_TEXT = st.text(st.characters(exclude_characters="\x00\n\r", exclude_categories=["Cs"]), max_size=40)


@fuzz(150)
@given(name=PATH_TEXT, where=st.sampled_from(["tmp", "tmp", "relative"]),
       suffix=st.sampled_from(["", ".toml", ".json", ".jsonl", ".csv", ".parquet", ".txt", ".jsonl.gz", "/"]))
def test_fuzz_paths(tiny_config, name, where, suffix):
    """Any path a user can type: a missing file, a directory, an odd name -> success or a one-line error."""
    path = str(Path(TMP.name) / name) + suffix if where == "tmp" else name + suffix
    attempt(Config.load, path, kind=ConfigError)
    attempt(Config.load_json, path, kind=ConfigError)
    attempt(load_tokenizer, path)
    if suffix not in ("", "/"):  # no suffix: a hub data set name (offline in the tests, but slow to fail)
        attempt(read_pairs, path, tiny_config().data)


# ---------------------------------------------------------------------------------------------------------
# deterministic paths that once crashed a reader: success or a one-line error
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call", ["Config.load", "load_tokenizer", "read_pairs"])
def test_file_name_over_255_bytes_is_accepted_or_rejected_in_one_line(tiny_config, call):
    name = "a" * 300 + ".jsonl"
    if call == "Config.load":
        expect_success_or_one_line(Config.load, name, kind=ConfigError)
    elif call == "load_tokenizer":
        expect_success_or_one_line(load_tokenizer, name)
    else:
        expect_success_or_one_line(read_pairs, name, tiny_config().data)


def test_load_tokenizer_path_with_nul_byte_is_accepted_or_rejected_in_one_line():
    expect_success_or_one_line(load_tokenizer, "a\x00b")


def test_config_path_with_newline_is_accepted_or_rejected_in_one_line():
    expect_success_or_one_line(Config.load, str(Path(TMP.name) / "a\nb.toml"), kind=ConfigError)
