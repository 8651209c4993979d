"""Telemetry: the metric spec, emitters that never break a stage, the generated Grafana
dashboard (fresh, and naming only metrics that stage code feeds), and one stage's metrics
reaching a real Ray metrics agent."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from raydapt.core import telemetry
from raydapt.core.telemetry import METRICS
from raydapt.ops import dashboards

REPO = Path(__file__).resolve().parents[2]
PKG = REPO / "raydapt"
PROM_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


def test_spec_is_well_formed():
    assert {m.kind for m in METRICS.values()} == {"counter", "gauge", "histogram"}
    for name, m in METRICS.items():
        assert name == m.name and name.startswith("raydapt_") and PROM_NAME.match(name)
        assert m.description and m.tag_keys == ("stage", "method", "run") and m.fed_by
        if m.kind == "histogram":
            assert list(m.boundaries) == sorted(set(m.boundaries)) and m.boundaries[0] > 0
    assert METRICS["raydapt_rows_processed"].prometheus == "ray_raydapt_rows_processed_total"
    assert METRICS["raydapt_rows_per_second"].prometheus == "ray_raydapt_rows_per_second"
    with pytest.raises(KeyError, match="unknown raydapt metric"):
        telemetry.spec("raydapt_nope")


# --------------------------------------------------------------------------------------------
# Dashboard
# --------------------------------------------------------------------------------------------


def test_checked_in_dashboard_is_up_to_date():
    path = REPO / "dashboards" / "grafana" / "raydapt.json"
    assert path.read_text() == dashboards.render(), (
        "dashboards/grafana/raydapt.json is stale: run `raydapt dashboards generate`")
    from raydapt.cli import main

    assert main(["dashboards", "generate", "--check"]) == 0


def fed_in_code(pkg: Path = PKG) -> set[str]:
    """What stage code feeds: the keywords of every ``record_batch`` call, the keys a stage's
    ``counts`` returns, and a
    ``timed_stage`` entry when it is called (read from the source with ``ast``; the telemetry
    module itself does not count)."""
    fed: set[str] = set()
    for f in pkg.rglob("*.py"):
        if f.name in ("telemetry.py", "dashboards.py"):
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(
                node.func, "id", "")
            if name == "record_batch":
                kws = {k.arg for k in node.keywords if k.arg}
                if "rows" in kws:  # a StageTelemetry call, not some other .record_batch()
                    fed |= kws
            elif name == "timed_stage":
                fed.add("timed_stage")
        # a Stage subclass's own counts (stages/common.Stage.counts): the keys it returns
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name == "counts":
                for ret in ast.walk(node):
                    if isinstance(ret, ast.Return) and isinstance(ret.value, ast.Dict):
                        fed |= {k.value for k in ret.value.keys
                                if isinstance(k, ast.Constant)}
    return fed


def emitted_metrics() -> set[str]:
    fed = fed_in_code()
    return {n for n, m in METRICS.items() if set(m.fed_by) <= fed}


def test_the_code_scan_sees_the_stages():
    fed = fed_in_code()
    # teacher.py: rows, rejected, seconds, tokens; tracking.py (every stage): timed_stage
    assert {"rows", "rejected", "seconds", "tokens", "timed_stage"} <= fed


def _series(expr: str) -> set[str]:
    return set(re.findall(r"\bray_raydapt_[a-z0-9_]+", expr))


def test_every_dashboard_metric_is_in_the_spec_and_emitted_by_a_stage():
    model = json.loads((REPO / "dashboards" / "grafana" / "raydapt.json").read_text())
    exprs = [t["expr"] for p in model["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in model["templating"]["list"] if v["type"] == "query"]
    exported = {}
    for n, m in METRICS.items():
        names = ([m.prometheus + s for s in ("_bucket", "_sum", "_count")]
                 if m.kind == "histogram" else [m.prometheus])
        exported.update(dict.fromkeys(names, n))
    used = {s for e in exprs for s in _series(e)}
    assert used, "no metric found in the dashboard"
    unknown = used - set(exported)
    assert not unknown, f"dashboard names metrics outside raydapt/core/telemetry.py: {unknown}"
    not_emitted = {exported[s] for s in used} - emitted_metrics()
    assert not not_emitted, f"dashboard uses metrics no stage emits: {not_emitted}"
    assert {exported[s] for s in used} >= {"raydapt_rows_processed", "raydapt_rows_rejected",
                                          "raydapt_tokens", "raydapt_stage_seconds",
                                          "raydapt_gradients_scored"}


def test_a_metric_no_stage_feeds_is_not_emitted(tmp_path):
    """The check above has teeth: in a package whose only stage feeds rows and seconds, the
    token and gradient metrics count as not emitted."""
    (tmp_path / "stage.py").write_text(
        "def f(tm, n, t):\n    tm.record_batch(rows=n, seconds=t)\n")
    fed = fed_in_code(tmp_path)
    assert fed == {"rows", "seconds"}
    emitted = {n for n, m in METRICS.items() if set(m.fed_by) <= fed}
    assert emitted == {"raydapt_rows_processed", "raydapt_rows_per_second",
                       "raydapt_batch_seconds"}


# --------------------------------------------------------------------------------------------
# A real stage's metrics reach Ray's metrics agent
# --------------------------------------------------------------------------------------------

_AGENT_SCRIPT = textwrap.dedent("""
    import json, logging, os, sys, time, urllib.request
    import numpy as np, pandas as pd, ray
    from raydapt.stages.teacher import KnnSearch, build_index, save_store
    from raydapt.core.telemetry import StageTelemetry, emit, timed_stage
    from raydapt.core.tracking import Tracker

    # 1. without Ray every emitter is a no-op (and starts no Ray)
    tags = {"stage": "t", "method": "m", "run": "r"}
    assert emit("raydapt_rows_processed", 3, tags) is False
    StageTelemetry("t").record_batch(rows=3, rejected=1, seconds=0.5, tokens=9, gradients=3)
    with timed_stage("t", method="m", run="r"):
        pass
    assert not ray.is_initialized()

    store = sys.argv[1]
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(20, 8)).astype(np.float32)
    save_store(__import__("pathlib").Path(store), build_index(keys), [f"s{i}" for i in range(20)],
               np.arange(20) % 2)
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level=logging.ERROR)

    # 2. with Ray, a failure of the metrics layer returns False and never raises
    assert emit("raydapt_rows_processed", 2, tags) is True          # a real Ray counter
    assert emit("raydapt_no_such_metric", 1, tags) is False         # unknown name
    assert emit("raydapt_rows_processed", 1, {"stage": "t"}) is False  # Ray: missing tag keys
    assert emit("raydapt_rows_processed", 0, tags) is False         # counters only go up
    StageTelemetry("t", method="m", run="r").record_batch(rows=0, seconds=0.0)

    # 3. the real kNN stage class as a Ray actor, plus a tracked driver stage
    knn = ray.remote(KnnSearch).options(num_cpus=0.5).remote(
        store=store, k=3, num_classes=2, tau=1.0, distance_norm="median",
        telemetry={"method": "simda", "run": "metrics-test"})
    q = pd.DataFrame({"id": [f"t{i}" for i in range(6)],
                      "hidden": list(rng.normal(size=(6, 8)).astype(np.float32))})
    bad = pd.DataFrame({"id": ["x0", "x1"], "hidden": [np.zeros(3, np.float32)] * 2})
    out = ray.get(knn.__call__.remote(q))
    out_bad = ray.get(knn.__call__.remote(bad))        # wrong width: rows become rejects
    tracker = Tracker(enabled=False, uri="sqlite:///unused.db", experiment="e",
                      artifact_location="a")
    with tracker.job("metrics-test", tags={"raydapt.method": "simda"}):
        with tracker.child("read"):
            time.sleep(0.05)
    node = ray.nodes()[0]
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    want = ["ray_raydapt_rows_processed_total", "ray_raydapt_rows_rejected_total",
            "ray_raydapt_batch_seconds_count", "ray_raydapt_rows_per_second",
            "ray_raydapt_stage_seconds"]
    lines, t0 = [], time.time()
    while time.time() - t0 < 90:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        lines = [ln for ln in text.splitlines() if ln.startswith("ray_raydapt_")]
        if all(any(ln.startswith(w + "{") for ln in lines) for w in want):
            break
        time.sleep(0.5)
    print(json.dumps({"lines": lines, "good": int((out["_error"] == "").sum()),
                      "rejected": int((out_bad["_error"] != "").sum()),
                      "seconds": time.time() - t0}))
    ray.shutdown()
""")


def _value(lines: list[str], series: str, **labels: str) -> float | None:
    for ln in lines:
        if ln.startswith(series + "{") and all(f'{k}="{v}"' in ln for k, v in labels.items()):
            return float(ln.rsplit(" ", 1)[1])
    return None


@pytest.mark.ray
def test_knn_stage_metrics_reach_the_ray_metrics_agent(tmp_path):
    """In a fresh process (so Ray's metrics report interval can be short): emitting without Ray
    is a no-op; with Ray a metrics-layer error never raises; the real KnnSearch stage class runs
    as a Ray actor and its counters, gauge and histogram, and a tracked stage's wall time, are
    read back from the node's Prometheus endpoint with the names the dashboard queries."""
    env = {**os.environ, "RAY_metrics_report_interval_ms": "500", "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    out = subprocess.run([sys.executable, "-c", _AGENT_SCRIPT, str(tmp_path / "store")],
                         capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    lines = res["lines"]
    assert res["good"] == 6 and res["rejected"] == 2
    tags = {"stage": "knn", "method": "simda", "run": "metrics-test"}
    assert _value(lines, "ray_raydapt_rows_processed_total", **tags) == 8.0, lines
    assert _value(lines, "ray_raydapt_rows_rejected_total", **tags) == 2.0, lines
    assert _value(lines, "ray_raydapt_batch_seconds_count", **tags) == 2.0, lines
    assert (_value(lines, "ray_raydapt_rows_per_second", **tags) or 0) > 0, lines
    stage_s = _value(lines, "ray_raydapt_stage_seconds", stage="read", method="simda",
                     run="metrics-test")
    assert stage_s is not None and stage_s >= 0.05, lines


def test_every_stage_in_a_recipe_is_tagged_with_method_and_run():
    """The dashboards filter every panel by method / run / stage: each Ray Data stage a recipe
    builds passes ``telemetry`` (method and run tags), and those are the dashboard's filter
    variables."""
    from raydapt.core.telemetry import StageTelemetry

    stages = {"TeacherScore", "KnnSearch", "EmbedLM", "GradProject", "MCScore", "ResponseNLL"}
    seen = 0
    def tagged(fn: ast.FunctionDef) -> bool:  # a kwargs helper: dict(..., telemetry=...)
        return any(isinstance(n, ast.Call) and any(k.arg == "telemetry" for k in n.keywords)
                   or isinstance(n, ast.Dict) and any(isinstance(k, ast.Constant)
                                                     and k.value == "telemetry" for k in n.keys)
                   for n in ast.walk(fn))

    for f in (PKG / "recipes").glob("*.py"):
        tree = ast.parse(f.read_text())
        helpers = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
        for node in ast.walk(tree):
            # ds.map_batches(Stage, fn_constructor_kwargs=...) or a streamed pass's
            # Step(Stage, kwargs, ...) (raydapt.stages.sharded.Step)
            step = (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "Step" and len(node.args) > 1
                    and isinstance(node.args[0], ast.Name) and node.args[0].id in stages)
            if not step and not (
                    isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "map_batches" and node.args
                    and isinstance(node.args[0], ast.Name) and node.args[0].id in stages):
                continue
            seen += 1
            kw = node.args[1] if step else {k.arg: k.value for k in node.keywords}[
                "fn_constructor_kwargs"]
            keys = ({k.arg for k in kw.keywords} if isinstance(kw, ast.Call)
                    else {k.value for k in kw.keys if isinstance(k, ast.Constant)})
            if (isinstance(kw, ast.Call) and isinstance(kw.func, ast.Name)
                    and kw.func.id in helpers and tagged(helpers[kw.func.id])):
                keys.add("telemetry")  # e.g. teacher_kwargs(cfg, ...) in the SimDA recipe
            assert "telemetry" in keys, f"{f.name}:{node.lineno} {node.args[0].id} untagged"
    assert seen >= 7
    model = json.loads((REPO / "dashboards" / "grafana" / "raydapt.json").read_text())
    filters = {v["name"] for v in model["templating"]["list"] if v["type"] == "query"}
    assert filters == set(StageTelemetry("x", method="m", run="r").tags) == {
        "method", "run", "stage"}
