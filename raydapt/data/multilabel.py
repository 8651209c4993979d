"""Multi-label reader with domain selection (DALLMi): one file -> source / target tables.

Rows come as jsonl / parquet / csv with an id, a text, a domain field and the labels either as a
list of names per row (``labels_field``, e.g. ``"labels": ["B", "C"]``; a csv cell may hold a
JSON list or ``B|C``) or as one-hot 0/1 columns (``label_columns``). Output rows:

- ``id`` (str), ``text`` (str), ``domain`` (str),
- ``labels`` (list[str]): the row's label names, in vocabulary order.

Rows that cannot be used are rejects (file, id, reason, raw), never silently dropped: missing
id or text, empty text, labels that are not a list, labels outside the vocabulary, one-hot cells
that are not 0/1, duplicate ids. A row whose domain is neither source nor target is simply not
selected (not a reject). A missing column fails at once, naming the columns found.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raydapt.data.labels import build_vocab
from raydapt.data.readers import (
    REJECT_COLUMNS,
    DataError,
    NoUsableRows,
    check_not_empty,
    detect_format,
    read_csv_table,
)

_RAW_MAX = 500


def _load_table(path: Path, fmt: str) -> pd.DataFrame:
    if fmt == "jsonl":
        recs, bad = [], []
        # bytes split on b"\n": an invalid UTF-8 line is a reject, not a crash
        for i, raw in enumerate(path.read_bytes().split(b"\n")):
            if not raw.strip():
                continue
            line = raw.decode("utf-8", "replace")
            try:
                rec = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                bad.append({"_line": i + 1, "_raw": line[:_RAW_MAX],
                            "_err": f"invalid UTF-8 at byte {exc.start} of the line"})
                continue
            except json.JSONDecodeError as exc:
                bad.append({"_line": i + 1, "_raw": line[:_RAW_MAX], "_err": exc.msg})
                continue
            if isinstance(rec, dict):
                recs.append(rec)
            else:
                bad.append({"_line": i + 1, "_raw": line[:_RAW_MAX], "_err": "not an object"})
        df = pd.DataFrame(recs)
        if bad:
            df = pd.concat([df, pd.DataFrame(bad)], ignore_index=True)
        return df
    if fmt == "parquet":
        return pd.read_parquet(path)
    return read_csv_table(path, keep_default_na=False)


def _as_list(v: Any) -> list[str] | None:
    """A labels cell -> list of names, or None when it is not a list."""
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, list):
        return [str(x) for x in v]
    if isinstance(v, str):  # csv: JSON list or 'A|B'
        s = v.strip()
        if s.startswith("["):
            try:
                out = json.loads(s)
            except json.JSONDecodeError:
                return None
            return [str(x) for x in out] if isinstance(out, list) else None
        return [x for x in s.split("|") if x] if s else []
    return None


def read_multilabel(
    path: str | Path, *, fmt: str = "auto", id_field: str = "id", text_field: str = "text",
    labels_field: str | None = "labels", label_columns: list[str] | None = None,
    labels: list[str] | None = None, domain_field: str = "domain",
    domains: list[str] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Read a multi-label file. Returns ``(rows, rejects, vocab)``.

    Args:
        path: jsonl / parquet / csv file.
        labels_field / label_columns: where the labels are (list column, or one-hot columns).
        labels: the vocabulary (head order); None = every label seen (sorted), or the
            label_columns in their order.
        domain_field, domains: keep only rows whose domain is in ``domains`` (None = all).

    Raises:
        DataError: missing file, or a needed column absent from the file.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {path}")
    check_not_empty(p)
    fmt = detect_format(p, fmt)
    df = _load_table(p, fmt)
    needed = [id_field, text_field, domain_field]
    needed += list(label_columns) if label_columns else [labels_field]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        found = sorted(c for c in df.columns if not str(c).startswith("_"))
        raise DataError(f"{path}: no column {', '.join(map(repr, missing))}; columns found: "
                        f"{found}. Set data.*_field / data.label_columns to map them.")
    rejects: list[dict[str, Any]] = []

    def reject(rec: dict[str, Any], reason: str) -> None:
        rid = rec.get(id_field)
        rejects.append({"file": str(path), "id": None if _blank(rid) else str(rid),
                        "reason": reason,
                        "raw": json.dumps(rec, default=str, ensure_ascii=False)[:_RAW_MAX]})

    if "_err" in df.columns:
        for _, r in df[df["_err"].notna()].iterrows():
            rejects.append({"file": str(path), "id": None,
                            "reason": f"line {r['_line']}: not a JSON object ({r['_err']})",
                            "raw": r["_raw"]})
        df = df[df["_err"].isna()]
    vocab = list(labels) if labels is not None else (list(label_columns) if label_columns else None)
    rows: list[dict[str, Any]] = []
    for rec in df.to_dict("records"):
        rid, text, dom = rec.get(id_field), rec.get(text_field), rec.get(domain_field)
        if _blank(rid):
            reject(rec, f"missing id field {id_field!r}")
            continue
        if not isinstance(text, str):
            reject(rec, f"text field {text_field!r} is missing or not a string")
            continue
        if not text.strip():
            reject(rec, "empty text")
            continue
        dom = "" if _blank(dom) else str(dom)
        if domains is not None and dom not in domains:
            continue
        if label_columns:
            cells = [rec.get(c) for c in label_columns]
            try:
                vals = [int(float(c)) for c in cells]
            except (TypeError, ValueError):
                vals = [-1]
            if any(v not in (0, 1) for v in vals):
                reject(rec, f"one-hot label columns must hold 0/1, got {cells}")
                continue
            names = [c for c, v in zip(label_columns, vals) if v == 1]
        else:
            names = _as_list(rec.get(labels_field))
            if names is None:
                reject(rec, f"labels field {labels_field!r} is not a list")
                continue
        if vocab is not None:
            unknown = sorted(set(names) - set(vocab))
            if unknown:
                reject(rec, f"labels {unknown} are not in the label set")
                continue
        rows.append({"id": str(rid), "text": text, "domain": dom, "labels": names})
    out = pd.DataFrame(rows, columns=["id", "text", "domain", "labels"])
    dup = out["id"].duplicated(keep="first")
    for _, r in out[dup].iterrows():
        rejects.append({"file": str(path), "id": r["id"],
                        "reason": "duplicate id (the first row with this id is kept)",
                        "raw": r["text"][:_RAW_MAX]})
    out = out[~dup].reset_index(drop=True)
    if out.empty and rejects:
        raise NoUsableRows(path, pd.DataFrame(rejects, columns=REJECT_COLUMNS))
    if vocab is None:
        vocab = build_vocab(out["labels"])
    order = {lab: i for i, lab in enumerate(vocab)}
    out["labels"] = [sorted(set(x), key=order.__getitem__) for x in out["labels"]]
    return out, pd.DataFrame(rejects, columns=REJECT_COLUMNS), vocab


def _blank(v: Any) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip() == ""
