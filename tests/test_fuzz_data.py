"""Fuzzed preference data: explicit / hh / conversational records in .jsonl, .jsonl.gz, .json, .csv, .parquet.

Protects: `read_pairs` and `load_preference_data` on files of records with missing, null, non-string or
empty fields, random unicode, junk lines, invalid UTF-8 and truncated or corrupt containers give success or
a one-line `UserError`, never a traceback or a hang. On success the reports add up (kept + skipped ==
records, the record count of the file), every pair has two distinct non-blank responses, and every prepared
example has exactly one leading bos, eos only at the end, ids in range, and fits `max_length` /
`max_prompt_length`. The deterministic tests pin records and files that once crashed a reader (or, for an
empty parquet file, took every byte of memory). Shared helpers: tests/_fuzz.py; fixtures: tests/conftest.py.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import subprocess
import sys

from hypothesis import given
from hypothesis import strategies as st

from llama4dpo.data import load_preference_data, read_pairs, render_prompt, write_records

from _fuzz import (CONTENT, JUNK_VALUE, NAME_TEXT, PHRASE, SCALARS, attempt, expect_success_or_one_line, fuzz,
                   messages, tmp_path_for, weighted, write)

TEXT_FIELD = weighted((12, PHRASE), (2, CONTENT), (2, st.text(max_size=150)), (1, JUNK_VALUE))


def maybe_break(draw, rec: dict, fields: list[str], value=TEXT_FIELD) -> dict:
    """Drop a field, null it, replace it with junk, or add an unknown field, now and then."""
    for f in fields:
        op = draw(st.integers(0, 15))
        if op == 0:
            rec.pop(f, None)
        elif op == 1:
            rec[f] = draw(value)
    if draw(st.integers(0, 7)) == 0:
        rec[draw(NAME_TEXT)] = draw(SCALARS)
    return rec


@st.composite
def explicit_record(draw):
    rec = {"prompt": draw(TEXT_FIELD), "chosen": draw(TEXT_FIELD), "rejected": draw(TEXT_FIELD)}
    return maybe_break(draw, rec, ["prompt", "chosen", "rejected"])


@st.composite
def hh_record(draw):
    if draw(st.integers(0, 5)) == 0:  # not built as transcripts at all
        return maybe_break(draw, {"chosen": draw(TEXT_FIELD), "rejected": draw(TEXT_FIELD)}, ["chosen", "rejected"])
    context = render_prompt(draw(messages(valid=True, max_size=3)))
    if draw(st.integers(0, 5)) == 0:  # marker missing, or sharing no prefix
        context = draw(st.sampled_from(["", "\n\nHuman: hi", context.replace("Assistant", "Asistant")]))
    rec = {"chosen": context + " " + draw(PHRASE), "rejected": context + " " + draw(PHRASE)}
    return maybe_break(draw, rec, ["chosen", "rejected"])


@st.composite
def conversational_record(draw):
    context = draw(messages(min_size=draw(st.sampled_from([0, 1, 1, 1]))))
    a = draw(messages(min_size=1, max_size=1, valid=draw(st.integers(0, 9)) > 0))
    b = draw(messages(min_size=1, max_size=1, valid=draw(st.integers(0, 9)) > 0))
    for m in a + b:  # mostly an assistant answer
        if draw(st.integers(0, 5)) and m.get("role") is not None:
            m["role"] = "assistant"
    rec = {}
    style = draw(st.integers(0, 4))
    if style == 0:  # UltraFeedback: the prompt string, repeated inside chosen/rejected
        rec["prompt"] = draw(PHRASE)
        rec["chosen"], rec["rejected"] = context + a, context + b
    elif style == 1:  # TRL: prompt messages separate
        rec["prompt"], rec["chosen"], rec["rejected"] = context, a, b
    elif style == 2:  # no prompt at all
        rec["chosen"], rec["rejected"] = context + a, context + b
    elif style == 3:  # message lists as JSON strings (as in CSV)
        rec["chosen"], rec["rejected"] = json.dumps(context + a), json.dumps(context + b)
    else:  # diverging contexts
        rec["chosen"], rec["rejected"] = context + a, draw(messages()) + b
    return maybe_break(draw, rec, ["prompt", "chosen", "rejected"],
                       value=weighted((1, TEXT_FIELD), (1, messages()),
                                      (1, st.text(max_size=5).map(lambda s: "[" + s))))


RECORD = {"explicit": explicit_record(), "hh": hh_record(), "conversational": conversational_record()}
JUNK_LINE = st.one_of(st.text(max_size=40).filter(lambda s: "\n" not in s),
                      st.sampled_from(["", "   ", "{", "}", "[1, 2]", "null", "5", '"text"', "{}", '{"chosen": 1}',
                                       '{"chosen": "a", "rejected": "b"', "\x00", "\ufeff{}"]))


@st.composite
def preference_file(draw, fmt):
    """(path, number of records the reader should count or None) for a file of `fmt` records."""
    records = draw(st.lists(RECORD[fmt], min_size=draw(st.sampled_from([0, 1, 1, 1])), max_size=6))
    container = draw(st.sampled_from(["jsonl", "jsonl", "jsonl", "jsonl.gz", "json", "csv", "parquet"]))
    if container == "parquet" and not (any(records) and all(v is None or isinstance(v, str)
                                                           for r in records for v in r.values())):
        # pyarrow cannot write a column of mixed types; a file without columns:
        # test_parquet_without_columns_is_read_or_rejected_in_one_line_within_3_gb
        container = "json"
    path = tmp_path_for("." + container)
    if container in ("json", "csv", "parquet"):
        write_records(records, path)
        if container == "parquet" and draw(st.integers(0, 5)) == 0:  # truncated (a corrupt body: see below)
            path.write_bytes(path.read_bytes()[:draw(st.integers(0, path.stat().st_size))])
            return path, None
        return path, (None if container == "csv" else len(records))
    lines = [json.dumps(r, ensure_ascii=draw(st.booleans())) for r in records]
    for _ in range(draw(st.integers(0, 3)) if draw(st.booleans()) else 0):
        lines.insert(draw(st.integers(0, len(lines))), draw(JUNK_LINE))
    data = "\n".join(lines).encode("utf-8")
    if draw(st.integers(0, 9)) == 0:  # invalid UTF-8 somewhere
        i = draw(st.integers(0, len(data)))
        data = data[:i] + b"\xff\xfe" + data[i:]
    n_records = sum(1 for line in data.split(b"\n") if line.strip())
    if container == "jsonl.gz":
        data = gzip.compress(data)
        if draw(st.integers(0, 5)) == 0:  # truncated (a corrupt stream: test_corrupt_gzip_stream_is_read_or_...)
            data, n_records = data[:draw(st.integers(0, len(data)))], None
    path.write_bytes(data)
    return path, n_records


def check_prepared(ex: dict, tok, max_length: int, max_prompt_length: int) -> None:
    p, c, r = ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]
    assert p and p[0] == tok.bos_id and tok.bos_id not in p[1:] + c + r, "exactly one bos, first"
    assert len(p) <= max_prompt_length
    for resp in (c, r):
        assert resp, "a response keeps at least one token"
        assert len(p) + len(resp) <= max_length
        assert tok.eos_id not in resp[:-1], "eos only at the end"
        assert all(0 <= i < tok.vocab_size for i in p + resp)


def run_preference(fmt: str, file, tok, data_cfg, requested: str, strict: bool, eval_fraction: float):
    path, n_records = file
    cfg = dataclasses.replace(data_cfg, format=requested, strict=strict, eval_fraction=eval_fraction)
    res, err = attempt(read_pairs, str(path), cfg)
    if res is not None:
        cols, report = res
        if n_records is not None:
            assert report.records == n_records
        assert len(cols["prompt"]) + sum(report.skipped.values()) == report.records
        assert len(cols["is_eval"]) == len(cols["prompt"])
        for prompt, chosen, rejected in zip(cols["prompt"], cols["chosen"], cols["rejected"]):
            assert all(isinstance(t, str) for t in (prompt, chosen, rejected))
            assert chosen != rejected and chosen.strip() and rejected.strip()
    data, err2 = attempt(load_preference_data, str(path), cfg, tok)
    path.unlink()
    if data is not None:
        rep = data.report
        assert res is not None, "read_pairs failed where load_preference_data succeeded"
        assert rep.kept + sum(rep.skipped.values()) == rep.records
        assert len(data.train) == rep.n_train >= 1 and len(data.eval) == rep.n_eval
        for split in (data.train, data.eval):
            for ex in split:
                check_prepared(ex, tok, cfg.max_length, cfg.max_prompt_length)
        assert isinstance(rep.summary(), str)


PREFERENCE_ARGS = dict(tok_kind=st.sampled_from(["char", "bpe"]), strict=st.integers(0, 7).map(lambda i: i == 0),
                       eval_fraction=st.sampled_from([0.0, 0.05, 0.5, 0.9]))


@fuzz(250)
@given(file=preference_file("explicit"), requested=st.sampled_from(["auto", "explicit", "auto"]), **PREFERENCE_ARGS)
def test_fuzz_preference_explicit(tiny_config, tiny_tokenizer, file, requested, tok_kind, strict, eval_fraction):
    run_preference("explicit", file, tiny_tokenizer(tok_kind), tiny_config().data, requested, strict, eval_fraction)


@fuzz(250)
@given(file=preference_file("hh"), requested=st.sampled_from(["auto", "hh", "auto"]), **PREFERENCE_ARGS)
def test_fuzz_preference_hh(tiny_config, tiny_tokenizer, file, requested, tok_kind, strict, eval_fraction):
    run_preference("hh", file, tiny_tokenizer(tok_kind), tiny_config().data, requested, strict, eval_fraction)


@fuzz(250)
@given(file=preference_file("conversational"), requested=st.sampled_from(["auto", "conversational", "auto"]),
       **PREFERENCE_ARGS)
def test_fuzz_preference_conversational(tiny_config, tiny_tokenizer, file, requested, tok_kind, strict,
                                        eval_fraction):
    run_preference("conversational", file, tiny_tokenizer(tok_kind), tiny_config().data, requested, strict,
                   eval_fraction)


# ---------------------------------------------------------------------------------------------------------
# deterministic records and files that once crashed a reader: success or a one-line UserError
# ---------------------------------------------------------------------------------------------------------


def test_conversational_record_with_list_role_is_accepted_or_rejected_in_one_line(tiny_config, tiny_tokenizer):
    rec = {"chosen": [{"role": ["user"], "content": "hi"}, {"role": "assistant", "content": "a"}],
           "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "b"}]}
    expect_success_or_one_line(load_preference_data, str(write(".jsonl", json.dumps(rec) + "\n")),
                               tiny_config().data, tiny_tokenizer("char"))


def test_lone_surrogate_in_prompt_is_accepted_or_rejected_in_one_line(tiny_config, tiny_tokenizer):
    path = write(".jsonl", '{"prompt": "Hi \\ud800", "chosen": " a", "rejected": " b"}\n')
    expect_success_or_one_line(load_preference_data, str(path), tiny_config().data, tiny_tokenizer("char"))


def test_lone_surrogate_in_response_is_accepted_or_rejected_in_one_line(tiny_config, tiny_tokenizer):
    path = write(".jsonl", '{"prompt": "Hi", "chosen": " a\\udc80", "rejected": " b"}\n')
    expect_success_or_one_line(load_preference_data, str(path), tiny_config().data, tiny_tokenizer("char"))


def test_record_field_name_with_newline_is_accepted_or_rejected_in_one_line(tiny_config, tiny_tokenizer):
    path = write(".jsonl", json.dumps({"a\nb": 1}) + "\n")
    expect_success_or_one_line(load_preference_data, str(path), tiny_config().data, tiny_tokenizer("char"))


def test_corrupt_gzip_stream_is_read_or_rejected_in_one_line(tiny_config):
    header = bytes([0x1F, 0x8B, 8, 0, 0, 0, 0, 0, 0, 0xFF])  # a gzip header, then a deflate block of reserved type
    path = write(".jsonl.gz", header + b"\x07\x00\x00")
    expect_success_or_one_line(read_pairs, str(path), tiny_config().data)


def test_parquet_with_invalid_utf8_is_read_or_rejected_in_one_line(tiny_config):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path_for(".parquet")
    pq.write_table(pa.table({"prompt": ["hello"], "chosen": [" a"], "rejected": [" b"]}), path, compression="none")
    path.write_bytes(path.read_bytes().replace(b"hello", b"\xffello"))
    expect_success_or_one_line(read_pairs, str(path), tiny_config().data)


def test_parquet_without_columns_is_read_or_rejected_in_one_line_within_3_gb():
    # In a child process capped at 3 GB of address space: unguarded, this input takes every byte of the host.
    code = """if True:
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))
        from llama4dpo.config import Config
        from llama4dpo.data import read_pairs, write_records
        from llama4dpo.errors import UserError
        path = write_records([], sys.argv[1])
        try:
            read_pairs(str(path), Config.load("tiny").data)
            print("success")
        except UserError as e:
            print("UserError" if "\\n" not in str(e) else "multi-line UserError")
        except MemoryError:
            print("MemoryError")
    """
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path_for(".parquet"))], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert out.stdout.strip() in ("success", "UserError"), out.stdout + out.stderr[-2000:]
