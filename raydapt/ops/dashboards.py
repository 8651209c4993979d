"""The Grafana dashboard of raydapt, generated from one Python panel spec (:data:`PANELS`).

    raydapt dashboards generate            # writes dashboards/grafana/raydapt.json
    raydapt dashboards generate --check    # exit 1 if the checked-in JSON is stale
    python -m raydapt.ops.dashboards [--check] # the same without the CLI

Every query names its metric by the spec name of :mod:`raydapt.core.telemetry` and gets the series
name from there (``ray_`` prefix, ``_total`` for counters, ``_bucket``/``_sum`` for
histograms), so a panel cannot name a metric that is not in the spec; the tests also check that
stage code feeds every metric a panel uses. Import the JSON in Grafana (Dashboards -> Import)
with a Prometheus data source that scrapes Ray (``ray metrics launch-prometheus`` on the head, or
the Prometheus of the Kubernetes cluster); the variables ``method``, ``run`` and ``stage`` filter
every panel.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from raydapt.core.telemetry import spec

DEFAULT_OUT = Path(__file__).resolve().parents[2] / "dashboards" / "grafana" / "raydapt.json"
SEL = 'method=~"$method", run=~"$run", stage=~"$stage"'
"""Label selector every query carries (the dashboard variables)."""


@dataclass(frozen=True)
class Target:
    """One Prometheus query. ``promql`` is a template: ``{s}`` = the metric's exported series
    name (plus ``suffix``), ``{sel}`` = :data:`SEL`."""

    metric: str
    promql: str
    legend: str
    suffix: str = ""
    ray_node: bool = False  # one of Ray's own node metrics (RAY_NODE_METRICS), not raydapt's

    def expr(self) -> str:
        if self.ray_node:
            if self.metric not in RAY_NODE_METRICS:
                raise KeyError(f"{self.metric!r} is not a Ray node metric we know")
            return self.promql.format(s="ray_" + self.metric + self.suffix, sel=SEL)
        return self.promql.format(s=spec(self.metric).prometheus + self.suffix, sel=SEL)


# GPU metrics every Ray node's metrics agent exports (Ray 2.60,
# ray/dashboard/modules/reporter/reporter_agent.py; labels ip, SessionName, GpuIndex,
# GpuDeviceName, GpuUuid): utilisation in percent, GPU memory in bytes
RAY_NODE_METRICS = ("node_gpus_utilization", "node_gram_used", "node_gram_available")


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    targets: tuple[Target, ...]
    unit: str = "short"
    kind: Literal["timeseries", "stat", "bargauge"] = "timeseries"
    width: int = 12
    height: int = 8


def _rate(metric: str, legend: str = "{{stage}}", suffix: str = "") -> Target:
    return Target(metric, "sum by (stage) (rate({s}{{{sel}}}[$__rate_interval]))", legend, suffix)


def _quantile(q: float) -> Target:
    return Target("raydapt_batch_seconds",
                  f"histogram_quantile({q}, sum by (le, stage) "
                  "(rate({s}{{{sel}}}[$__rate_interval])))",
                  f"p{int(q * 100)} {{{{stage}}}}", "_bucket")


PANELS: tuple[Panel, ...] = (
    Panel("Rows processed / s", "Rows every stage processes per second (good and rejected), "
          "from the counter raydapt_rows_processed.",
          (_rate("raydapt_rows_processed"),), unit="rps"),
    Panel("Actor throughput (rows / s, last batch)", "Sum over a stage's actors / workers of "
          "the rows/s of their last batch (gauge raydapt_rows_per_second).",
          (Target("raydapt_rows_per_second", "sum by (stage) ({s}{{{sel}}})", "{{stage}}"),),
          unit="rps"),
    Panel("Annotation tokens / s", "Prompt tokens per second of the LLM stages: the rate of the "
          "counter raydapt_tokens and the sum of the actors' last-batch gauges.",
          (_rate("raydapt_tokens", "{{stage}} (rate)"),
           Target("raydapt_tokens_per_second", "sum by (stage) ({s}{{{sel}}})",
                  "{{stage}} (actors, last batch)"))),
    Panel("Gradients scored / s", "Per-sample gradients the NTK-Selector scoring stage "
          "computes, projects and scores per second (counter raydapt_gradients_scored).",
          (_rate("raydapt_gradients_scored"),)),
    Panel("Rejected rows / s", "Rows a stage rejected per second (they go to rejects.parquet "
          "with a reason).", (_rate("raydapt_rows_rejected"),), unit="rps"),
    Panel("Rows processed in range", "Rows each stage processed in the dashboard's time range.",
          (Target("raydapt_rows_processed",
                  "sum by (stage) (increase({s}{{{sel}}}[$__range]))", "{{stage}}"),),
          kind="stat", width=8),
    Panel("Reject ratio in range", "Rejected / processed rows per stage in the time range.",
          (Target("raydapt_rows_rejected",
                  "sum by (stage) (increase({s}{{{sel}}}[$__range])) / on (stage) "
                  "sum by (stage) (increase(" + spec("raydapt_rows_processed").prometheus
                  + "{{{sel}}}[$__range]))", "{{stage}}"),),
          unit="percentunit", kind="stat", width=8),
    Panel("Stage wall time", "Wall seconds of each finished driver-level stage (read, teacher, "
          "knn, students, ...), from raydapt_stage_seconds.",
          (Target("raydapt_stage_seconds", "max by (stage) (max_over_time({s}{{{sel}}}[$__range]))",
                  "{{stage}}"),), unit="s", kind="bargauge", width=8),
    Panel("Batch latency p50 / p95", "Seconds per batch inside stage actors / workers "
          "(histogram raydapt_batch_seconds).", (_quantile(0.5), _quantile(0.95)), unit="s"),
    Panel("Busy actors", "Batch seconds per second per stage: about the number of actors / "
          "workers busy at once (the rest wait for input or a node).",
          (_rate("raydapt_batch_seconds", suffix="_sum"),)),
    Panel("GPU utilisation", "Utilisation of every GPU of the cluster, from Ray's node metric "
          "ray_node_gpus_utilization (all jobs on the cluster; the method / run / stage "
          "variables do not filter it).",
          (Target("node_gpus_utilization", "avg by (ip, GpuIndex) ({s})",
                  "{{ip}} GPU {{GpuIndex}}", ray_node=True),), unit="percent"),
    Panel("GPU memory used", "GPU memory in use on every GPU of the cluster (Ray's node "
          "metric ray_node_gram_used; ray_node_gram_available is the rest).",
          (Target("node_gram_used", "max by (ip, GpuIndex) ({s})",
                  "{{ip}} GPU {{GpuIndex}}", ray_node=True),), unit="bytes"),
)


def metrics_used(panels: tuple[Panel, ...] = PANELS) -> set[str]:
    """Spec names of every raydapt metric the panels query (Ray's node metrics left out)."""
    return {t.metric for p in panels for t in p.targets if not t.ray_node}


def _variable(name: str, query: str) -> dict[str, Any]:
    return {"name": name, "label": name, "type": "query", "datasource": _DS,
            "query": {"query": query, "refId": f"{name}-var"}, "definition": query,
            "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
            "current": {"text": "All", "value": "$__all"}, "sort": 1}


_DS = {"type": "prometheus", "uid": "${datasource}"}


def _fill_row(out: list[dict[str, Any]], y: int) -> None:
    """No holes at the right edge: a row's panels share its 24 columns (in proportion)."""
    row = [p["gridPos"] for p in out if p["gridPos"]["y"] == y]
    used = sum(g["w"] for g in row)
    if not row or used >= 24:
        return
    x = 0
    for k, g in enumerate(row):
        g["w"] = 24 - x if k == len(row) - 1 else g["w"] * 24 // used
        g["x"] = x
        x += g["w"]


def build(panels: tuple[Panel, ...] = PANELS) -> dict[str, Any]:
    """The Grafana dashboard model (schema 39) for ``panels``; deterministic."""
    out, x, y, row_h = [], 0, 0, 0
    for i, p in enumerate(panels, start=1):
        if x + p.width > 24:
            _fill_row(out, y)
            x, y, row_h = 0, y + row_h, 0
        field: dict[str, Any] = {"unit": p.unit}
        if p.kind == "timeseries":
            field["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10}
        out.append({
            "id": i, "type": p.kind, "title": p.title, "description": p.description,
            "datasource": _DS, "gridPos": {"x": x, "y": y, "w": p.width, "h": p.height},
            "fieldConfig": {"defaults": field, "overrides": []},
            "options": ({"legend": {"displayMode": "list", "placement": "bottom"},
                         "tooltip": {"mode": "multi"}} if p.kind == "timeseries"
                        else {"reduceOptions": {"calcs": ["lastNotNull"]}}),
            "targets": [{"refId": chr(ord("A") + j), "datasource": _DS, "expr": t.expr(),
                         "legendFormat": t.legend} for j, t in enumerate(p.targets)],
        })
        x += p.width
        row_h = max(row_h, p.height)
    _fill_row(out, y)
    series = spec("raydapt_rows_processed").prometheus
    return {
        "uid": "raydapt", "title": "raydapt stages", "tags": ["raydapt", "ray"],
        "description": "Generated by `raydapt dashboards generate` from raydapt/ops/dashboards.py; "
                       "do not edit by hand.",
        "schemaVersion": 39, "version": 1, "editable": True, "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"}, "timezone": "browser",
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource",
             "query": "prometheus", "current": {}, "hide": 0},
            _variable("method", f"label_values({series}, method)"),
            _variable("run", f'label_values({series}{{method=~"$method"}}, run)'),
            _variable("stage", f'label_values({series}{{method=~"$method", run=~"$run"}}, stage)'),
        ]},
        "panels": out,
    }


def render(panels: tuple[Panel, ...] = PANELS) -> str:
    return json.dumps(build(panels), indent=2) + "\n"


def generate(out: Path = DEFAULT_OUT, *, check: bool = False) -> bool:
    """Write the dashboard JSON (or, with ``check``, only compare). Returns True if up to date
    (check) / written."""
    text = render()
    if check:
        return out.is_file() and out.read_text() == text
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return True


def _main(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else DEFAULT_OUT
    if args.check:
        if generate(out, check=True):
            print(f"{out} is up to date")
            return 0
        print(f"{out} is stale: run `raydapt dashboards generate`", file=sys.stderr)
        return 1
    generate(out)
    print(f"wrote {out} ({len(PANELS)} panels, metrics: {', '.join(sorted(metrics_used()))})")
    return 0


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--check", action="store_true",
                   help="do not write; exit 1 if the checked-in JSON differs from the spec")
    p.add_argument("--out", default=None, help=f"default: {DEFAULT_OUT}")


def add_command(sub) -> None:
    """Register ``raydapt dashboards generate [--check] [--out PATH]`` on the CLI."""
    d = sub.add_parser("dashboards", help="generate the Grafana dashboard from its Python spec")
    d.add_argument("action", choices=["generate"], help="write (or with --check compare) the JSON")
    _add_args(d)
    d.set_defaults(fn=_main)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m raydapt.ops.dashboards", description=__doc__)
    _add_args(ap)
    sys.exit(_main(ap.parse_args()))
