"""The sharded, resumable, atomically written stage pass, and progress/ETA while a Ray Dataset
streams back. Knows the stage cache and the tracker, never a job config."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pandas as pd

from raydapt.core.cache import ShardedOutput, StageCache
from raydapt.core.tracking import Tracker
from raydapt.stages.common import ERROR_COLUMN

Say = Callable[[str], None]


def stream_rows(ds, total: int, label: str, say: Say, on_batch=None, every_s: float = 60.0,
                keep: bool = True) -> pd.DataFrame:
    """Iterate a dataset's output, printing rows done, rows/s and ETA; returns all rows (none
    unless ``keep``: ``on_batch`` consumes them)."""
    parts, done, t0, last = [], 0, time.time(), 0.0
    for batch in ds.iter_batches(batch_format="pandas", batch_size=None):
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
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["id", ERROR_COLUMN])


def sharded_pass(cache: StageCache, tracker: Tracker, stage: str, parts: dict[str, Any],
                 rows: pd.DataFrame, shard_rows: int,
                 make_ds: Callable[[list[pd.DataFrame]], Any], say: Say, *,
                 run_name: str | None = None, label: str | None = None) -> pd.DataFrame:
    """A sharded, resumable pass: reuse a finished output with the same key; otherwise stream
    ``make_ds(shards)`` (the input rows of the shards still to do, one frame each) and write
    each shard of ``shard_rows`` input rows the moment all its rows are back (atomically), so a
    killed run resumes from its finished shards. Prints rows done, rows/s and ETA; logs shards
    and rows/s to the stage's MLflow child run (``run_name``, default the stage). Output rows
    follow ``rows``' order whichever run computed them."""
    parts = {**parts, "shard_rows": shard_rows}
    d, done = cache.get(stage, parts, keep_partial=True)
    sharded = ShardedOutput(d, len(rows), shard_rows)
    label = label or stage
    with tracker.child(run_name or stage) as run_log:
        todo = sharded.missing() if not done else []
        n_done = sharded.n_shards - len(todo)
        run_log.metrics({"shards": sharded.n_shards, "shards_cached": n_done})
        if done:
            say(f"{label}: cached ({d})")
            return sharded.read_all()
        if not todo:
            cache.commit(d)
            return sharded.read_all()
        if n_done:
            say(f"{label}: resuming, {n_done}/{sharded.n_shards} shards already done")
        frames = [rows.iloc[sharded.rows(i)] for i in todo]
        shard_of = {rid: i for i, f in zip(todo, frames) for rid in f["id"]}
        need = {i: len(f) for i, f in zip(todo, frames)}
        buf: dict[int, list[pd.DataFrame]] = {i: [] for i in todo}
        got = dict.fromkeys(todo, 0)
        n_pending = sum(need.values())
        say(f"{label}: {n_pending} rows in {len(todo)} shards of <= {shard_rows}")

        def on_batch(batch: pd.DataFrame) -> None:
            for i, g in batch.groupby(batch["id"].map(shard_of), sort=False):
                i = int(i)
                buf[i].append(g)
                got[i] += len(g)
                if got[i] == need[i]:  # shard complete: write it in input order
                    order = rows["id"].iloc[sharded.rows(i)]
                    sharded.write(i, pd.concat(buf.pop(i)).set_index("id").loc[order]
                                  .reset_index())

        t0 = time.time()
        stream_rows(make_ds(frames), n_pending, label, say, on_batch=on_batch, keep=False)
        if buf:
            raise RuntimeError(f"{stage}: rows missing from the output of shards {sorted(buf)}")
        run_log.metrics({"rows": n_pending, "shards_reused": n_done,
                         "rows_per_s": n_pending / max(time.time() - t0, 1e-9)})
        cache.commit(d)
        return sharded.read_all()
