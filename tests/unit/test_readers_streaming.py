"""The streaming reader: many files, large files split into read units, bad input at scale
(issue 25), and the late-CSV-error / non-JSON-file cases of issue 28 (items 8 and 9)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from raydapt.data.readers import (
    META_COLUMNS,
    DataError,
    NoUsableRows,
    TextRows,
    open_source,
    read_rows,
)

LABELS = ("negative", "positive")


def _rows(n: int, start: int = 0, prefix: str = "r") -> list[str]:
    return [json.dumps({"id": f"{prefix}{i}", "text": f"text {i}",
                        "label": LABELS[i % 2]}) for i in range(start, start + n)]


def _collect(src) -> pd.DataFrame:
    return src.dataset().to_pandas()


@pytest.mark.usefixtures("ray_local")
def test_large_file_is_split_into_units_and_a_bad_row_deep_inside_is_a_reject(tmp_path):
    lines = _rows(20_000)
    lines[17_345] = '{"id": "r17345", "text": "truncated'
    p = tmp_path / "big.jsonl"
    p.write_text("\n".join(lines) + "\n")
    src = open_source(p, normaliser=TextRows(labels=LABELS), unit_rows=3_000)
    assert len(src.units) >= 6  # one file, several parallel read tasks
    out = _collect(src)
    rows = out[out["_pos"] >= 0]
    markers = out[out["_pos"] < 0]
    assert len(rows) == 20_000 and rows["id"].is_unique  # rows in = rows out + rejects
    assert (-markers["_pos"] - 1).sum() == 20_000 and len(markers) == len(src.units)
    rej = rows[rows["_reject"] != ""]
    assert rej["_reject"].map(lambda r: json.loads(r)["reason"]).str.contains(
        "not a JSON object").tolist() == [True]
    # file order within and across units
    good = rows[rows["_reject"] == ""].sort_values(["_unit", "_pos"])
    assert good["id"].tolist() == [f"r{i}" for i in range(20_000) if i != 17_345]


@pytest.mark.usefixtures("ray_local")
def test_pool_directory_many_files_an_empty_one_and_a_parquet(tmp_path):
    d = tmp_path / "pool"
    d.mkdir()
    for k in range(5):
        (d / f"part-{k}.jsonl").write_text("\n".join(_rows(100, 100 * k)) + "\n")
    (d / "part-5.jsonl").write_text("")  # an empty file among many: no rows, no error
    pd.DataFrame([json.loads(x) for x in _rows(50, 1000)]).to_parquet(d / "part-6.parquet")
    (d / "_SUCCESS").write_text("")  # marker files are not data
    rows, rej = read_rows(d, labels=list(LABELS))
    assert rows.count() == 550 and rej.count() == 0
    assert set(rows.columns()) == {"id", "text", "label", "y"}


def test_pool_directory_with_different_schemas_names_the_file(tmp_path):
    d = tmp_path / "pool"
    d.mkdir()
    (d / "a.jsonl").write_text("\n".join(_rows(10)) + "\n")
    (d / "b.jsonl").write_text(json.dumps({"id": "x", "review": "t", "label": "positive"}) + "\n")
    with pytest.raises(DataError, match=r"b\.jsonl: no column 'text'.*columns found: "
                                         r"\['id', 'label', 'review'\]"):
        open_source(d, normaliser=TextRows(labels=LABELS))


def test_glob_and_nothing_matching(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(_rows(3)) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(_rows(3, 3)) + "\n")
    assert len(open_source(str(tmp_path / "*.jsonl")).files) == 2
    with pytest.raises(DataError, match="no file matches"):
        open_source(str(tmp_path / "*.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no jsonl / parquet / csv file"):
        open_source(tmp_path / "empty")


def test_broken_csv_row_at_line_1001_is_one_line_before_any_read(tmp_path):
    """Issue 28 item 8: the error comes from the driver's check, before Ray reads a row (so no
    Ray or pyarrow worker traceback can precede or follow it)."""
    lines = ["id,text,label"] + [f"{i},review {i},positive" for i in range(999)]
    lines += ['999,"an unterminated quote,positive'] + [f"{i},ok,negative" for i in range(1000, 1100)]
    p = tmp_path / "late.csv"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        open_source(p, normaliser=TextRows(labels=LABELS))  # no Ray needed: fails on the driver
    msg = str(e.value)
    assert "late.csv" in msg and "line 1001" in msg and "\n" not in msg, msg


@pytest.mark.usefixtures("ray_local")
def test_file_of_only_non_json_lines_gives_rejects_not_a_column_error(tmp_path):
    """Issue 28 item 9: every line a reject with its reason (then NoUsableRows, which makes the
    job write rejects.parquet), not ``no column ... columns found: []``."""
    p = tmp_path / "junk.jsonl"
    p.write_text("this is not json\nneither is this\n<html>\n")
    with pytest.raises(NoUsableRows) as e:
        read_rows(p, labels=list(LABELS))
    rej = e.value.rejects
    assert len(rej) == 3 and rej["reason"].str.startswith("not a JSON object").all()


@pytest.mark.usefixtures("ray_local")
def test_a_file_failing_inside_a_read_task_is_one_clear_error(tmp_path):
    """A parquet file corrupted after planning: the read task reports one message and the
    reader raises it as a DataError (no worker traceback)."""
    p = tmp_path / "d.parquet"
    pd.DataFrame([json.loads(x) for x in _rows(100)]).to_parquet(p)
    src = open_source(p, normaliser=TextRows(labels=LABELS))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2] + b"\0" * (len(data) - len(data) // 2))
    out = _collect(src)
    assert set(META_COLUMNS) <= set(out.columns)
    fatal = [r for r in out["_reject"] if r.startswith("!")]
    assert len(fatal) == 1 and "d.parquet: cannot be read as parquet" in fatal[0]


@pytest.mark.usefixtures("ray_local")
def test_a_small_file_is_not_split_into_hundreds_of_tiny_blocks(tmp_path):
    """Without a size estimate Ray Data splits every read into ``read_op_min_num_blocks``
    (200) blocks: a 2,000-row file became 200 ten-row blocks, and each later operation on it
    200 tasks (``read_rows`` of such a file took 9-11 s instead of ~2 s). With ``size_hint``
    (what ``read_rows`` uses) a file of under 1 MiB stays in a few blocks; streamed passes
    keep Ray's default split."""
    p = tmp_path / "small.jsonl"
    p.write_text("\n".join(_rows(2_000)) + "\n")
    assert p.stat().st_size < 1 << 20
    src = open_source(p, normaliser=TextRows(labels=LABELS))
    assert src.dataset(size_hint=True).materialize().num_blocks() <= 8
    assert src.dataset().materialize().num_blocks() > 8  # the default split, for passes
    rows, rejects = read_rows(p, labels=list(LABELS))
    assert rows.count() == 2_000 and rejects.count() == 0


def test_units_bytes_counts_ranges_and_whole_files_once(tmp_path):
    from raydapt.data.readers import ReadUnit, _units_bytes

    j, q = tmp_path / "a.jsonl", tmp_path / "b.parquet"
    j.write_text("x" * 300)
    pd.DataFrame({"id": ["1", "2"], "text": ["a", "b"]}).to_parquet(q)
    units = [ReadUnit(0, str(j), "jsonl", 0, 100), ReadUnit(1, str(j), "jsonl", 100, 300),
             ReadUnit(2, str(q), "parquet", 0, 1), ReadUnit(3, str(q), "parquet", 1, 2)]
    assert _units_bytes(units) == 300 + q.stat().st_size  # the parquet file counted once
    assert _units_bytes(units + [ReadUnit(4, "s3://b/k.jsonl", "jsonl")]) is None
