"""Sharded, resumable, atomically written stage passes, and progress/ETA while a Ray Dataset
streams back. Knows the stage cache and the tracker, never a job config.

Two entry points:

- :func:`stream_pass` (files to files): a :class:`~raydapt.data.readers.RowSource` (files split
  into read units) flows through a chain of per-row :class:`Step` s (Ray Data actor pools, no
  barrier between them) and each unit's output rows are written as one parquet shard of the
  stage cache the moment the unit is complete. The driver holds only the rows of units in
  flight, never the pool. Returns the :class:`~raydapt.core.cache.ShardedOutput` (files), not
  rows.
- :func:`sharded_pass` (a frame in the driver, the recipes' original API): the same shard /
  verify / resume rules over a pandas frame split into row ranges; returns the output frame.
- :func:`write_rows` (rows a fit trains on): rows arriving in order, chunk by chunk, written
  as a cached sharded output that Ray Train's workers then read through Ray Data
  (:meth:`~raydapt.core.cache.ShardedOutput.dataset`), not from a driver frame.

Both count a shard as done only when it verifies (readable parquet, expected row count); a bad
shard is recomputed with a message, and ``_SUCCESS`` is written only after every shard verified.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from raydapt.core.cache import ShardedOutput, StageCache
from raydapt.core.tracking import Tracker
from raydapt.data.readers import META_COLUMNS, DataError
from raydapt.stages.common import ERROR_COLUMN

Say = Callable[[str], None]


def _close(batches) -> None:
    """Close a dataset's batch iterator (a generator): called in a ``finally``, so a pass that
    stops early (an error, a kill test) ends the dataset's execution and its actor pools at
    once rather than whenever the generator is garbage-collected (on an autoscaling cluster,
    a failed attempt's actors would keep their nodes)."""
    close = getattr(batches, "close", None)
    if close is not None:
        close()


def stream_rows(ds, total: int, label: str, say: Say, on_batch=None, every_s: float = 60.0,
                keep: bool = True) -> pd.DataFrame:
    """Iterate a dataset's output, printing rows done, rows/s and ETA; returns all rows (none
    unless ``keep``: ``on_batch`` consumes them)."""
    parts, done, t0, last = [], 0, time.time(), 0.0
    batches = ds.iter_batches(batch_format="pandas", batch_size=None)
    try:
        for batch in batches:
            if keep:
                parts.append(batch)
            done += len(batch)
            if on_batch is not None:
                on_batch(batch)
            now = time.time()
            if now - last >= every_s or done >= total:
                rate = done / max(now - t0, 1e-9)
                say(f"{label}: {done}/{total} rows, {rate:.2f} rows/s, "
                    f"ETA {max(total - done, 0) / max(rate, 1e-9):.0f}s")
                last = now
    finally:
        _close(batches)  # an early stop ends the dataset's execution now
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["id", ERROR_COLUMN])


#: Ray's errors for work lost with its process or node (not the stage's own exceptions).
_LOST = ("RayActorError", "NodeDiedError", "ObjectLostError", "WorkerCrashedError",
         "LocalRayletDiedError")


def lost_work(exc: BaseException) -> str | None:
    """The Ray error in ``exc``'s chain that says work was lost with an actor, a worker or a
    node (retrying the unfinished shards may succeed), or None for any other error (a bug or
    bad input: retrying would fail the same way)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        names = {c.__name__ for c in type(e).__mro__}
        hit = names & set(_LOST)
        if hit:
            return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e) else ''}"
        e = e.__cause__ or e.__context__
    return None


def _retrying(attempt_fn: Callable[[int], None], retries: int, missing: Callable[[], list[int]],
              label: str, say: Say) -> None:
    """Run ``attempt_fn(attempt)`` (one pass over the shards still missing); when Ray loses
    work with a node or an actor, run it again over the shards still missing, up to
    ``retries`` times. Finished shards are on storage and are never redone."""
    for attempt in range(retries + 1):
        try:
            attempt_fn(attempt)
            return
        except Exception as exc:
            why = lost_work(exc)
            if why is None or attempt == retries:
                raise
            say(f"{label}: work lost mid-pass ({why}); {len(missing())} shard(s) unfinished, "
                f"restarting the pass over them (retry {attempt + 1}/{retries})")


def _check_done(cache: StageCache, d, sharded: ShardedOutput, label: str, say: Say) -> bool:
    """A finished (``_SUCCESS``) output whose shards all verify stays finished; otherwise the
    marker is taken back, the bad shards removed, and the caller recomputes them."""
    bad = sharded.verify()
    if not bad:
        return True
    cache.uncommit(d)
    for i, why in bad.items():
        say(f"{label}: shard {i} of a finished output is {why}; recomputing it")
        sharded.remove(i)
    return False


def _drop_bad(sharded: ShardedOutput, label: str, say: Say) -> None:
    for i, why in sharded.bad().items():
        say(f"{label}: shard {i} is {why}; recomputing it")
        sharded.remove(i)


def _say_changed_shards(cache: StageCache, stage: str, parts: dict[str, Any], key: str,
                        label: str, say: Say) -> None:
    """Issue 28 item 11: an unfinished run of the same stage with another shard size cannot
    lend its shards (they cover other rows); say so instead of recomputing silently."""
    for other, value, done in cache.siblings(stage, parts, differing=key):
        n = cache.shard_count(other)
        if not done and n:
            say(f"{label}: {key} is {parts.get(key)} now, {value} in an unfinished earlier run "
                f"({other}, {n} shards): its shards cover other rows and are not reused; "
                f"recomputing. `raydapt cache rm` removes it")


def _finish(cache: StageCache, d, sharded: ShardedOutput, stage: str) -> None:
    """Verify every shard, then (only then) mark the output finished."""
    bad = sharded.verify()
    if bad:
        i, why = next(iter(bad.items()))
        raise RuntimeError(f"{stage}: {len(bad)} shard(s) did not verify after the pass, e.g. "
                           f"shard {i}: {why}")
    cache.commit(d)


def sharded_pass(cache: StageCache, tracker: Tracker, stage: str, parts: dict[str, Any],
                 rows: pd.DataFrame, shard_rows: int,
                 make_ds: Callable[[list[pd.DataFrame]], Any], say: Say, *,
                 run_name: str | None = None, label: str | None = None,
                 retries: int = 2) -> pd.DataFrame:
    """A sharded, resumable pass: reuse a finished output with the same key; otherwise stream
    ``make_ds(shards)`` (the input rows of the shards still to do, one frame each) and write
    each shard of ``shard_rows`` input rows the moment all its rows are back (atomically), so a
    killed run resumes from its finished shards. Shards are verified (readable, row count)
    before they count as done and before ``_SUCCESS``. Prints rows done, rows/s and ETA; logs
    shards and rows/s to the stage's MLflow child run (``run_name``, default the stage). Output
    rows follow ``rows``' order whichever run computed them. When Ray loses the pass's work
    with a node or an actor, the pass restarts over its unfinished shards, up to ``retries``
    times (the pool's ``pass_retries``)."""
    parts = {**parts, "shard_rows": shard_rows}
    d, done = cache.get(stage, parts, keep_partial=True)
    sharded = cache.sharded(d, len(rows), shard_rows)
    label = label or stage
    with tracker.child(run_name or stage) as run_log:
        if done and _check_done(cache, d, sharded, label, say):
            run_log.metrics({"shards": sharded.n_shards, "shards_cached": sharded.n_shards})
            say(f"{label}: cached ({cache.where(d)})")
            return sharded.read_all()
        _drop_bad(sharded, label, say)
        todo = sharded.missing()
        n_done = sharded.n_shards - len(todo)
        run_log.metrics({"shards": sharded.n_shards, "shards_cached": n_done})
        if not todo:
            _finish(cache, d, sharded, stage)
            return sharded.read_all()
        if n_done:
            say(f"{label}: resuming, {n_done}/{sharded.n_shards} shards already done")
        else:
            _say_changed_shards(cache, stage, parts, "shard_rows", label, say)
        n_pending = sum(len(rows.iloc[sharded.rows(i)]) for i in todo)
        say(f"{label}: {n_pending} rows in {len(todo)} shards of <= {shard_rows}")

        def attempt(_: int) -> None:
            left = sharded.missing()  # a retry: the shards the lost attempt did not finish
            frames = [rows.iloc[sharded.rows(i)] for i in left]
            shard_of = {rid: i for i, f in zip(left, frames) for rid in f["id"]}
            need = {i: len(f) for i, f in zip(left, frames)}
            buf: dict[int, list[pd.DataFrame]] = {i: [] for i in left}
            got = dict.fromkeys(left, 0)

            def on_batch(batch: pd.DataFrame) -> None:
                for i, g in batch.groupby(batch["id"].map(shard_of), sort=False):
                    i = int(i)
                    buf[i].append(g)
                    got[i] += len(g)
                    if got[i] == need[i]:  # shard complete: write it in input order
                        order = rows["id"].iloc[sharded.rows(i)]
                        sharded.write(i, pd.concat(buf.pop(i)).set_index("id").loc[order]
                                      .reset_index())

            stream_rows(make_ds(frames), sum(need.values()), label, say, on_batch=on_batch,
                        keep=False)
            if buf:
                raise RuntimeError(f"{stage}: rows missing from the output of shards "
                                   f"{sorted(buf)}")

        t0 = time.time()
        _retrying(attempt, retries, sharded.missing, label, say)
        run_log.metrics({"rows": n_pending, "shards_reused": n_done,
                         "rows_per_s": n_pending / max(time.time() - t0, 1e-9)})
        _finish(cache, d, sharded, stage)
        return sharded.read_all()


# ---------------------------------------------------------------------------------------------
# training rows
# ---------------------------------------------------------------------------------------------


def shard_sizes(n_rows: int, n_shards: int) -> list[int]:
    """Rows per shard when ``n_rows`` rows are cut into ``n_shards`` near-equal shards in order:
    numpy's ``array_split`` rule (the first ``n_rows % n_shards`` shards one row longer)."""
    n_shards = max(1, min(n_shards, n_rows)) if n_rows else 1
    base, extra = divmod(n_rows, n_shards)
    return [base + 1] * extra + [base] * (n_shards - extra)


def write_rows(cache: StageCache, stage: str, parts: dict[str, Any],
               chunks: Callable[[], Iterable[pd.DataFrame]], n_rows: int, n_shards: int,
               say: Say, *, label: str | None = None) -> ShardedOutput:
    """The ``n_rows`` rows that ``chunks()`` yields (in order, chunks of any size) as a cached
    stage output of ``n_shards`` near-equal shards (:func:`shard_sizes`), written as the rows
    arrive, at most one shard held at a time. A finished output with the same key is reused
    without calling ``chunks``; an interrupted one is written again (its rows come from earlier
    stages' files, so this is a copy, not a recomputation). Every shard is verified before the
    output counts as finished. The fit then reads it with ``.dataset()``. No MLflow run of its
    own: the fit's run has the rows."""
    if n_rows < 1:
        raise ValueError(f"{stage}: no rows to write")
    sizes = shard_sizes(n_rows, n_shards)
    parts = {**parts, "n_rows": n_rows, "n_shards": len(sizes)}
    label = label or stage
    d, done = cache.get(stage, parts, keep_partial=True)  # on a URI cache: nothing downloaded
    out = cache.sharded(d, n_rows, max(sizes), n_shards=len(sizes))
    if done and _check_done(cache, d, out, label, say):
        return out
    i, buf, held, written = 0, [], 0, 0
    for chunk in chunks():
        while len(chunk):
            if i == len(sizes):
                raise RuntimeError(f"{stage}: more than the {n_rows} rows announced")
            take = min(len(chunk), sizes[i] - held)
            buf.append(chunk.iloc[:take])
            held += take
            chunk = chunk.iloc[take:]
            if held == sizes[i]:
                out.write(i, pd.concat(buf, ignore_index=True))
                written += held
                i, buf, held = i + 1, [], 0
    if written + held != n_rows or i != len(sizes):
        raise RuntimeError(f"{stage}: {written + held} rows arrived, {n_rows} announced")
    _finish(cache, d, out, stage)
    say(f"{label}: {n_rows} rows in {len(sizes)} shard(s) ({cache.where(d)})")
    return out


# ---------------------------------------------------------------------------------------------
# files to files
# ---------------------------------------------------------------------------------------------


@dataclass
class Step:
    """One per-row stage of a :func:`stream_pass` chain.

    Attributes:
        fn: a callable class (constructed once per actor with ``kwargs``) or a function,
            mapping a pandas batch of good rows (``id`` + ``columns``) to an output frame with
            ``id`` (one row per input row, any order) and optionally ``_error``.
        kwargs: ``fn``'s constructor kwargs.
        pool: ``map_batches`` kwargs (``pool_kwargs(section)``: compute, num_cpus, batch_size,
            ...); default one actor, one CPU.
        columns: input columns ``fn`` needs besides ``id`` (None: all of the previous step's).
        carry: input columns copied into the step's output row by row (by id when ``fn``
            reorders), so a later step or the output shard still has them (e.g. the text a
            student trains on, through the teacher and kNN steps).
    """

    fn: Any
    kwargs: dict[str, Any] = field(default_factory=dict)
    pool: dict[str, Any] = field(default_factory=dict)
    columns: list[str] | None = None
    carry: tuple[str, ...] = ()


class _Keep:
    """Runs a :class:`Step` on a batch's good rows and carries every row's ``_unit`` / ``_pos``
    through; rejects, end markers and rows that failed an earlier step pass by untouched. Output
    is an Arrow table (array cells become list columns, so a batch with no good row — without
    the step's columns — still concatenates with the others: missing columns become nulls)."""

    def __init__(self, fn: Any, kwargs: dict[str, Any], columns: list[str] | None,
                 carry: tuple[str, ...] = ()) -> None:
        self.inner = fn(**kwargs) if isinstance(fn, type) else fn
        self.columns = columns
        self.carry = tuple(carry)

    def __call__(self, batch: pd.DataFrame):
        import pyarrow as pa

        skip = (batch["_pos"].to_numpy() < 0) | (batch["_reject"].to_numpy() != "")
        if ERROR_COLUMN in batch:
            skip |= batch[ERROR_COLUMN].fillna("").to_numpy() != ""
        parts = []
        good = batch[~skip]
        if len(good):
            cols = ["id", *self.columns] if self.columns is not None else [
                c for c in good.columns if c not in (*META_COLUMNS, ERROR_COLUMN)]
            out = self.inner(good[cols].reset_index(drop=True))
            if ERROR_COLUMN not in out:
                out = out.assign(**{ERROR_COLUMN: ""})
            ids = good["id"].to_numpy()
            keep = ["_reject", "_unit", "_pos", *(c for c in self.carry if c not in out)]
            if len(out) == len(good) and (out["id"].to_numpy() == ids).all():
                meta = good[keep].reset_index(drop=True)
            else:  # any order: by id (first row of an id)
                meta = good.drop_duplicates("id").set_index("id").loc[
                    out["id"], keep].reset_index(drop=True)
            out = out.reset_index(drop=True)
            for c in meta.columns:
                out[c] = meta[c].to_numpy()
            parts.append(out)
        if skip.any():
            keep = batch.loc[skip, ["id", "_reject", "_unit", "_pos"]]
            err = batch.loc[skip, ERROR_COLUMN].fillna("") if ERROR_COLUMN in batch else ""
            parts.append(keep.assign(**{ERROR_COLUMN: err}))
        df = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
        return pa.Table.from_pandas(df, preserve_index=False)


_NAMED: dict[str, type] = {}


def _keep_for(fn: Any) -> type:
    """:class:`_Keep` under the step's own name (``GradProject``, ``EncodeQA``...), so Ray's
    dashboard, progress lines and state API show ``MapWorker(MapBatches(GradProject))`` instead
    of one ``_Keep`` for every pool."""
    name = getattr(fn, "__name__", None) or type(fn).__name__
    if name not in _NAMED:
        _NAMED[name] = type(name, (_Keep,), {"__module__": __name__, "__qualname__": name})
    return _NAMED[name]


def identity(batch: pd.DataFrame) -> pd.DataFrame:
    """A :class:`Step` function that returns its rows unchanged (the pure platform cost)."""
    return batch


def ids_only(batch: pd.DataFrame) -> pd.DataFrame:
    """A :class:`Step` function that keeps only the ids (a scan of a pool's or target's ids
    and reader rejects, before any model work)."""
    return batch[["id"]]


def _sentinel_stats(tbl) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    units = tbl.column("_unit").to_numpy()
    pos = tbl.column("_pos").to_numpy()
    rej = tbl.column("_reject").to_pylist() if tbl.num_rows else []
    fatal = [r[1:] for r in rej if r and r.startswith("!")]
    return units, pos, pos < 0, fatal


def stream_pass(cache: StageCache, tracker: Tracker, stage: str, parts: dict[str, Any],
                source: Any, steps: list[Step], say: Say, *, run_name: str | None = None,
                label: str | None = None, every_s: float = 60.0,
                on_shard: Callable[[int, Any], None] | None = None,
                stats: dict[str, Any] | None = None, retries: int = 2) -> ShardedOutput:
    """Files to files: ``source`` (a :class:`~raydapt.data.readers.RowSource`) → ``steps`` →
    one parquet shard per read unit in the stage cache.

    The key is ``parts`` plus the source's content fingerprint and unit size, so outputs stay
    content-addressed; a rerun computes only the units whose shard is missing or fails
    verification. Each output shard holds, in the unit's row order, one row per input row: the
    last step's columns for good rows, ``_error`` for a row a step could not process, and
    ``_reject`` (the reader's reject record, JSON) for a row the reader rejected. A file that
    cannot be read on stops the pass with one :class:`DataError`.

    Args:
        on_shard: called with (shard index, pyarrow Table) after each shard is written (e.g. a
            streaming top-N), not for shards reused from the cache.
        stats: filled with rows, shards computed / reused, seconds, and the most rows (and their
            units) the driver held at once while it waited for a unit's last rows.
        retries: restarts of the pass over its unfinished shards when Ray loses its work with
            a node or an actor (the pool's ``pass_retries``); finished shards are kept.

    Returns:
        the finished :class:`ShardedOutput` (``iter_tables`` / ``read_all`` to read it).
    """
    import pyarrow as pa

    parts = {**parts, "source": source.fingerprint(), "shard_rows": source.unit_rows}
    d, done = cache.get(stage, parts, keep_partial=True)
    sharded = cache.sharded(d, 0, 1, n_shards=len(source.units))
    label = label or stage
    stats = stats if stats is not None else {}
    with tracker.child(run_name or stage) as run_log:
        if done and _check_done(cache, d, sharded, label, say):
            run_log.metrics({"shards": sharded.n_shards, "shards_cached": sharded.n_shards})
            stats.update(shards=sharded.n_shards, shards_computed=0, rows=0, seconds=0.0)
            say(f"{label}: cached ({cache.where(d)})")
            return sharded
        _drop_bad(sharded, label, say)
        todo = sharded.missing()
        n_done = sharded.n_shards - len(todo)
        run_log.metrics({"shards": sharded.n_shards, "shards_cached": n_done})
        stats.update(shards=sharded.n_shards, shards_computed=len(todo), shards_reused=n_done)
        if n_done:
            say(f"{label}: resuming, {n_done}/{sharded.n_shards} shards already done")
        elif todo:
            _say_changed_shards(cache, stage, parts, "shard_rows", label, say)
        t0 = time.time()
        rows = 0
        written, last = 0, 0.0

        def attempt(_: int) -> None:
            nonlocal rows, written, last
            left = sharded.missing()  # a retry: the units the lost attempt did not finish
            ds = source.dataset(left)
            for st in steps:
                kw = {"batch_format": "pandas", **st.pool}
                if isinstance(st.fn, type) or "compute" in kw:
                    import ray

                    kw.setdefault("compute", ray.data.ActorPoolStrategy(size=1))
                keep = _keep_for(st.fn)
                args = (st.fn, st.kwargs, st.columns, st.carry)
                ds = ds.map_batches(keep, fn_constructor_args=args, **kw) if "compute" in kw \
                    else ds.map_batches(keep(*args), **kw)
            buf: dict[int, list[Any]] = {}
            got: dict[int, int] = {}
            expect: dict[int, int] = {}

            def flush(u: int) -> None:
                nonlocal written, rows
                tables = buf.pop(u, [])
                tbl = pa.concat_tables(tables, promote_options="permissive") if tables else \
                    pa.table({"id": pa.array([], pa.string()), "_reject": pa.array(
                        [], pa.string()), ERROR_COLUMN: pa.array([], pa.string()),
                        "_pos": pa.array([], pa.int64())})
                tbl = tbl.sort_by("_pos").drop_columns(
                    [c for c in ("_unit", "_pos") if c in tbl.column_names])
                sharded.write_table(u, tbl)
                got.pop(u, None)
                expect.pop(u, None)
                written += 1
                rows += tbl.num_rows
                if on_shard is not None:
                    on_shard(u, tbl)

            batches = ds.iter_batches(batch_format="pyarrow", batch_size=None)
            try:
                for batch in batches:
                    if batch.num_rows == 0:
                        continue
                    units, pos, is_marker, fatal = _sentinel_stats(batch)
                    if fatal:
                        raise DataError(fatal[0])
                    for u in np.unique(units):
                        u = int(u)
                        sel = units == u
                        mk = sel & is_marker
                        if mk.any():
                            expect[u] = int(-pos[mk][0] - 1)
                        body = sel & ~is_marker
                        n = int(body.sum())
                        if n:
                            buf.setdefault(u, []).append(batch.filter(pa.array(body)))
                            got[u] = got.get(u, 0) + n
                            held = sum(got[i] for i in buf)
                            if held > stats.get("peak_held_rows", 0):
                                stats.update(peak_held_rows=held, peak_held_units=len(buf))
                        if u in expect and got.get(u, 0) == expect[u]:
                            flush(u)
                        elif u in expect and got.get(u, 0) > expect[u]:
                            raise RuntimeError(f"{stage}: shard {u} has {got[u]} rows, its read "
                                               f"unit {expect[u]}")
                    now = time.time()
                    if now - last >= every_s:
                        el = max(now - t0, 1e-9)
                        say(f"{label}: {written}/{len(todo)} shards, {rows} rows, "
                            f"{rows / el:.1f} rows/s, ETA "
                            f"{(len(todo) - written) * el / max(written, 1):.0f}s")
                        last = now
            finally:
                _close(batches)  # an early stop ends the dataset's execution now
            unfinished = sorted(set(left) - {i for i in left if sharded.check(i) is None})
            if unfinished:
                raise RuntimeError(f"{stage}: shards {unfinished[:5]} did not complete (rows "
                                   f"{[got.get(i, 0) for i in unfinished[:5]]}, expected "
                                   f"{[expect.get(i) for i in unfinished[:5]]})")

        if todo:
            say(f"{label}: {len(todo)} shards of ~{source.unit_rows} rows from "
                f"{len(source.files)} file(s)")
            _retrying(attempt, retries, sharded.missing, label, say)
        sec = time.time() - t0
        stats.update(rows=rows, seconds=sec)
        run_log.metrics({"rows": rows, "shards_reused": n_done,
                         "rows_per_s": rows / max(sec, 1e-9)})
        _finish(cache, d, sharded, stage)
        if todo:
            say(f"{label}: {rows} rows in {sec:.1f}s ({rows / max(sec, 1e-9):.1f} rows/s), "
                f"{len(todo)} shards written, {n_done} reused")
        return sharded


def output_rejects(out: ShardedOutput, stage: str) -> pd.DataFrame:
    """The reject records of a streamed output: the reader's rejects (their records) and rows a
    step could not process (``file`` = the stage). Reads two small columns per shard."""
    from raydapt.data.readers import REJECT_COLUMNS

    recs: list[dict[str, Any]] = []
    for tbl in out.iter_tables(["id", "_reject", ERROR_COLUMN]):
        df = tbl.to_pandas()
        if "_reject" in df:
            recs += [json.loads(r) for r in df["_reject"] if r]
        if ERROR_COLUMN in df:
            bad = df[df[ERROR_COLUMN].fillna("") != ""]
            recs += [{"file": stage, "id": i, "reason": r, "raw": ""}
                     for i, r in zip(bad["id"], bad[ERROR_COLUMN])]
    return pd.DataFrame(recs, columns=REJECT_COLUMNS)
