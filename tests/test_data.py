"""Loading data files: records with their file:line, formats, errors that name the line,
the seeded split."""

import json
import sys

import pytest

from tunelab.data import load_records, load_split, require_fields, split_records
from tunelab.errors import ConfigError, DataError


def _write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


# --- loading -----------------------------------------------------------------------------------

BAD_INPUTS = {
    "bad_json_line.jsonl": ('{"text": "a"}\n{"text": "b"}\n{"text": "c",}\n', 3, "bad JSON"),
    "non_object.jsonl": ('{"text": "a"}\n[1, 2]\n', 2, "expected a JSON object"),
    "non_object.json": ('[\n  {"text": "a"},\n  5\n]\n', 3, "expected a JSON object"),
    "bad.json": ('[\n  {"text": "a"},\n  {"text": }\n]\n', 3, "bad JSON"),
    "latin1.txt": (b"fine\nalso fine\ncaf\xe9\n", 3, "not UTF-8"),
    "latin1.jsonl": (b'{"text": "a"}\n{"text": "caf\xe9"}\n', 2, "not UTF-8"),
    "empty.jsonl": ("", 1, "empty file"),
    "blank.txt": ("\n  \n", 1, "empty file"),
    "fields.csv": ("a,b\n1,2\n3,4,5\n", 3, "3 fields"),
    "quoted.csv": ('a,b\n1,"two\nlines"\n3\n', 4, "1 fields"),
    "header_only.csv": ("a,b\n", 1, "no records"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_malformed_input_names_file_and_line(tmp_path, name):
    content, line, what = BAD_INPUTS[name]
    path = _write(tmp_path, name, content)
    with pytest.raises(DataError) as e:
        load_records(path)
    assert f"{path}:{line}:" in str(e.value) and what in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_field_names_line_fields_and_closest(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "ouput": "d"}]
    path = _write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in rows))
    records = load_records(path)
    require_fields(records, ["instruction"], path)  # present everywhere: no error
    with pytest.raises(DataError) as e:
        require_fields(records, ["instruction", "output"], path)
    msg = str(e.value)
    assert f"{path}:2:" in msg and "'output'" in msg and "did you mean 'ouput'" in msg
    assert "fields: instruction, ouput" in msg


def test_json_list_keeps_each_records_line(tmp_path):
    text = '[\n  {"text": "a"},\n  {\n    "text": "b"\n  }, {"text": "c"}\n]'
    records = load_records(_write(tmp_path, "d.json", text))
    assert [(r["text"], r["_line"]) for r in records] == [("a", 2), ("b", 3), ("c", 5)]


def test_only_newline_ends_a_line(tmp_path):
    # U+0085 and U+2028 are line breaks to str.splitlines() but plain characters in JSON text.
    path = _write(tmp_path, "d.jsonl", '{"text": "a\x85b"}\r\n{"text": "c\u2028d"}\n')
    assert [(r["text"], r["_line"]) for r in load_records(path)] == [("a\x85b", 1), ("c\u2028d", 2)]


def test_csv_tsv_and_text_modes(tmp_path):
    csv = load_records(_write(tmp_path, "d.csv", 'q,a\nhi,"multi\nline"\nx,y\n'))
    assert [(r["q"], r["a"], r["_line"]) for r in csv] == [("hi", "multi\nline", 2), ("x", "y", 4)]
    tsv = load_records(_write(tmp_path, "d.tsv", "1\tone\n2\ttwo\n"), columns=["id", "text"])
    assert [r["text"] for r in tsv] == ["one", "two"]
    text = "para one\nstill one\n\n\npara two\n"
    path = _write(tmp_path, "doc.txt", text)
    assert [r["text"] for r in load_records(path)] == [text]
    paras = load_records(path, text_mode="paragraph")
    assert [(r["text"], r["_line"]) for r in paras] == [("para one\nstill one", 1), ("para two", 5)]
    assert [r["_line"] for r in load_records(path, text_mode="line")] == [1, 2, 5]
    _write(tmp_path, "b.md", "second")
    assert [r["text"] for r in load_records(tmp_path, fmt=None)] == ["second", text]


def test_parquet_and_missing_optional_libraries(tmp_path, monkeypatch):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 1]}), path)
    assert [(r["text"], r["label"], r["_line"]) for r in load_records(path)] == [
        ("a", 0, 1),
        ("b", 1, 2),
    ]
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if not installed
    with pytest.raises(DataError, match="pip install pyarrow"):
        load_records(path)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="pip install datasets"):
        load_records("someone/some-dataset")


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="cannot tell the format"):
        load_records(_write(tmp_path, "d.xml", "<a/>"))
    with pytest.raises(DataError, match="did you mean 'jsonl'"):
        load_records(tmp_path, fmt="jsonll")


def test_split_is_seeded_disjoint_and_refuses_tiny_data():
    records = [{"text": str(i), "_source": "d.jsonl", "_line": i + 1} for i in range(50)]
    train, val = split_records(records, 0.2, seed=1)
    assert (len(train), len(val)) == (40, 10)
    assert sorted(r["text"] for r in train + val) == sorted(r["text"] for r in records)
    assert split_records(records, 0.2, seed=1) == (train, val)
    assert split_records(records, 0.2, seed=2)[1] != val
    with pytest.raises(DataError, match=r"d\.jsonl: 1 record"):
        split_records(records[:1], 0.1)
    assert [len(part) for part in split_records(records[:2], 0.1)] == [1, 1]
    assert len(split_records(records[:2], 0.01)[0]) == 1  # never an empty train set
    with pytest.raises(DataError, match="val_fraction"):
        split_records(records, 1.0)


def test_load_split_takes_val_data_or_splits_the_training_data(tmp_path):
    for name, n in (("train.jsonl", 10), ("val.jsonl", 3)):
        (tmp_path / name).write_text(
            "".join(json.dumps({"text": f"{name} {i}"}) + "\n" for i in range(n))
        )
    train_path, val_path = str(tmp_path / "train.jsonl"), str(tmp_path / "val.jsonl")
    records, train, val = load_split(train_path, val_path, 0.2, seed=1)
    assert train == records == load_records(train_path) and val == load_records(val_path)
    records, train, val = load_split(train_path, None, 0.2, seed=1)
    assert (train, val) == split_records(records, 0.2, seed=1) and len(val) == 2
    with pytest.raises(ConfigError, match="^no preference data: give --data PATH"):
        load_split(None, val_path, 0.2, seed=1, what="preference")
