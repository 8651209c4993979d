"""Shared pieces of Ray Data stages: row-level failure isolation, reject records, telemetry."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from raydapt.core.telemetry import StageTelemetry
from raydapt.data.readers import REJECT_COLUMNS

ERROR_COLUMN = "_error"


def run_isolating_failures(
    batch: pd.DataFrame, fn: Callable[[pd.DataFrame], pd.DataFrame], *, stage: str,
    error_types: tuple[type[BaseException], ...] = (Exception,),
) -> pd.DataFrame:
    """Apply ``fn`` to a batch; if it raises, retry row by row and mark failing rows.

    Returns ``fn``'s output with an ``_error`` column: "" for good rows, the reason for rows that
    failed (those keep their ``id`` and have nulls elsewhere, NaN arrays of the good rows' shape in
    array columns: a column mixing arrays and nulls cannot become an Arrow block, and Ray Data
    fails the whole pass with "Found columns with both objects and tensors"). A row is never
    silently dropped.
    """
    try:
        out = fn(batch)
        return out.assign(**{ERROR_COLUMN: ""})
    except error_types as exc:  # noqa: F841 - retried per row below
        parts = []
        for i in range(len(batch)):
            row = batch.iloc[i : i + 1]
            try:
                parts.append(fn(row).assign(**{ERROR_COLUMN: ""}))
            except error_types as row_exc:
                parts.append(pd.DataFrame({
                    "id": row["id"].tolist(),
                    ERROR_COLUMN: [f"{stage}: {type(row_exc).__name__}: {row_exc}"[:500]],
                }))
        return _fill_array_columns(pd.concat(parts, ignore_index=True))


def _fill_array_columns(out: pd.DataFrame) -> pd.DataFrame:
    """Failed rows' cells in array-valued columns -> NaN arrays of the good rows' shape."""
    bad = (out[ERROR_COLUMN] != "").to_numpy()
    if not bad.any() or bad.all():
        return out
    for col in out.columns:
        good = out.loc[~bad, col]
        first = good.iloc[0]
        if isinstance(first, np.ndarray):
            nan = np.full(first.shape, np.nan, dtype=np.result_type(first.dtype, np.float32))
            out[col] = [v if not b else nan.copy() for v, b in zip(out[col], bad)]
    return out


def split_errors(df: pd.DataFrame, stage: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A stage's output -> (its good rows without the error column, reject records of the rows
    that failed, ``file`` = the stage)."""
    if ERROR_COLUMN not in df:
        return df, pd.DataFrame(columns=REJECT_COLUMNS)
    bad = df[df[ERROR_COLUMN] != ""]
    rej = pd.DataFrame({"file": stage, "id": bad["id"], "reason": bad[ERROR_COLUMN], "raw": ""})
    return df[df[ERROR_COLUMN] == ""].drop(columns=ERROR_COLUMN).reset_index(drop=True), rej


def concat_rejects(rejects: list[pd.DataFrame]) -> pd.DataFrame:
    """All reject records of a job in one frame (:data:`REJECT_COLUMNS`, empty if none)."""
    return pd.concat([r for r in rejects if len(r)], ignore_index=True) if any(
        len(r) for r in rejects) else pd.DataFrame(columns=REJECT_COLUMNS)


class Timer:
    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.t0


class Stage:
    """Base of every Ray Data stage (a callable class for ``map_batches``): ``__call__`` runs
    :meth:`process` on the batch with row-level failure isolation
    (:func:`run_isolating_failures`), times it, and records rows, rejects, seconds and the
    stage's own counts (:meth:`counts`: tokens, gradients) to its Ray metrics
    (:class:`~raydapt.core.telemetry.StageTelemetry`), tagged with the method and run the
    ``telemetry`` dict names (the dashboards filter on them). Subclasses load their model in
    ``__init__`` (calling ``super().__init__(stage, telemetry)``) and implement
    :meth:`process`."""

    def __init__(self, stage: str, telemetry: dict[str, str] | None = None) -> None:
        self.stage = stage
        self.metrics = StageTelemetry(stage, **(telemetry or {}))

    def process(self, batch: pd.DataFrame) -> pd.DataFrame:
        raise NotImplementedError

    def counts(self, out: pd.DataFrame, good: int) -> dict[str, int]:
        """Extra :meth:`StageTelemetry.record_batch` counts of one output batch (``good``
        rows without an error): ``tokens``, ``gradients``. None by default."""
        return {}

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        with Timer() as t:
            out = run_isolating_failures(batch, self.process, stage=self.stage)
        bad = int((out[ERROR_COLUMN] != "").sum())
        self.metrics.record_batch(rows=len(batch), rejected=bad, seconds=t.seconds,
                                  **self.counts(out, len(out) - bad))
        return out


def pool_kwargs(section) -> dict[str, Any]:
    """``map_batches`` kwargs for an :class:`~raydapt.config.ActorPoolSection`: a fixed pool of N
    actors or an autoscaling [min, max] one, CPUs / GPUs / custom resources per actor, and a
    bounded number of actor restarts and batch retries. Every recipe's actor pools use this."""
    import ray

    c = section.concurrency
    compute = (ray.data.ActorPoolStrategy(size=c) if isinstance(c, int)
               else ray.data.ActorPoolStrategy(min_size=c[0], max_size=c[1]))
    kw: dict[str, Any] = {"compute": compute, "num_cpus": section.num_cpus,
                          "batch_size": section.batch_size, "batch_format": "pandas",
                          # a dead actor is restarted and its batch retried, a bounded number
                          # of times (Ray Data's default is forever)
                          "max_restarts": section.max_restarts,
                          "max_task_retries": section.max_task_retries}
    if section.num_gpus:
        kw["num_gpus"] = section.num_gpus
    if section.resources:  # custom resources steer the pool to a node type (cluster/)
        kw["resources"] = dict(section.resources)
    return kw
