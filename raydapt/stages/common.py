"""Shared pieces of Ray Data stages: row-level failure isolation and telemetry."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pandas as pd

ERROR_COLUMN = "_error"


def run_isolating_failures(
    batch: pd.DataFrame, fn: Callable[[pd.DataFrame], pd.DataFrame], *, stage: str,
    error_types: tuple[type[BaseException], ...] = (Exception,),
) -> pd.DataFrame:
    """Apply ``fn`` to a batch; if it raises, retry row by row and mark failing rows.

    Returns ``fn``'s output with an ``_error`` column: "" for good rows, the reason for rows that
    failed (those keep their ``id`` and have nulls elsewhere). A row is never silently dropped.
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
        return pd.concat(parts, ignore_index=True)


class StageMetrics:
    """Ray metrics for a stage (rows processed/rejected, seconds); no-ops outside Ray."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        try:
            from ray.util.metrics import Counter

            tags = ("stage",)
            self._rows = Counter("raydapt_rows_processed", "Rows a stage processed.", tags)
            self._rej = Counter("raydapt_rows_rejected", "Rows a stage rejected.", tags)
            self._sec = Counter("raydapt_stage_seconds", "Seconds spent in stage batches.", tags)
            self._tok = Counter("raydapt_tokens", "Prompt tokens processed by LLM stages.", tags)
        except Exception:  # pragma: no cover - metrics are best effort
            self._rows = self._rej = self._sec = self._tok = None

    def record(self, *, rows: int, rejected: int, seconds: float, tokens: int = 0) -> None:
        if self._rows is None:
            return
        tags: dict[str, Any] = {"stage": self.stage}
        try:
            self._rows.inc(rows, tags)
            if rejected:
                self._rej.inc(rejected, tags)
            self._sec.inc(seconds, tags)
            if tokens:
                self._tok.inc(tokens, tags)
        except Exception:  # pragma: no cover
            pass


class Timer:
    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.t0
