"""Readers: every row ends up either as a normalised row or as a reject with its reason."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from raydapt.data.readers import (
    DataError,
    Fields,
    normalise_records,
    read_rows,
    split_and_subsample,
)

pytestmark = pytest.mark.usefixtures("ray_local")
LABELS = ["negative", "positive"]


def _write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_rejects_carry_reasons_and_nothing_is_lost(tmp_path):
    lines = [
        json.dumps({"id": "a", "text": "good", "label": "positive"}),
        json.dumps({"id": "b", "text": "   ", "label": "positive"}),
        json.dumps({"id": "c", "text": "fine", "label": "neutral"}),
        '{"id": "d", "text": "broken',
        json.dumps({"text": "no id", "label": "negative"}),
        json.dumps({"id": "f", "text": 42, "label": "negative"}),
        json.dumps({"id": "g", "text": "no label"}),
        json.dumps([1, 2]),
        json.dumps({"id": 7, "text": "numeric id ok", "label": "negative"}),
    ]
    rows, rej = read_rows(_write_jsonl(tmp_path / "d.jsonl", lines), labels=LABELS)
    rows, rej = rows.to_pandas(), rej.to_pandas()
    assert len(rows) + len(rej) == len(lines)
    assert sorted(rows["id"]) == ["7", "a"]
    assert rows.set_index("id").loc["a", "y"] == 1
    reasons = " | ".join(rej["reason"])
    for want in ["empty text", "not in the label set", "not a JSON object", "missing id",
                 "is not a string", "missing label"]:
        assert want in reasons, want


def test_unlabeled_rows_allowed_when_labels_not_required(tmp_path):
    lines = [json.dumps({"id": "a", "text": "x"}), json.dumps({"id": "b", "text": "y",
                                                               "label": "negative"})]
    rows, rej = read_rows(_write_jsonl(tmp_path / "t.jsonl", lines), labels=LABELS,
                          require_label=False)
    got = rows.to_pandas().set_index("id")
    assert got.loc["a", "y"] == -1 and got.loc["b", "y"] == 0 and rej.count() == 0


def test_missing_column_fails_with_columns_found(tmp_path):
    p = _write_jsonl(tmp_path / "m.jsonl", [json.dumps({"id": "a", "review": "x",
                                                        "label": "positive"})])
    with pytest.raises(DataError, match=r"no column 'text'.*columns found: \['id', 'label', 'review'\]"):
        read_rows(p, labels=LABELS)
    rows, _ = read_rows(p, labels=LABELS, fields=Fields(text="review"))
    assert rows.count() == 1


def test_csv_and_parquet(tmp_path):
    df = pd.DataFrame({"id": ["a", "b", "c"], "text": ["x", "", "z"],
                       "label": ["positive", "negative", "bogus"]})
    df.to_csv(tmp_path / "d.csv", index=False)
    df.to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.parquet"):
        rows, rej = read_rows(tmp_path / name, labels=LABELS)
        assert rows.to_pandas()["id"].tolist() == ["a"] and rej.count() == 2


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_rows(tmp_path / "nope.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="format"):
        read_rows(tmp_path / "x.txt")


def test_split_is_seeded_and_order_independent():
    df = pd.DataFrame({"id": [str(i) for i in range(200)], "text": "t", "label": None, "y": -1})
    tr1, te1 = split_and_subsample(df, seed=3, test_fraction=0.25, max_rows=50)
    tr2, te2 = split_and_subsample(df.sample(frac=1, random_state=1), seed=3,
                                   test_fraction=0.25, max_rows=50)
    assert tr1["id"].tolist() == tr2["id"].tolist() and set(te1["id"]) == set(te2["id"])
    assert not set(tr1["id"]) & set(te1["id"]) and len(tr1) == 50
    assert 30 < len(te1) < 70  # ~25% of 200
    _, te3 = split_and_subsample(df, seed=4, test_fraction=0.25)
    assert set(te3["id"]) != set(te1["id"])


def test_normalise_records_without_label_set_keeps_any_label():
    good, bad = normalise_records([{"id": 1, "text": "t", "label": "whatever"}], file="f",
                                  fields=Fields(), labels=None, require_label=True)
    assert good == [{"id": "1", "text": "t", "label": "whatever", "y": -1}] and bad == []


def test_duplicate_ids_become_rejects_and_shared_ids_fail():
    from raydapt.data.readers import check_disjoint_ids, drop_duplicate_ids

    df = pd.DataFrame({"id": ["a", "b", "a", "a"], "text": ["1", "2", "3", "4"],
                       "label": None, "y": -1})
    rows, rej = drop_duplicate_ids(df, file="f.jsonl")
    assert rows["text"].tolist() == ["1", "2"] and len(rows) + len(rej) == len(df)
    assert rej["id"].tolist() == ["a", "a"] and rej["reason"].str.contains("duplicate id").all()
    check_disjoint_ids(rows, pd.DataFrame({"id": ["c"]}), what="x and y")
    with pytest.raises(DataError, match="share 1 ids"):
        check_disjoint_ids(rows, pd.DataFrame({"id": ["b", "c"]}), what="source and target")


def test_broken_csv_quoting_after_the_peeked_rows_names_file_and_row(tmp_path):
    """The column check peeks at 50 rows; a broken quote at row 61 used to surface as a Ray
    worker traceback with terminal colour codes (issue 16)."""
    lines = ["id,text,label"] + [f'{i},"review {i} is fine",positive' for i in range(60)]
    lines += ['60,"an unterminated quote,positive', "61,ok,negative"]
    p = tmp_path / "broken.csv"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        read_rows(p, labels=LABELS)
    msg = str(e.value)
    assert str(p) in msg and "row 61 (line 62)" in msg, msg
    assert "\x1b[" not in msg and "ray::" not in msg and "\n" not in msg


def test_empty_file_says_so(tmp_path):
    for name, body in (("e.jsonl", ""), ("w.jsonl", "\n  \n"), ("e.csv", "")):
        p = tmp_path / name
        p.write_text(body)
        with pytest.raises(DataError, match=r"file is empty"):
            read_rows(p, labels=LABELS)
