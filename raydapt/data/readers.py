"""Read jsonl / parquet / csv files into Ray Datasets with a checked, normalised schema.

Every reader returns rows with these columns (see :data:`ROW_COLUMNS`):

- ``id`` (str): the row's id (from ``id_field``), unique within a file.
- ``text`` (str): the input text (from ``text_field``), never empty.
- ``label`` (str | None): the label as written, or None when the row carries none.
- ``y`` (int): the label's index in the label set, or -1 when there is no label.

Rows that cannot be used are never dropped silently: they go to a *rejects* dataset with the
file, the row's id (if any), the raw row (truncated) and a ``reason``. A file that lacks a needed
column altogether fails at once with the columns it has.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raydapt import RaydaptError

ROW_COLUMNS = ["id", "text", "label", "y"]
REJECT_COLUMNS = ["file", "id", "reason", "raw"]
_RAW_MAX = 500  # characters of the raw row kept in a reject record
MAX_TEXT_CHARS = 1_000_000  # longer texts are rejects (no model reads them; tokenising is slow)


class DataError(RaydaptError):
    """A data file that cannot be read as asked (missing file or column, unknown format)."""


class NoUsableRows(DataError):
    """Every row of a file was rejected. Carries the rejects, so the job can write them (to
    ``rejects.parquet``) before it stops: see :func:`raydapt.preflight.checked_job`."""

    def __init__(self, file: str | Path, rejects: pd.DataFrame) -> None:
        self.file, self.rejects = str(file), rejects
        super().__init__(f"no usable rows in {file}: {len(rejects)} rejected")


def check_not_empty(path: str | Path) -> None:
    """Raise :class:`DataError` for a local file with no bytes but whitespace (not "columns
    found: []" later)."""
    p = Path(path)
    if "://" in str(path) or not p.is_file():
        return
    if p.stat().st_size == 0 or (p.stat().st_size < 1 << 16 and not p.read_bytes().strip()):
        raise DataError(f"{path}: file is empty")


@dataclass(frozen=True)
class Fields:
    """Which columns of a file hold the id, text and label."""

    id: str = "id"
    text: str = "text"
    label: str = "label"


def detect_format(path: str | Path, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    suffixes = "".join(Path(path).suffixes).lower()
    for ext, name in ((".jsonl", "jsonl"), (".json", "jsonl"), (".parquet", "parquet"),
                      (".csv", "csv")):
        if ext in suffixes:
            return name
    raise DataError(f"{path}: cannot tell the format from the name; set format: jsonl|parquet|csv")


def fingerprint(path: str | Path) -> str:
    """sha256 of a file's bytes (first 16 hex chars): the data fingerprint logged to MLflow."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _reject(file: str, rid: Any, reason: str, raw: Any) -> dict[str, Any]:
    raw_s = raw if isinstance(raw, str) else json.dumps(raw, default=str, ensure_ascii=False)
    return {"file": file, "id": None if rid is None else str(rid), "reason": reason,
            "raw": raw_s[:_RAW_MAX]}


def normalise_records(
    records: list[Any], *, file: str, fields: Fields, labels: list[str] | None,
    require_label: bool, max_text_chars: int | None = MAX_TEXT_CHARS,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Check and normalise parsed rows. Returns (good rows, reject records).

    ``records`` items are dicts (parsed rows) or ``(raw_line, error)`` tuples for rows that did
    not parse. ``labels`` is the label set (None: any label is accepted and ``y`` is -1).
    """
    good: list[dict[str, Any]] = []
    bad: list[dict[str, Any]] = []
    index = {lab: i for i, lab in enumerate(labels)} if labels is not None else None
    for rec in records:
        if isinstance(rec, tuple):
            bad.append(_reject(file, None, f"not a JSON object: {rec[1]}", rec[0]))
            continue
        if not isinstance(rec, dict):
            bad.append(_reject(file, None, f"not a JSON object: got {type(rec).__name__}", rec))
            continue
        rid = rec.get(fields.id)
        if rid is None or (isinstance(rid, float) and np.isnan(rid)) or str(rid).strip() == "":
            bad.append(_reject(file, None, f"missing id field {fields.id!r}", rec))
            continue
        if isinstance(rid, (dict, list)):
            bad.append(_reject(file, None, f"id field {fields.id!r} is not a scalar", rec))
            continue
        text = rec.get(fields.text)
        if not isinstance(text, str):
            what = "missing" if text is None else f"not a string ({type(text).__name__})"
            bad.append(_reject(file, rid, f"text field {fields.text!r} is {what}", rec))
            continue
        if not text.strip():
            bad.append(_reject(file, rid, "empty text", rec))
            continue
        if max_text_chars is not None and len(text) > max_text_chars:
            bad.append(_reject(file, rid, f"text longer than {max_text_chars} characters "
                               f"({len(text)})", rec))
            continue
        label = rec.get(fields.label)
        if isinstance(label, float) and np.isnan(label):
            label = None
        if label is None:
            if require_label:
                bad.append(_reject(file, rid, f"missing label field {fields.label!r}", rec))
                continue
            y = -1
        else:
            label = str(label) if not isinstance(label, str) else label
            if index is not None and label not in index:
                bad.append(_reject(
                    file, rid, f"label {label!r} is not in the label set {labels}", rec))
                continue
            y = index[label] if index is not None else -1
        good.append({"id": str(rid), "text": text, "label": label, "y": y})
    return good, bad


def parse_jsonl_lines(lines: list[bytes | str]) -> list[Any]:
    """Parse jsonl lines (bytes as read from disk, or str) into dicts / values, or
    ``(raw, reason)`` tuples for lines that are not valid UTF-8 or not valid JSON. Blank lines
    are not rows and are skipped."""
    out: list[Any] = []
    for line in lines:
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                out.append((line.decode("utf-8", "replace"),
                            f"invalid UTF-8 at byte {exc.start} of the line"))
                continue
        if not line.strip():
            continue  # blank lines are not rows
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            out.append((line, f"{exc.msg} at column {exc.colno}"))
        except RecursionError:
            out.append((line, "JSON nested too deeply"))
    return out


def _split_lines(batch: pd.DataFrame) -> pd.DataFrame:
    """map_batches over ``read_binary_files`` rows: one file's bytes -> one row per line.
    Splits on b"\n" only (Ray's read_text decodes a whole file — one invalid byte fails the
    job — and also splits inside JSON strings on U+2028 and friends)."""
    lines = [ln.rstrip(b"\r") for data in batch["bytes"] for ln in bytes(data).split(b"\n")]
    return pd.DataFrame({"line": pd.Series(lines, dtype=object)})


class _NormaliseBatch:
    """map_batches function: raw rows -> normalised rows + ``_reject`` JSON (empty if good)."""

    def __init__(self, *, file: str, fields: Fields, labels: list[str] | None,
                 require_label: bool, jsonl: bool, max_text_chars: int | None) -> None:
        self.kw = dict(file=file, fields=fields, labels=labels, require_label=require_label,
                       max_text_chars=max_text_chars)
        self.jsonl = jsonl

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        if self.jsonl:
            records = parse_jsonl_lines(batch["line"].tolist())
        else:
            records = batch.to_dict("records")
        good, bad = normalise_records(records, **self.kw)
        rows = [{**g, "_reject": ""} for g in good] + [
            {"id": b["id"], "text": "", "label": None, "y": -1, "_reject": json.dumps(b)}
            for b in bad
        ]
        return pd.DataFrame(rows, columns=[*ROW_COLUMNS, "_reject"])


def _peek_columns(path: Path, fmt: str, n: int = 50) -> set[str]:
    """Columns seen in the first rows of a file (for the 'missing column' check)."""
    if fmt == "jsonl":
        cols: set[str] = set()
        with open(path, encoding="utf-8", errors="replace") as f:
            for i, line in enumerate(f):
                if i >= n:
                    break
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict):
                    cols |= set(rec)
        return cols
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return set(pq.read_schema(path).names)
    return set(pd.read_csv(path, nrows=n).columns)


def read_rows(
    path: str | Path, *, fmt: str = "auto", fields: Fields = Fields(),
    labels: list[str] | None = None, require_label: bool = True,
    max_text_chars: int | None = MAX_TEXT_CHARS,
):
    """Read one file into ``(rows, rejects)`` Ray Datasets (both materialised).

    Args:
        path: a jsonl, parquet or csv file (local path or a URI Ray Data can read).
        fmt: ``auto`` (from the suffix) or the format name.
        fields: column names of id, text and label in the file.
        labels: the label set; a label outside it is a reject. None accepts any label.
        require_label: rows without a label are rejects (True for a labeled source).
        max_text_chars: longer texts are rejects (None: no limit).

    Raises:
        DataError: the file does not exist, or none of its first rows has a needed column
            (the message lists the columns found).
    """
    import ray

    p = Path(path)
    if "://" not in str(path) and not p.exists():
        raise DataError(f"data file not found: {path}")
    check_not_empty(path)
    fmt = detect_format(path, fmt)
    needed = {fields.id, fields.text} | ({fields.label} if require_label else set())
    if "://" not in str(path):
        try:
            found = _peek_columns(p, fmt)
        except Exception as exc:  # unreadable header / broken quoting / not parquet
            raise DataError(f"{path}: cannot be read as {fmt}: "
                            f"{str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}"
                            ) from None
        missing = sorted(needed - found)
        if missing:
            raise DataError(
                f"{path}: no column {', '.join(map(repr, missing))}; columns found: "
                f"{sorted(found)}. Set the *_field options of this data source to map them."
            )
    if fmt == "jsonl":
        ds = ray.data.read_binary_files(str(path)).map_batches(
            _split_lines, batch_format="pandas", batch_size=1)
    elif fmt == "parquet":
        ds = ray.data.read_parquet(str(path))
    elif fmt == "csv":
        import pyarrow.csv as pacsv

        # quoted values may span lines (multi-line reviews); pyarrow refuses them by default
        ds = ray.data.read_csv(str(path), parse_options=pacsv.ParseOptions(newlines_in_values=True))
    else:  # pragma: no cover - guarded by detect_format
        raise DataError(f"unknown format {fmt}")
    fn = _NormaliseBatch(file=str(path), fields=fields, labels=labels,
                         require_label=require_label, jsonl=fmt == "jsonl",
                         max_text_chars=max_text_chars)
    try:
        ds = ds.map_batches(fn, batch_format="pandas", batch_size=1024).materialize()
    except Exception as exc:  # a file-level failure (e.g. broken CSV quoting): one clear error
        where = _locate_csv_problem(p) if fmt == "csv" and "://" not in str(path) else None
        raise DataError(f"{path}: cannot be read as {fmt}"
                        f"{f' at {where}' if where else ''}: {root_cause_message(exc)}"
                        ) from None
    rows = ds.filter(lambda r: r["_reject"] == "").drop_columns(["_reject"]).materialize()
    rejects = ds.filter(lambda r: r["_reject"] != "").map(
        lambda r: json.loads(r["_reject"])).materialize()
    if rows.count() == 0:
        raise NoUsableRows(path, pd.DataFrame(rejects.take_all(), columns=REJECT_COLUMNS))
    return rows, rejects


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def root_cause_message(exc: BaseException, limit: int = 300) -> str:
    """The first line of the innermost cause of ``exc``, without Ray's task wrapper
    (``ray::ReadCSV->... (pid=...)``), worker tracebacks or terminal colour codes."""
    cause = exc
    while True:
        inner = getattr(cause, "cause", None)  # ray.exceptions.RayTaskError keeps the original
        if isinstance(inner, BaseException) and inner is not cause:
            cause = inner
        elif cause.__cause__ is not None:
            cause = cause.__cause__
        else:
            break
    lines = [ln.strip() for ln in _ANSI.sub("", str(cause)).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("ray::", "Traceback", "File "))] or lines
    return (lines[0] if lines else type(cause).__name__)[:limit]


def _locate_csv_problem(path: Path) -> str | None:
    """``row N (line L)`` of the first CSV record that does not parse or has a different number
    of fields than the header (Python's strict csv parser, on the driver); None if none."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.reader(f, strict=True)
            start, width, n = 1, None, 0
            try:
                for rec in reader:
                    if width is None:  # the header
                        width = len(rec)
                    elif rec:
                        n += 1
                        if len(rec) != width:
                            return (f"row {n} (line {start}): {len(rec)} fields, the header "
                                    f"has {width}")
                    start = reader.line_num + 1
            except csv.Error as exc:
                return f"row {n + 1} (line {start}): {exc}"
    except OSError:
        return None
    return None


def read_csv_table(path: str | Path, **kw: Any) -> pd.DataFrame:
    """A local CSV file as a DataFrame (pandas); a file that does not parse is one
    :class:`DataError` naming the file and the first bad row."""
    try:
        return pd.read_csv(path, **kw)
    except (ValueError, UnicodeDecodeError) as exc:  # pandas' ParserError is a ValueError
        where = _locate_csv_problem(Path(path))
        raise DataError(f"{path}: cannot be read as csv{f' at {where}' if where else ''}: "
                        f"{root_cause_message(exc)}") from None


def drop_duplicate_ids(df: pd.DataFrame, *, file: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep the first row of each id; later rows with the same id become rejects (stages join
    on ``id``, so a duplicate would silently corrupt them). Returns (rows, rejects)."""
    if "id" not in df.columns:  # no rows at all (Ray gives an empty frame without columns)
        df = pd.DataFrame(columns=ROW_COLUMNS)
    dup = df["id"].duplicated(keep="first")
    rej = pd.DataFrame({"file": file, "id": df.loc[dup, "id"],
                        "reason": "duplicate id (the first row with this id is kept)",
                        "raw": df.loc[dup, "text"].str.slice(0, _RAW_MAX)})
    return df[~dup].reset_index(drop=True), rej.reset_index(drop=True)


def check_disjoint_ids(a: pd.DataFrame, b: pd.DataFrame, *, what: str) -> None:
    """Raise :class:`DataError` if two tables share ids (e.g. the same file as source and target)."""
    shared = set(a["id"]) & set(b["id"])
    if shared:
        ex = ", ".join(sorted(map(str, shared))[:5])
        raise DataError(f"{what} share {len(shared)} ids (e.g. {ex}); ids must be unique across "
                        "them — use different files or prefix the ids")


# --------------------------------------------------------------------------------------------
# Seeded, order-independent splits and subsamples (hash of (seed, salt, id))
# --------------------------------------------------------------------------------------------


def unit_hash(ids: pd.Series | list[str], *, seed: int, salt: str) -> np.ndarray:
    """A uniform number in [0, 1) per id, fixed by (seed, salt, id): independent of row order."""
    out = np.empty(len(ids), dtype=np.float64)
    for i, rid in enumerate(ids):
        d = hashlib.blake2b(f"{seed}:{salt}:{rid}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(d, "big") / 2.0**64
    return out


def split_and_subsample(
    df: pd.DataFrame, *, seed: int, test_fraction: float | None = None,
    max_rows: int | None = None, max_test_rows: int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Split a table into (train, test) by a seeded id hash; keep the max_rows lowest-hash rows.

    The split of an id never depends on the other rows, so adding data does not reshuffle it.
    """
    u_split = unit_hash(df["id"], seed=seed, salt="split")
    u_take = unit_hash(df["id"], seed=seed, salt="subsample")
    df = df.assign(_u=u_take)
    if test_fraction is None:
        train, test = df, None
    else:
        is_test = u_split < test_fraction
        train, test = df[~is_test], df[is_test]
    train = train.sort_values("_u").head(max_rows) if max_rows else train.sort_values("_u")
    train = train.drop(columns="_u").reset_index(drop=True)
    if test is not None:
        test = test.sort_values("_u").head(max_test_rows) if max_test_rows else test.sort_values("_u")
        test = test.drop(columns="_u").reset_index(drop=True)
    return train, test
