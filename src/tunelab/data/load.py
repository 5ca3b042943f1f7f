"""Read training records from files, folders or the Hugging Face hub, with file:line errors.

Every record is a dict; `_source` and `_line` remember where it came from (the 1-based line for
text formats, the row for Parquet and hub datasets) so any later error can cite `file:line`.
"""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

from tunelab.errors import ConfigError, DataError, closest

_SUFFIXES = {
    ".txt": "text",
    ".md": "text",
    ".csv": "csv",
    ".tsv": "tsv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
}
FORMATS = ("text", "csv", "tsv", "json", "jsonl", "parquet", "hf")
TEXT_MODES = ("file", "paragraph", "line")


def where(record: dict) -> str:
    """'file:line' of a record, for error messages."""
    return f"{record.get('_source', '<data>')}:{record.get('_line', '?')}"


def fields_of(record: dict) -> list[str]:
    """The record's own field names, without tunelab's bookkeeping keys."""
    return [k for k in record if not k.startswith("_")]


def load_records(
    source: str | Path,
    *,
    fmt: str | None = None,
    split: str = "train",
    text_mode: str = "file",
    columns: list[str] | None = None,
) -> list[dict]:
    """Records from a file, a folder of .txt/.md files or a hub dataset name.

    fmt is guessed from the suffix when None; split is used for hub datasets only;
    columns names the fields of a CSV/TSV file that has no header row.
    """
    if fmt is not None and fmt not in FORMATS:
        raise DataError(f"{source}: unknown data format {fmt!r}{closest(fmt, FORMATS)}")
    if text_mode not in TEXT_MODES:
        raise DataError(
            f"{source}: unknown text_mode {text_mode!r}{closest(text_mode, TEXT_MODES)}"
        )
    path = Path(source).expanduser()
    if fmt == "hf" or (fmt is None and not path.exists() and _looks_like_hub_name(str(source))):
        return _load_hub(str(source), split)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
        if not files:
            raise DataError(f"{path}: folder has no .txt or .md files")
        return [r for f in files for r in _load_text(f, text_mode)]
    fmt = fmt or _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{path}: cannot tell the format from suffix {path.suffix!r}; "
            f"pass fmt= one of {', '.join(FORMATS)}"
        )
    if fmt == "parquet":
        return _load_parquet(path)
    if fmt == "text":
        return _load_text(path, text_mode)
    if fmt in ("csv", "tsv"):
        return _load_csv(path, "\t" if fmt == "tsv" else ",", columns)
    return _load_json(path) if fmt == "json" else _load_jsonl(path)


def _read_text(path: Path) -> str:
    """The file as UTF-8 text; bad bytes and empty files are errors naming the line."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a BOM written by Excel/Notepad is not content
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 (byte 0x{data[e.start]:02x}); re-save the file as UTF-8"
        ) from None
    if not text.strip():
        raise DataError(f"{path}:1: empty file")
    return text


def _lines(text: str) -> list[str]:
    """Lines split at \n only: str.splitlines() also splits at \x85 and other characters
    that real text (IMDB reviews) holds inside a JSON string, which breaks lines apart."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _record(obj: dict, source: str | Path, line: int) -> dict:
    return {**obj, "_source": str(source), "_line": line}


def _load_text(path: Path, mode: str) -> list[dict]:
    text = _read_text(path)
    if mode == "file":
        return [_record({"text": text}, path, 1)]
    records, lines = [], _lines(text)
    if mode == "line":
        return [_record({"text": s}, path, i) for i, s in enumerate(lines, 1) if s.strip()]
    start, block = 0, []
    for i, s in enumerate([*lines, ""], 1):  # the sentinel flushes the last paragraph
        if s.strip():
            start = start or i
            block.append(s)
        elif block:
            records.append(_record({"text": "\n".join(block)}, path, start))
            start, block = 0, []
    return records


def _load_jsonl(path: Path) -> list[dict]:
    records = []
    for i, line in enumerate(_lines(_read_text(path)), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: bad JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
        records.append(_record(obj, path, i))
    return records


def _load_json(path: Path) -> list[dict]:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: bad JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict):
        keys = ", ".join(list(data)[:5])
        raise DataError(f"{path}:1: expected a list of objects, got one object (keys: {keys})")
    if not isinstance(data, list):
        raise DataError(f"{path}:1: expected a list of objects, got {type(data).__name__}")
    if not data:
        raise DataError(f"{path}:1: the list holds no records")
    # json.loads forgets positions; walk the array again with raw_decode to recover each line.
    records, decoder = [], json.JSONDecoder()
    pos, line = text.index("[") + 1, 1
    line += text.count("\n", 0, pos)
    for obj in data:
        while text[pos] in " \t\r\n,":
            line += text[pos] == "\n"
            pos += 1
        _, end = decoder.raw_decode(text, pos)
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{line}: expected a JSON object, got {type(obj).__name__}")
        records.append(_record(obj, path, line))
        line += text.count("\n", pos, end)
        pos = end
    return records


def _load_csv(path: Path, delimiter: str, columns: list[str] | None) -> list[dict]:
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter)
    header, records, prev = columns, [], 0
    try:
        for row in reader:
            start, prev = prev + 1, reader.line_num  # a quoted field may span several lines
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = row
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{path}:{start}: {len(row)} fields, but the header has {len(header)} "
                    f"({', '.join(header)})"
                )
            records.append(_record(dict(zip(header, row)), path, start))
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: bad CSV ({e})") from None
    if not records:
        raise DataError(f"{path}:1: no records below the header")
    return records


def _load_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises its own ArrowInvalid/OSError family
        raise DataError(f"{path}: cannot read Parquet: {str(e).splitlines()[0]}") from None
    if not rows:
        raise DataError(f"{path}:1: empty file")
    return [_record(row, path, i) for i, row in enumerate(rows, 1)]


def _looks_like_hub_name(name: str) -> bool:
    # 'owner/name' or 'name' with no suffix we know; a typo'd local path should not go online.
    return Path(name).suffix.lower() not in _SUFFIXES and name.count("/") <= 1 and " " not in name


def _load_hub(name: str, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{name}: no such local file, and hub datasets need the datasets library "
            "(pip install datasets)"
        ) from None
    try:
        data = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, missing dataset, offline mode: all reported the same way
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(
            f"{name}: cannot load hub dataset (split {split!r}): {first} "
            "(hub datasets need a connection; or pass a local file)"
        ) from None
    source = f"{name}[{split}]"
    return [_record(dict(row), source, i) for i, row in enumerate(data, 1)]


def require_fields(records: list[dict], fields: list[str], source: str | Path) -> None:
    """Fail on the first record missing one of fields, naming it and the closest field."""
    if not records:
        raise DataError(f"{source}: no records")
    for field in fields:
        for record in records:
            if field not in record:
                have = fields_of(record)
                raise DataError(
                    f"{where(record)}: record has no field {field!r}{closest(field, have)}; "
                    f"fields: {', '.join(have) or '(none)'}"
                )


def split_records(
    records: list[dict], val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """(train, val): a seeded random split; train and val keep the records' original order."""
    source = records[0].get("_source", "<data>") if records else "<data>"
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"{source}: val_fraction={val_fraction} must be in [0, 1)")
    n = len(records)
    if val_fraction == 0.0:
        if n < 1:
            raise DataError(f"{source}: 0 records; nothing to train on")
        return list(records), []
    if n < 2:
        raise DataError(
            f"{source}: {n} record(s) is too few to split into train and validation (need >= 2)"
        )
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [r for i, r in enumerate(records) if i in val_idx]
    return train, val


def load_split(
    path: str | None,
    val_path: str | None,
    val_fraction: float,
    seed: int,
    *,
    fmt: str | None = None,
    text_mode: str = "file",
    what: str = "training",
) -> tuple[list[dict], list[dict], list[dict]]:
    """(every record of path, train, val): val_path's records validate when given, else a
    seeded split of path's. `what` names the data in the error when there is no path."""
    if not path:
        raise ConfigError(f"no {what} data: give --data PATH (or data.path in the recipe)")
    records = load_records(path, fmt=fmt, text_mode=text_mode)
    if val_path:
        return records, records, load_records(val_path, fmt=fmt, text_mode=text_mode)
    return records, *split_records(records, val_fraction, seed)
