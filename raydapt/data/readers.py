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

import functools
import glob
import hashlib
import json
import os
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


# --------------------------------------------------------------------------------------------
# Streaming reads: a file, a directory or a glob of many files, large files split into units;
# Ray Data reads the units in parallel and normalises every row in the read task
# --------------------------------------------------------------------------------------------

META_COLUMNS = ["_reject", "_unit", "_pos"]
"""Columns a streamed block carries besides the normalised row: ``_reject`` (the reject record
as JSON, "" for a good row, ``!message`` for a file that cannot be read further), ``_unit`` (the
read unit = the shard the row belongs to) and ``_pos`` (the row's position in its unit; a row
with ``_pos < 0`` is the unit's end marker and says the unit had ``-_pos - 1`` rows)."""

_FORMAT_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def _known_suffix(path: Path) -> bool:
    return any(s in _FORMAT_SUFFIXES for s in (x.lower() for x in path.suffixes))


def resolve_files(source: str | Path | list[str | Path], fmt: str = "auto") -> list[str]:
    """The data files a source names: a file, a directory (every jsonl / parquet / csv file
    below it, sorted; names starting with ``.`` or ``_`` are skipped), a glob pattern, or a list
    of these. Raises :class:`DataError` when a path does not exist or names no file."""
    sources = list(source) if isinstance(source, (list, tuple)) else [source]
    out: list[str] = []
    for src in sources:
        s = str(src)
        p = Path(s)
        if "://" in s:
            out.append(s)
        elif p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and not any(
                part.startswith((".", "_")) for part in f.relative_to(p).parts))
            files = [f for f in files if fmt != "auto" or _known_suffix(f)]
            if not files:
                raise DataError(f"{s}: no jsonl / parquet / csv file in this directory")
            out += [str(f) for f in files]
        elif any(ch in s for ch in "*?["):
            files = sorted(f for f in glob.glob(s, recursive=True) if Path(f).is_file())
            if not files:
                raise DataError(f"{s}: no file matches this pattern")
            out += files
        elif p.is_file():
            out.append(s)
        else:
            raise DataError(f"data file not found: {s}")
    return out


@dataclass(frozen=True)
class ReadUnit:
    """One read task: ``jsonl`` bytes [start, end) of a file (the lines that *start* in the
    range), ``parquet`` row groups [start, end), ``csv`` the whole file (quoted values may span
    lines, so a CSV file is not split). ``end == -1``: the whole file."""

    index: int
    path: str
    fmt: str
    start: int = 0
    end: int = -1


def plan_units(files: list[str], *, fmt: str = "auto", unit_rows: int = 10_000
               ) -> list[ReadUnit]:
    """Split files into read units of about ``unit_rows`` rows (jsonl: by bytes, from the mean
    line length of the file's first MiB; parquet: whole row groups). Deterministic for given
    file contents. Files with no bytes are skipped (no unit)."""
    import pyarrow.parquet as pq

    if unit_rows < 1:
        raise ValueError("unit_rows must be >= 1")
    units: list[ReadUnit] = []
    for f in files:
        kind = detect_format(f, fmt)
        if "://" in f:
            units.append(ReadUnit(len(units), f, kind))
            continue
        size = os.path.getsize(f)
        if size == 0:
            continue
        if kind == "jsonl":
            with open(f, "rb") as fh:
                head = fh.read(1 << 20)
            per_line = len(head) / max(1, head.count(b"\n"))
            step = max(1024, int(unit_rows * per_line))
            for s0 in range(0, size, step):
                units.append(ReadUnit(len(units), f, kind, s0, min(size, s0 + step)))
        elif kind == "parquet":
            try:
                md = pq.ParquetFile(f).metadata
            except Exception as exc:
                raise DataError(f"{f}: cannot be read as parquet: {root_cause_message(exc)}"
                                ) from None
            start, rows = 0, 0
            for g in range(md.num_row_groups):
                rows += md.row_group(g).num_rows
                if rows >= unit_rows or g == md.num_row_groups - 1:
                    units.append(ReadUnit(len(units), f, kind, start, g + 1))
                    start, rows = g + 1, 0
            if md.num_row_groups == 0:
                units.append(ReadUnit(len(units), f, kind, 0, 0))
        else:
            units.append(ReadUnit(len(units), f, kind))
    return units


@dataclass(frozen=True)
class TextRows:
    """The normaliser of text rows (:data:`ROW_COLUMNS`, :func:`normalise_records`). A
    normaliser is a picklable callable ``(records, file) -> (rows frame, rejects frame)`` with
    ``columns`` (of the rows frame), ``needed`` (the file columns it requires) and ``defaults``
    (the value of each column in a reject or end-marker row; "" if not named)."""

    fields: Fields = Fields()
    labels: tuple[str, ...] | None = None
    require_label: bool = True
    max_text_chars: int | None = MAX_TEXT_CHARS

    columns = ROW_COLUMNS
    defaults = {"label": None, "y": -1}

    @property
    def needed(self) -> set[str]:
        f = self.fields
        return {f.id, f.text} | ({f.label} if self.require_label else set())

    def __call__(self, records: list[Any], file: str) -> tuple[pd.DataFrame, pd.DataFrame]:
        good, bad = normalise_records(
            records, file=file, fields=self.fields,
            labels=None if self.labels is None else list(self.labels),
            require_label=self.require_label, max_text_chars=self.max_text_chars)
        rows = pd.DataFrame(good, columns=ROW_COLUMNS).astype({"y": "int64"})
        return rows, pd.DataFrame(bad, columns=REJECT_COLUMNS)


def _block(norm: Any, rows: pd.DataFrame, bad: pd.DataFrame, unit: int, pos0: int
           ) -> pd.DataFrame:
    """Good rows, then reject rows (defaults + ``_reject`` JSON), with ``_unit`` / ``_pos``."""
    rows = rows.assign(_reject="")
    if len(bad):
        rej = pd.DataFrame({c: [norm.defaults.get(c, "")] * len(bad) for c in norm.columns})
        rej["id"] = [("" if i is None else str(i)) for i in bad["id"]]
        rej["_reject"] = [json.dumps(r, default=str) for r in bad.to_dict("records")]
        rows = pd.concat([rows, rej], ignore_index=True) if len(rows) else rej
    rows["_unit"] = np.int64(unit)
    rows["_pos"] = np.arange(pos0, pos0 + len(rows), dtype=np.int64)
    return rows.reset_index(drop=True)


def _marker(norm: Any, unit: int, pos: int, reject: str = "") -> pd.DataFrame:
    row = {c: norm.defaults.get(c, "") for c in norm.columns}
    return pd.DataFrame([{**row, "_reject": reject, "_unit": unit, "_pos": pos}])


def _jsonl_chunks(u: ReadUnit, block_rows: int):
    """Lists of parsed records of a jsonl unit (the lines that start in [start, end))."""
    if "://" in u.path:
        import pyarrow.fs as pafs

        fs, p = pafs.FileSystem.from_uri(u.path)
        with fs.open_input_stream(p) as fh:
            lines = [ln.rstrip(b"\r") for ln in fh.read().split(b"\n")]
        for i in range(0, len(lines), block_rows):
            yield parse_jsonl_lines(lines[i: i + block_rows])
        return
    with open(u.path, "rb") as fh:
        pos = u.start
        if u.start > 0:  # the line that holds byte start-1 belongs to the previous unit
            fh.seek(u.start - 1)
            pos = u.start - 1 + len(fh.readline())
        chunk: list[bytes] = []
        while pos < u.end:
            line = fh.readline()
            if not line:
                break
            pos += len(line)
            chunk.append(line.rstrip(b"\n").rstrip(b"\r"))
            if len(chunk) >= block_rows:
                yield parse_jsonl_lines(chunk)
                chunk = []
        if chunk:
            yield parse_jsonl_lines(chunk)


def _table_chunks(u: ReadUnit, block_rows: int):
    """Lists of records of a parquet (row groups) or csv (whole file, every column read as a
    string) unit."""
    import pyarrow as pa

    if u.fmt == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(u.path)
        groups = None if u.end < 0 else list(range(u.start, u.end))
        if groups == []:
            return
        for b in pf.iter_batches(batch_size=block_rows, row_groups=groups):
            yield b.to_pylist()
        return
    import pyarrow.csv as pacsv

    parse = pacsv.ParseOptions(newlines_in_values=True)  # multi-line quoted reviews
    read = pacsv.ReadOptions(block_size=1 << 22)
    names = pacsv.open_csv(u.path, read_options=read, parse_options=parse).schema.names
    conv = pacsv.ConvertOptions(column_types={n: pa.string() for n in names})
    reader = pacsv.open_csv(u.path, read_options=read, parse_options=parse, convert_options=conv)
    for b in reader:
        for i in range(0, b.num_rows, block_rows):
            yield b.slice(i, block_rows).to_pylist()


def read_unit(u: ReadUnit, norm: Any, block_rows: int = 2048,
              keep_ids: frozenset[str] | None = None, row_filter: Any = None):
    """The blocks of one read unit: normalised rows and rejects (:data:`META_COLUMNS`), then
    the end marker. A file that cannot be read on (broken CSV quoting, a corrupt parquet page)
    gives one ``!message`` row instead of a worker traceback. ``keep_ids``: only the good rows
    with these ids (a subset of a pool, e.g. the stage-2 candidates; rejects are dropped too —
    the full pass reported them). ``row_filter``: the same with a rule instead of a list (a
    picklable callable, rows frame → bool mask; e.g. a seeded split of the ids)."""
    n = 0
    try:
        chunks = _jsonl_chunks(u, block_rows) if u.fmt == "jsonl" else _table_chunks(
            u, block_rows)
        for records in chunks:
            rows, bad = norm(records, u.path)
            if keep_ids is not None:
                rows = rows[rows["id"].isin(keep_ids)]
                bad = bad.iloc[:0]
            if row_filter is not None:
                rows = rows[np.asarray(row_filter(rows), dtype=bool)] if len(rows) else rows
                bad = bad.iloc[:0]
            blk = _block(norm, rows, bad, u.index, n)
            n += len(blk)
            if len(blk):
                yield blk
    except Exception as exc:  # noqa: BLE001 - one clear message, the driver raises it
        where = _locate_csv_problem(Path(u.path)) if u.fmt == "csv" and "://" not in u.path \
            else None
        yield _marker(norm, u.index, n, "!" + f"{u.path}: cannot be read as {u.fmt}"
                      f"{f' at {where}' if where else ''}: {root_cause_message(exc)}")
        n += 1
    yield _marker(norm, u.index, -(n + 1))


def _units_bytes(units: list[ReadUnit]) -> int | None:
    """Bytes the units read: a jsonl unit's byte range; for other units the size of their
    file, counted once per file. None if any unit is a URI (no size without a request)."""
    total, whole = 0, set()
    for u in units:
        if "://" in u.path:
            return None
        if u.fmt == "jsonl" and u.end >= 0:
            total += u.end - u.start
        else:
            whole.add(u.path)
    try:
        return total + sum(os.path.getsize(f) for f in whole)
    except OSError:
        return None


def _datasource(units: list[ReadUnit], norm: Any, block_rows: int,
                keep_ids: frozenset[str] | None = None, size_hint: bool = False,
                row_filter: Any = None):
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class UnitsDatasource(Datasource):
        """One read task per unit (Ray Data runs them in parallel, streaming)."""

        def estimate_inmemory_data_size(self) -> int | None:
            # see RowSource.dataset: with an estimate Ray Data keeps blocks of >= ~1 MiB
            return _units_bytes(units) if size_hint else None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[Any]:
            return [ReadTask(functools.partial(read_unit, u, norm, block_rows, keep_ids,
                                               row_filter),
                             BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None,
                                           input_files=[u.path]))
                    for u in units]

        def get_name(self) -> str:
            return "ReadRows"

    return UnitsDatasource()


def _peek_columns(path: Path, fmt: str, n: int = 50) -> set[str] | None:
    """Columns seen in the first rows of a file (for the 'missing column' check); None when none
    of a jsonl file's first lines is a JSON object (its rows are all rejects, not a schema
    problem)."""
    if fmt == "jsonl":
        cols: set[str] = set()
        seen = False
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
                    seen = True
        return cols if seen else None
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return set(pq.read_schema(path).names)
    return set(pd.read_csv(path, nrows=n, dtype=str).columns)


def check_columns(path: str, fmt: str, needed: set[str]) -> None:
    """:class:`DataError` naming the file and its columns when a needed column is absent from
    its first rows (also a file that cannot be opened as its format)."""
    try:
        found = _peek_columns(Path(path), fmt)
    except Exception as exc:  # unreadable header / broken quoting / not parquet
        raise DataError(f"{path}: cannot be read as {fmt}: "
                        f"{str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}"
                        ) from None
    if found is None:
        return
    missing = sorted(needed - found)
    if missing:
        raise DataError(
            f"{path}: no column {', '.join(map(repr, missing))}; columns found: "
            f"{sorted(found)}. Set the *_field options of this data source to map them."
        )


@dataclass
class RowSource:
    """Rows of one or many files, planned into read units (= shards of a streaming pass).

    ``dataset(units)`` is a lazy Ray Dataset of the units (all by default): normalised rows +
    :data:`META_COLUMNS`. Nothing is read on the driver but file headers and sizes."""

    files: list[str]
    units: list[ReadUnit]
    normaliser: Any
    unit_rows: int
    block_rows: int = 2048
    keep_ids: frozenset[str] | None = None
    read_cpus: float = 0.5
    row_filter: Any = None  # a picklable rule (rows frame -> bool mask) whose repr names it

    def fingerprint(self) -> str:
        """Content hash of the files (sha256 of their bytes) and the normaliser: a stage's cache
        key part. The unit plan is not in it: it follows from the files and ``unit_rows``, which
        the pass keys separately (so a changed unit size can be recognised as just that)."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(f"{f}\0{fingerprint(f) if '://' not in f else 'uri'}\0".encode())
        h.update(repr(sorted({u.fmt for u in self.units})).encode())
        h.update(repr(self.normaliser).encode())
        if self.keep_ids is not None:
            h.update(b"keep\0" + "\0".join(sorted(self.keep_ids)).encode())
        if self.row_filter is not None:
            h.update(b"filter\0" + repr(self.row_filter).encode())
        return h.hexdigest()[:16]

    def dataset(self, units: list[int] | None = None, *, size_hint: bool = False):
        """The units as a Ray Dataset (one read task per unit). ``size_hint``: tell Ray Data
        the units' bytes, so that it keeps blocks of ~1 MiB; without it Ray Data splits the
        read into ``read_op_min_num_blocks`` (200) blocks. A read that is then filtered and
        collected (:func:`read_rows`) wants the few big blocks: 200 ten-row blocks of a
        2,000-row file made each later operation 200 tasks (9-11 s against 2-2.7 s). A
        streamed pass through actor pools keeps the default split: its pools pipeline better
        over small blocks (stage 1 of the pool benchmark at 10K rows: 170.6 rows/s against
        154.6 with the hint)."""
        import ray

        todo = self.units if units is None else [self.units[i] for i in units]
        return ray.data.read_datasource(
            _datasource(todo, self.normaliser, self.block_rows, self.keep_ids, size_hint,
                        self.row_filter),
            ray_remote_args={"num_cpus": self.read_cpus})


def open_source(source: str | Path | list[str | Path], *, fmt: str = "auto",
                normaliser: Any = None, unit_rows: int = 10_000, block_rows: int = 2048,
                keep_ids: frozenset[str] | None = None, read_cpus: float = 0.5,
                row_filter: Any = None) -> RowSource:
    """Plan a streaming read of ``source`` (file, directory, glob or list). Checks on the
    driver, before any row is read: files exist; each local file has the normaliser's columns
    (a pool directory whose files have different schemas names the file that lacks one); a
    CSV file parses (the first bad row is named). Empty files among many are skipped; if every
    file is empty, :class:`DataError`. ``keep_ids`` / ``row_filter``: read only these rows /
    the rows the rule keeps (see :func:`read_unit`); ``read_cpus``: CPUs a read task
    reserves."""
    norm = normaliser if normaliser is not None else TextRows()
    files = resolve_files(source, fmt)
    nonempty = []
    for f in files:
        try:
            check_not_empty(f)
        except DataError:
            if len(files) == 1:
                raise
            continue
        except OSError as exc:
            raise DataError(f"{f}: cannot be read: {exc.strerror or exc}") from None
        nonempty.append(f)
    if not nonempty:
        raise DataError(f"{source}: every file is empty")
    for f in nonempty:
        if "://" in f:
            continue
        kind = detect_format(f, fmt)
        check_columns(f, kind, set(norm.needed))
        if kind == "csv":
            where = _locate_csv_problem(Path(f))
            if where:
                raise DataError(f"{f}: cannot be read as csv at {where}")
    units = plan_units(nonempty, fmt=fmt, unit_rows=unit_rows)
    return RowSource(nonempty, units, norm, unit_rows, block_rows,
                     None if keep_ids is None else frozenset(map(str, keep_ids)), read_cpus,
                     row_filter)


def fatal_reject(rejects: list[str]) -> str | None:
    """The message of the first ``!`` (file cannot be read on) reject among ``_reject`` values."""
    return next((r[1:] for r in rejects if r.startswith("!")), None)


def read_rows(
    path: str | Path, *, fmt: str = "auto", fields: Fields = Fields(),
    labels: list[str] | None = None, require_label: bool = True,
    max_text_chars: int | None = MAX_TEXT_CHARS, unit_rows: int = 50_000,
):
    """Read a file (or a directory / glob of files) into ``(rows, rejects)`` Ray Datasets (both
    materialised). A large jsonl file is read as several units in parallel.

    Args:
        path: a jsonl, parquet or csv file (local path or a URI Ray Data can read), a directory
            or a glob.
        fmt: ``auto`` (from the suffix) or the format name.
        fields: column names of id, text and label in the file.
        labels: the label set; a label outside it is a reject. None accepts any label.
        require_label: rows without a label are rejects (True for a labeled source).
        max_text_chars: longer texts are rejects (None: no limit).
        unit_rows: rows per read task (about).

    Raises:
        DataError: the file does not exist, or none of its first rows has a needed column
            (the message lists the columns found), or it cannot be parsed (one line naming the
            file and row).
        NoUsableRows: every row is a reject (carries the rejects).
    """
    norm = TextRows(fields=fields, labels=None if labels is None else tuple(labels),
                    require_label=require_label, max_text_chars=max_text_chars)
    src = open_source(path, fmt=fmt, normaliser=norm, unit_rows=unit_rows)
    ds = src.dataset(size_hint=True).materialize()
    flagged = ds.filter(lambda r: r["_reject"] != "").select_columns(["_reject"]).materialize()
    bad = [r["_reject"] for r in flagged.take_all()] if flagged.count() else []
    fatal = fatal_reject(bad)
    if fatal:
        raise DataError(fatal)
    rows = ds.filter(lambda r: r["_reject"] == "" and r["_pos"] >= 0).drop_columns(
        META_COLUMNS).materialize()
    rejects = ray_dataset_from_records([json.loads(b) for b in bad])
    if rows.count() == 0:
        raise NoUsableRows(path, pd.DataFrame([json.loads(b) for b in bad],
                                              columns=REJECT_COLUMNS))
    return rows, rejects


def ray_dataset_from_records(records: list[dict[str, Any]]):
    """A materialised Ray Dataset of reject records (:data:`REJECT_COLUMNS`), empty if none."""
    import ray

    return ray.data.from_pandas(pd.DataFrame(records, columns=REJECT_COLUMNS)).materialize()


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
