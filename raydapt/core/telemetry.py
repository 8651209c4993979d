"""Ray metrics of raydapt stages: one spec (:data:`METRICS`) and thin, never-failing emitters.

Every metric a stage emits is declared once in :data:`METRICS` (name, type, description, tag
keys). Stages emit through :class:`StageTelemetry`, which creates the ``ray.util.metrics``
objects lazily (once per process) and records with the tags ``stage``, ``method`` and ``run``.
The Grafana dashboard (:mod:`raydapt.ops.dashboards`) is generated from the same spec.

How Ray 2.60 exports them to Prometheus (measured on the metrics agent's ``/metrics``
endpoint): every custom metric gets the prefix ``ray_``; a counter also gets the suffix
``_total`` (``raydapt_rows_processed`` -> ``ray_raydapt_rows_processed_total``); a histogram
exports ``_bucket`` / ``_sum`` / ``_count``; a gauge keeps its name. Ray adds the labels
``WorkerId``, ``NodeAddress``, ``SessionName``, ``Component`` and ``Version``, so a gauge set
in several actors of a pool is several series (sum them by ``stage``).

Emitting is cheap (one C++ call per metric per batch; no I/O in the caller) and can never break
a stage: outside Ray (``ray.is_initialized()`` false) it is a no-op, and any exception from the
metrics layer is swallowed after one warning.

Use from a stage (a Ray Data actor class, a Ray Train loop, a recipe step)::

    from raydapt.core.telemetry import StageTelemetry, timed_stage

    tm = StageTelemetry("annotate", method="dallmi", run=cfg.run.name)   # once, in __init__
    tm.record_batch(rows=len(batch), rejected=n_bad, seconds=t, tokens=n_prompt_tokens)
    tm.record_batch(rows=len(batch), seconds=t, gradients=len(batch))   # NTK-Selector scoring

    with timed_stage("train", method="dallmi", run=cfg.run.name):       # in the driver
        ...                                   # sets raydapt_stage_seconds{stage="train"}

Which ``record_batch`` keyword feeds which metric is :attr:`MetricSpec.fed_by`; the tests read
stage code to check that every metric in the dashboard is fed somewhere.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger(__name__)

TAG_KEYS: tuple[str, ...] = ("stage", "method", "run")
"""Tags on every raydapt metric: the stage name, the method (simda, dallmi, ntk_select) and the
run name (= MLflow run name = Ray job submission id)."""

Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its Ray name, type, description and what feeds it.

    ``fed_by`` names the :meth:`StageTelemetry.record_batch` keywords (or ``timed_stage``) that
    must all be given for the metric to be recorded.
    """

    name: str
    kind: Kind
    description: str
    fed_by: tuple[str, ...]
    unit: str = "short"
    boundaries: tuple[float, ...] = ()
    tag_keys: tuple[str, ...] = TAG_KEYS

    @property
    def prometheus(self) -> str:
        """The series name Prometheus sees (``_bucket``/``_sum``/``_count`` add to histograms)."""
        return f"ray_{self.name}_total" if self.kind == "counter" else f"ray_{self.name}"


METRICS: dict[str, MetricSpec] = {m.name: m for m in (
    MetricSpec("raydapt_rows_processed", "counter",
               "Rows a stage processed (good and rejected).", ("rows",)),
    MetricSpec("raydapt_rows_rejected", "counter",
               "Rows a stage rejected (they go to rejects.parquet with a reason).", ("rejected",)),
    MetricSpec("raydapt_rows_per_second", "gauge",
               "Rows per second of the last batch, per actor / worker (sum by stage = pool "
               "throughput).", ("rows", "seconds"), unit="rps"),
    MetricSpec("raydapt_tokens", "counter",
               "Prompt tokens an LLM stage processed (annotation).", ("tokens",)),
    MetricSpec("raydapt_tokens_per_second", "gauge",
               "Prompt tokens per second of the last batch, per LLM actor.", ("tokens", "seconds"),
               unit="short"),
    MetricSpec("raydapt_gradients_scored", "counter",
               "Per-sample gradients computed, projected and scored (NTK-Selector).",
               ("gradients",)),
    MetricSpec("raydapt_batch_seconds", "histogram",
               "Seconds per batch inside a stage actor / worker (its _sum is busy time).",
               ("seconds",), unit="s",
               boundaries=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 180, 600)),
    MetricSpec("raydapt_stage_seconds", "gauge",
               "Wall seconds of a finished driver-level stage (read, teacher, knn, students...).",
               ("timed_stage",), unit="s"),
)}


def spec(name: str) -> MetricSpec:
    """The spec of a metric by its Ray name; a clear KeyError for an unknown one."""
    try:
        return METRICS[name]
    except KeyError:
        raise KeyError(f"unknown raydapt metric {name!r}; known: {sorted(METRICS)}") from None


# --------------------------------------------------------------------------------------------
# Emitting
# --------------------------------------------------------------------------------------------

_objects: dict[str, Any] = {}  # Ray metric objects of this process, by name
_warned = False


def _ray_up() -> bool:
    try:
        import ray

        return ray.is_initialized()
    except Exception:  # pragma: no cover - ray missing or broken
        return False


def _metric(name: str):
    """This process's Ray metric object for ``name`` (created once)."""
    obj = _objects.get(name)
    if obj is None:
        from ray.util import metrics as rm

        m = spec(name)
        if m.kind == "counter":
            obj = rm.Counter(m.name, m.description, m.tag_keys)
        elif m.kind == "gauge":
            obj = rm.Gauge(m.name, m.description, m.tag_keys)
        else:
            obj = rm.Histogram(m.name, m.description, list(m.boundaries), m.tag_keys)
        _objects[name] = obj
    return obj


def emit(name: str, value: float, tags: dict[str, str]) -> bool:
    """Record one value of a spec'd metric (inc / set / observe by its kind).

    Returns whether it was recorded; never raises (no Ray, a bad value, a metrics-layer error:
    False, with one warning per process for errors).
    """
    global _warned
    if not _ray_up():
        return False
    try:
        m = spec(name)
        obj = _metric(name)
        if m.kind == "counter":
            if value <= 0:
                return False
            obj.inc(float(value), tags)
        elif m.kind == "gauge":
            obj.set(float(value), tags)
        else:
            obj.observe(float(value), tags)
        return True
    except Exception as exc:  # metrics are best effort: a stage never fails because of them
        if not _warned:
            log.warning("raydapt telemetry: could not record %s (%s); continuing", name, exc)
            _warned = True
        return False


class StageTelemetry:
    """Emitter bound to one stage's tags (create once per actor / worker / stage).

    Args:
        stage: stage name, e.g. ``teacher``, ``knn``, ``student-kl_sim``, ``score``.
        method: ``simda`` | ``dallmi`` | ``ntk_select`` (free text, used as a tag).
        run: run name (``cfg.run.name``).
    """

    def __init__(self, stage: str, *, method: str = "", run: str = "") -> None:
        self.stage = stage
        self.tags = {"stage": str(stage), "method": str(method), "run": str(run)}

    def record_batch(self, *, rows: int, seconds: float, rejected: int = 0, tokens: int = 0,
                     gradients: int = 0) -> None:
        """Record one processed batch: ``rows`` in (good + rejected), ``seconds`` spent on it,
        ``tokens`` prompt tokens (LLM stages), ``gradients`` per-sample gradients scored."""
        t = self.tags
        emit("raydapt_rows_processed", rows, t)
        if rejected:
            emit("raydapt_rows_rejected", rejected, t)
        if seconds > 0:
            emit("raydapt_batch_seconds", seconds, t)
            emit("raydapt_rows_per_second", rows / seconds, t)
            if tokens:
                emit("raydapt_tokens_per_second", tokens / seconds, t)
        if tokens:
            emit("raydapt_tokens", tokens, t)
        if gradients:
            emit("raydapt_gradients_scored", gradients, t)

    def stage_seconds(self, seconds: float) -> None:
        """Set the wall seconds of this (driver-level) stage."""
        emit("raydapt_stage_seconds", seconds, self.tags)


@contextmanager
def timed_stage(stage: str, *, method: str, run: str) -> Iterator[StageTelemetry]:
    """Time a driver-level stage; on exit (also on error) sets ``raydapt_stage_seconds``."""
    tm = StageTelemetry(stage, method=method, run=run)
    t0 = time.perf_counter()
    try:
        yield tm
    finally:
        tm.stage_seconds(time.perf_counter() - t0)
