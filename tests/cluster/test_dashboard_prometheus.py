"""End to end, with a real Prometheus: stage metrics -> Ray's metrics agent -> Prometheus ->
every query of dashboards/grafana/raydapt.json returns data.

Marked ``slow`` (and skipped without the ``prometheus`` binary: ``apt-get install prometheus``,
the Debian package). One fresh process starts Ray with a short metrics report interval, runs the
real kNN stage as a Ray actor, records one batch through the stage helper with tokens and
gradients (the LLM / NTK stages' keywords) and a tracked driver stage, starts Prometheus
scraping the node's metrics agent every second, then runs each dashboard query (Grafana's
variables substituted) through Prometheus' HTTP API. A query that does not parse, names a
series Ray does not export, or filters on a label the stages do not set comes back empty.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow, pytest.mark.ray,
    pytest.mark.skipif(shutil.which("prometheus") is None,
                       reason="needs the prometheus binary (apt-get install prometheus)"),
]

_SCRIPT = textwrap.dedent("""
    import json, logging, socket, subprocess, sys, time, urllib.parse, urllib.request
    from pathlib import Path
    import numpy as np, pandas as pd, ray
    from raydapt.stages.teacher import KnnSearch, build_index, save_store
    from raydapt.core.telemetry import StageTelemetry
    from raydapt.core.tracking import Tracker

    work, dashboard = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    rng = np.random.default_rng(0)
    save_store(work / "store", build_index(rng.normal(size=(20, 8)).astype(np.float32)),
               [f"s{i}" for i in range(20)], np.arange(20) % 2)
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level=logging.ERROR)
    run = "dash-test"
    knn = ray.remote(KnnSearch).options(num_cpus=0.5).remote(
        store=str(work / "store"), k=3, num_classes=2, tau=1.0, distance_norm="median",
        telemetry={"method": "simda", "run": run})
    q = pd.DataFrame({"id": [f"t{i}" for i in range(6)],
                      "hidden": list(rng.normal(size=(6, 8)).astype(np.float32))})
    bad = pd.DataFrame({"id": ["x0"], "hidden": [np.zeros(3, np.float32)]})
    tm = StageTelemetry("score", method="ntk_select", run=run)
    tracker = Tracker(enabled=False, uri="sqlite:///unused.db", experiment="e",
                      artifact_location="a")
    node = ray.nodes()[0]
    target = f"{node['NodeManagerAddress']}:{node['MetricsExportPort']}"
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    (work / "prom.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\\n"
        f"scrape_configs: [{{job_name: ray, static_configs: [{{targets: ['{target}']}}]}}]\\n")
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={work / 'prom.yml'}", f"--storage.tsdb.path={work / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=open(work / "prom.log", "w"))
    try:
        with tracker.job(run, tags={"raydapt.method": "simda"}):
            # several rounds, so rate() / increase() have two samples per series
            for i in range(6):
                with tracker.child("read"):
                    ray.get(knn.__call__.remote(q))
                    ray.get(knn.__call__.remote(bad))
                    tm.record_batch(rows=4, seconds=0.2, tokens=500, gradients=4)
                time.sleep(2)
        subs = {"$__rate_interval": "1m", "$__range": "5m", "$method": ".*",
                "$run": run, "$stage": ".*"}
        results = {}
        for panel in dashboard["panels"]:
            for t in panel["targets"]:
                expr = t["expr"]
                for k, v in subs.items():
                    expr = expr.replace(k, v)
                url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode(
                    {"query": expr})
                # Ray's GPU node metrics exist only on GPU nodes: one query is enough here
                deadline, res = time.time() + (1 if "ray_node_g" in expr else 30), None
                while time.time() < deadline:
                    try:
                        res = json.loads(urllib.request.urlopen(url, timeout=5).read())
                    except Exception as exc:  # not up yet / a query error (HTTP 400)
                        res = {"status": "error", "error": str(exc)}
                    if res.get("status") == "success" and res["data"]["result"]:
                        break
                    time.sleep(1)
                results[f"{panel['title']} / {t['refId']}"] = {
                    "expr": expr, "status": res.get("status"), "error": res.get("error"),
                    "series": [{"labels": r["metric"], "value": r["value"][1]}
                               for r in (res.get("data") or {}).get("result", [])]}
        print(json.dumps(results))
    finally:
        prom.terminate()
        prom.wait(timeout=30)
        ray.shutdown()
""")


def test_every_dashboard_query_returns_data_from_a_real_prometheus(tmp_path):
    env = {**os.environ, "RAY_metrics_report_interval_ms": "500"}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path),
         str(REPO / "dashboards" / "grafana" / "raydapt.json")],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    # Ray's GPU panels (ray_node_gpus_utilization, ray_node_gram_used) may be empty on a machine
    # without GPUs; their queries must still be valid PromQL
    empty = {k: v for k, v in results.items() if v["status"] != "success"
             or not (v["series"] or "ray_node_g" in v["expr"])}
    assert not empty, json.dumps(empty, indent=1)
    by_stage = {k: {s["labels"].get("stage") for s in v["series"]} for k, v in results.items()}
    assert "knn" in by_stage["Rows processed / s / A"]
    assert "score" in by_stage["Gradients scored / s / A"]
    assert "read" in by_stage["Stage wall time / A"]
    reject = {s["labels"]["stage"]: float(s["value"])
              for s in results["Reject ratio in range / A"]["series"]}
    assert reject["knn"] == pytest.approx(1 / 7, rel=0.05)   # 1 of 7 rows per round rejected
