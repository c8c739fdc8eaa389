"""Every kind of bad input: the run completes, each reason is counted with its line numbers, nothing valid is
lost; strict mode makes the first bad record a one-line error; a file that is no preference set is an error."""

import json

import pytest

from llama4dpo.config import DataConfig
from llama4dpo.data import collate_preference, load_preference_data, training_texts, write_records
from llama4dpo.errors import UserError
from llama4dpo.tokenizer import CharTokenizer

CFG = DataConfig(eval_fraction=0.0, max_length=40, max_prompt_length=20)
LONG = "x" * 60  # longer than max_length=40 with any tokenizer that has one token per character: truncated, kept

EXPLICIT_LINES = [
    '{"prompt": "Hi", "chosen": " Hello.", "rejected": " Go."}',          # 1 valid
    '{"prompt": "Hi", "chosen": " Hello.", "rejected": ',                  # 2 malformed_json
    '{"prompt": "Hi", "chosen": " Hello."}',                               # 3 missing_field
    '{"prompt": "Hi", "chosen": null, "rejected": " Go."}',                # 4 null_field
    '{"prompt": "", "chosen": " Hello.", "rejected": " Go."}',             # 5 empty_field
    '{"prompt": "Hi", "chosen": " Hello.", "rejected": 5}',                # 6 non_string_field
    '{"prompt": "Hi", "chosen": " Same.", "rejected": " Same."}',          # 7 identical_responses
    '',                                                                    # 8 blank: not a record
    '{"prompt": "' + LONG + '", "chosen": " a", "rejected": " b"}',        # 9 valid (prompt keeps its end)
    '[1, 2]',                                                              # 10 malformed_json (no object)
    '{"prompt": "Hi", "chosen": "   ", "rejected": " Go."}',               # 11 empty_field
    '{"prompt": "Hi", "chosen": " \\ufb01ne", "rejected": " fine"}',       # 12 identical after NFKC
    '{"prompt": "Yo", "chosen": " Hey.", "rejected": " Bah.", "x": 1}',    # 13 valid (extra field is fine)
    '{"prompt": ["Hi"], "chosen": " a", "rejected": " b"}',                # 14 non_string_field
]
EXPECTED = {"malformed_json": [2, 10], "missing_field": [3], "null_field": [4], "empty_field": [5, 11],
            "non_string_field": [6, 14], "identical_responses": [7, 12]}
VALID = [("Hi", " Hello.", " Go."), ("x" * 19, " a", " b"), ("Yo", " Hey.", " Bah.")]  # bos + 19 = max_prompt_length

HH = "\n\nHuman: Hi\n\nAssistant:"
HH_RECORDS = [
    {"chosen": HH + " Hello.", "rejected": HH + " Go."},                   # 1 valid
    {"chosen": "\n\nHuman: Hi", "rejected": "\n\nHuman: Hello"},           # 2 no_assistant_turn
    {"chosen": HH + " Same.", "rejected": HH + " Same."},                  # 3 identical_responses
    {"chosen": HH + " ", "rejected": HH + " Go."},                         # 4 empty_field (empty response)
    {"chosen": HH + " Hello.", "rejected": None},                          # 5 null_field
]

U, A = "user", "assistant"


def conv(*turns):
    return [{"role": r, "content": c} for r, c in turns]


CONV_RECORDS = [
    {"chosen": conv((U, "Hi"), (A, "Hello.")), "rejected": conv((U, "Hi"), (A, "Go."))},       # 1 valid
    {"chosen": conv((U, "Hi"), ("bot", "Hello.")), "rejected": conv((U, "Hi"), (A, "Go."))},   # 2 bad_messages
    {"chosen": conv((U, "Hi")), "rejected": conv((U, "Hi"))},                                 # 3 no_assistant_turn
    {"chosen": conv((U, "Hi"), (A, "a")), "rejected": conv((U, "Yo"), (A, "b"))},             # 4 mismatched_prompts
    {"chosen": conv((U, "Hi"), (A, "")), "rejected": conv((U, "Hi"), (A, "Go."))},            # 5 empty_field
    {"chosen": "not messages", "rejected": conv((U, "Hi"), (A, "Go."))},                      # 6 bad_messages
    {"chosen": conv((U, "Hi"), (A, "Hey")), "rejected": conv((U, "Hi"), (A, None))},          # 7 bad_messages
]


def write_lines(tmp_path, lines, name="bad.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def char_tokenizer(path, cfg=CFG):
    return CharTokenizer.train(training_texts(path, cfg))


def test_every_bad_explicit_record_is_counted(tmp_path):
    path = write_lines(tmp_path, EXPLICIT_LINES)
    tok = char_tokenizer(path)
    data = load_preference_data(path, CFG, tok)
    report = data.report
    assert {r: report.first[r] for r in report.skipped} == EXPECTED
    assert dict(report.skipped) == {r: len(v) for r, v in EXPECTED.items()}
    assert report.records == 13 and report.n_train == 3
    kept = [(tok.decode(ex["prompt_ids"]), tok.decode(ex["chosen_ids"]), tok.decode(ex["rejected_ids"]))
            for ex in data.train]
    assert kept == VALID  # nothing valid is lost
    summary = report.summary()
    assert "skipped 2 malformed_json (lines 2, 10)" in summary and "prompt_too_long" not in summary
    assert report.truncated_prompts == 1 and ": 1 prompts," in summary
    collate_preference(list(data.train), tok.pad_id)  # and the survivors batch fine


def test_every_bad_hh_record_is_counted(tmp_path):
    path = str(write_records(HH_RECORDS, tmp_path / "hh.jsonl"))
    data = load_preference_data(path, CFG, char_tokenizer(path))
    assert data.report.format == "hh"
    assert data.report.first == {"no_assistant_turn": [2], "identical_responses": [3], "empty_field": [4],
                                 "null_field": [5]}
    assert data.report.n_train == 1


@pytest.mark.parametrize("container", ["jsonl", "parquet", "csv"])
def test_every_bad_conversational_record_is_counted(tmp_path, container):
    records = CONV_RECORDS if container != "parquet" else [r for r in CONV_RECORDS if isinstance(r["chosen"], list)]
    path = str(write_records(records, tmp_path / f"conv.{container}"))
    cfg = DataConfig(format="conversational", eval_fraction=0.0)
    data = load_preference_data(path, cfg, CharTokenizer(list("HiGo.")))
    first = data.report.first
    if container == "parquet":  # 0-based record indexes, without record 6 (a string where parquet needs a list)
        assert first == {"bad_messages": [1, 5], "no_assistant_turn": [2], "mismatched_prompts": [3],
                         "empty_field": [4]}
    else:  # 1-based line numbers; a CSV's header is line 1
        shift = 1 if container == "csv" else 0
        assert first == {"bad_messages": [2 + shift, 6 + shift, 7 + shift], "no_assistant_turn": [3 + shift],
                         "mismatched_prompts": [4 + shift], "empty_field": [5 + shift]}
    assert data.report.n_train == 1


def test_csv_line_numbers_count_multiline_cells_and_short_rows(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('prompt,chosen,rejected\n"line one\nline two", a,b\nHi, same, same\n\nHi,only\nYo, c, d\n')
    data = load_preference_data(str(path), CFG, CharTokenizer(list("Hilneotwabcd ")))
    assert data.report.first == {"identical_responses": [4], "null_field": [6]}  # short row -> missing cell
    assert data.report.n_train == 2


@pytest.mark.parametrize("lines, needle", [
    (EXPLICIT_LINES, "line 2: malformed_json"),
])
def test_strict_mode_is_a_one_line_error(tmp_path, lines, needle):
    path = write_lines(tmp_path, lines)
    tok = char_tokenizer(path, DataConfig())
    with pytest.raises(UserError) as e:
        load_preference_data(path, DataConfig(eval_fraction=0.0, max_length=40, max_prompt_length=20, strict=True), tok)
    assert "\n" not in str(e.value) and needle in str(e.value)
    with pytest.raises(UserError, match=needle):  # the keyword wins over the config
        load_preference_data(path, CFG, tok, strict=True)


def test_strict_mode_keeps_a_long_prompt_truncated(tmp_path):
    """A prompt longer than max_length is no bad record: even strict mode keeps it, truncated to its end."""
    path = write_lines(tmp_path, EXPLICIT_LINES[:1] + EXPLICIT_LINES[8:9])
    tok = char_tokenizer(path, DataConfig())
    data = load_preference_data(path, CFG, tok, strict=True)
    assert data.report.n_train == 2 and data.report.truncated_prompts == 1 and not data.report.skipped


@pytest.mark.parametrize("records, fields", [
    ([{"question": "q", "answer": "a"}, {"question": "r", "answer": "b", "id": 3}], "answer, id, question"),
    ([{"text": "just text"}], "text"),
    ([{"chosen": " a"}], "chosen"),  # chosen without rejected
])
@pytest.mark.parametrize("container", ["jsonl", "csv", "parquet"])
def test_not_a_preference_set_lists_its_fields(tmp_path, records, fields, container):
    path = str(write_records(records, tmp_path / f"d.{container}"))
    with pytest.raises(UserError) as e:
        load_preference_data(path, CFG, CharTokenizer(list("ab")))
    assert "\n" not in str(e.value) and f"found fields: {fields}" in str(e.value)


def test_whole_file_errors_are_one_line(tmp_path):
    bad_json = tmp_path / "a.json"
    bad_json.write_text('[{"prompt": "x",')
    not_list = tmp_path / "b.json"
    not_list.write_text(json.dumps({"prompt": "x"}))
    all_garbage = write_lines(tmp_path, ["nope", "{"], "c.jsonl")
    bad_parquet = tmp_path / "d.parquet"
    bad_parquet.write_text("not parquet")
    for path in (bad_json, not_list, all_garbage, bad_parquet):
        with pytest.raises(UserError) as e:
            load_preference_data(str(path), CFG, CharTokenizer(list("ab")))
        assert "\n" not in str(e.value)


def test_all_records_bad_is_an_error_with_counts(tmp_path):
    path = write_lines(tmp_path, ['{"chosen": "a", "rejected": "a", "prompt": "p"}'] * 3)
    with pytest.raises(UserError, match="no usable preference pairs in 3 records \\(3 identical_responses\\)"):
        load_preference_data(path, CFG, CharTokenizer(list("ap")))
