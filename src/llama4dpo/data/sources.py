"""Raw records from a data source: a local file, a Hugging Face hub dataset name, or `builtin:NAME`.

Local files: .jsonl, .json, .csv, .parquet, each optionally gzipped (.jsonl.gz, ...). JSONL and CSV are
read here line by line, so one malformed line is a counted skip located by its 1-based line number
(`datasets`' JSON loader would fail on the whole file, and CSV fields may span lines). JSON arrays and
parquet are read whole and located by 0-based record index (a .json file holding JSON lines is read
as JSONL; a JSON array saved as .jsonl is a one-line error asking for the .json name). A hub name goes to `datasets.load_dataset(name, split=data.split)` (records located by
index); `data.split` applies to hub data sets only. `data.max_samples` keeps the first records, bad
ones included. Everything downstream works on `datasets.Dataset`s built from the extracted texts.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .report import Skip

FILE_KINDS = ("jsonl", "json", "csv", "parquet", "txt")
BUILTIN_PREFIX = "builtin:"


@dataclass
class RawRecords:
    """`rows` holds (location, record) pairs; the record is a dict, or a `Skip` for an unparseable line."""

    source: str
    unit: str  # "line" or "record", see DataReport.unit
    rows: list[tuple[int, dict | Skip]]

    def fields(self) -> list[str]:
        seen: dict[str, None] = {}
        for _, rec in self.rows:
            if isinstance(rec, dict):
                seen.update(dict.fromkeys(map(str, rec)))
        return list(seen)


def builtin_name(source: str) -> str | None:
    return source[len(BUILTIN_PREFIX):] if source.startswith(BUILTIN_PREFIX) else None


def file_kind(source: str) -> str | None:
    """"jsonl" for data.jsonl and data.jsonl.gz, ...; None when the name has no data-file suffix."""
    suffixes = [s.lower() for s in Path(source).suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    kind = suffixes[-1][1:] if suffixes else None
    return kind if kind in FILE_KINDS else None


def open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


def read_records(source: str, *, split: str = "train", max_samples: int | None = None) -> RawRecords:
    """Read every record of a local file or hub dataset (the first `max_samples` if set), unparsed."""
    path = Path(source)
    kind = file_kind(source)
    try:
        path.is_file()
    except (OSError, ValueError) as e:  # a name too long for the filesystem, a NUL byte
        raise UserError(f"data source {source[:80]!r}: {e}") from None
    if path.is_dir():
        raise UserError(f"data source {source} is a directory; give a .jsonl/.json/.csv/.parquet file")
    if path.is_file() and kind is None:
        raise UserError(f"data file {source}: unsupported type (expected .jsonl, .json, .csv or .parquet, "
                        "optionally .gz)")
    if kind is not None and not path.is_file():
        raise UserError(f"data file not found: {source}")
    limit = sys.maxsize if max_samples is None else max_samples
    try:
        if kind == "jsonl":
            rows = _read_jsonl(path, limit)
            if rows and not any(isinstance(r, dict) for _, r in rows) and _starts_with_bracket(path):
                # Its lines are fragments of one array (or one line holding a list): no record would parse.
                raise UserError(f"data file {source} looks like a JSON array, not JSON lines (one object per "
                                "line); rename it from .jsonl to .json")
            return RawRecords(source, "line", rows)
        if kind == "json":
            return _read_json(path, source, limit)
        if kind == "csv":
            return RawRecords(source, "line", _read_csv(path, source, limit))
        if kind == "parquet":
            return RawRecords(source, "record", _read_parquet(path, source, limit))
        if kind == "txt":
            raise UserError(f"data file {source}: a .txt file is a pretraining corpus, not a record set")
    except (OSError, EOFError, zlib.error, ValueError) as e:  # unreadable, truncated or corrupt gzip, ...
        raise UserError(f"cannot read data file {source}: {type(e).__name__}: {e}") from None
    return RawRecords(source, "record", _read_hub(source, split, limit))


def _read_jsonl(path: Path, limit: int) -> list:
    rows = []
    with open_binary(path) as f:
        for lineno, line in enumerate(f, 1):
            if len(rows) >= limit:
                break
            if not line.strip():
                continue  # blank lines are not records
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                rows.append((lineno, Skip("malformed_json", _first_line(e))))
                continue
            rows.append((lineno, rec if isinstance(rec, dict) else Skip("malformed_json", "not a JSON object")))
    return rows


def _starts_with_bracket(path: Path) -> bool:
    with open_binary(path) as f:
        return f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")  # (after a UTF-8 BOM)


def _read_json(path: Path, source: str, limit: int) -> RawRecords:
    with open_binary(path) as f:
        data = f.read()
    try:
        obj = json.loads(data)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines saved as .json (common on the hub)
            return RawRecords(source, "line", _read_jsonl(path, limit))
        raise UserError(f"data file {source} is not valid JSON: {e.msg} (line {e.lineno})") from None
    except (ValueError, RecursionError) as e:
        raise UserError(f"data file {source} is not valid JSON: {_first_line(e)}") from None
    if not isinstance(obj, list):
        raise UserError(f"data file {source}: expected a JSON list of records (or JSON lines), "
                        f"got a JSON {type(obj).__name__}")
    return RawRecords(source, "record", [(i, r if isinstance(r, dict) else Skip("malformed_json", "not an object"))
                                         for i, r in enumerate(obj[:limit])])


def _read_csv(path: Path, source: str, limit: int) -> list:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # responses can exceed the 128 kB default
    rows = []
    with open_binary(path) as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, restval=None)
        try:
            for rec in reader:
                if len(rows) >= limit:
                    break
                rec.pop(None, None)  # cells beyond the header
                # line_num is the record's last line; quoted fields may span lines, blank lines are skipped
                newlines = sum(v.count("\n") for v in rec.values() if isinstance(v, str))
                rows.append((reader.line_num - newlines, rec))
        except (csv.Error, UnicodeDecodeError) as e:
            raise UserError(f"data file {source} line {reader.line_num}: not valid CSV ({_first_line(e)})") from None
    return rows


def _read_parquet(path: Path, source: str, limit: int) -> list:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with open_binary(path) as f:
            table = pq.read_table(f)
    except pa.ArrowException as e:
        raise UserError(f"data file {source} is not a readable parquet file: {_first_line(e)}") from None
    if table.num_columns == 0:  # pyarrow reports 2**63-1 rows for a column-less table: nothing to read
        return []
    try:
        return list(enumerate(table.slice(0, min(limit, table.num_rows)).to_pylist()))
    except (UnicodeDecodeError, pa.ArrowException) as e:
        raise UserError(f"data file {source}: unreadable values ({_first_line(e)})") from None


def _read_hub(name: str, split: str, limit: int) -> list:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown name, unknown split, gated, ...: all one line for the user
        raise UserError(f"cannot load hub dataset {name!r} (split {split!r}): {type(e).__name__}: "
                        f"{_first_line(e)}") from None
    if limit < len(ds):
        ds = ds.select(range(limit))
    return list(enumerate(ds))


def write_records(records: list[dict], path: str | Path) -> Path:
    """Write records in the container named by `path`'s suffix (the inverse of `read_records`). In CSV,
    list and dict values (message lists) are stored as JSON strings, which the conversational format reads."""
    path = Path(path)
    kind = file_kind(str(path))
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    fields = list(dict.fromkeys(k for r in records for k in r))  # every record's keys, not just the first's
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        with opener(path, "wb") as f:
            pq.write_table(pa.table({k: [r.get(k) for r in records] for k in fields}), f)
    elif kind in ("jsonl", "json"):
        with opener(path, "wt", encoding="utf-8") as f:
            if kind == "json":
                json.dump(records, f, ensure_ascii=False)
            else:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    elif kind == "csv":
        with opener(path, "wt", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fields)
            writer.writeheader()
            writer.writerows({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()}
                             for r in records)
    else:
        raise UserError(f"cannot write records to {path}: use .jsonl, .json, .csv or .parquet (optionally .gz)")
    return path


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]
