"""What the MLflow UI shows, read back through the REST API of a real ``mlflow server`` on
localhost (sqlite store): experiment kind, results table artifacts, child-run tags, datasets,
standard run metadata. Teardown stops only the server this test started (its process group)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from raydapt.core.tracking import Tracker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{tmp_path}/m.db",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--artifacts-destination", str(tmp_path / "art")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_ENABLE_TELEMETRY": "false"})
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except Exception:
                if proc.poll() is not None or time.time() - t0 > 300:
                    raise RuntimeError("mlflow server did not start:\n"
                                       + (tmp_path / "server.log").read_text()[-3000:]) from None
                time.sleep(0.5)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _get(url: str, path: str, **params) -> dict:
    q = urllib.parse.urlencode(params)
    return json.loads(urllib.request.urlopen(f"{url}{path}?{q}", timeout=30).read())


def _post(url: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=30).read())


def test_the_ui_view_through_the_rest_api(mlflow_server):
    url = mlflow_server
    tr = Tracker(enabled=True, uri=url, experiment="simda", artifact_location="")
    with tr.job("books-to-kitchen", tags={"raydapt.method": "simda"}) as parent:
        parent.datasets({"source": "0123456789abcdef", "target": "fedcba9876543210"})
        with tr.child("student-kl_sim", tags={"raydapt.variant": "kl_sim"}) as child:
            child.metrics({"accuracy": 0.74})
        parent.results_table({"teacher:knn": 0.72, "student:kl_sim": 0.74})

    exp = _get(url, "/api/2.0/mlflow/experiments/get-by-name", experiment_name="simda")
    tags = {t["key"]: t["value"] for t in exp["experiment"]["tags"]}
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert tags["mlflow.note.content"].startswith("raydapt experiment")

    runs = _post(url, "/api/2.0/mlflow/runs/search",
                 {"experiment_ids": [exp["experiment"]["experiment_id"]]})["runs"]
    by_id = {r["info"]["run_id"]: r for r in runs}
    ptags = {t["key"]: t["value"] for t in by_id[parent.run_id]["data"]["tags"]}
    ctags = {t["key"]: t["value"] for t in by_id[child.run_id]["data"]["tags"]}
    assert ptags["mlflow.user"] and ptags["mlflow.source.type"] == "LOCAL"
    assert (ctags["raydapt.method"], ctags["raydapt.stage"], ctags["raydapt.variant"]) == (
        "simda", "student", "kl_sim")
    inputs = by_id[parent.run_id]["inputs"]["dataset_inputs"]
    assert {(i["dataset"]["name"], i["dataset"]["digest"]) for i in inputs} == {
        ("source", "0123456789abcdef"), ("target", "fedcba9876543210")}
    files = {f["path"] for f in _get(url, "/api/2.0/mlflow/artifacts/list",
                                     run_id=parent.run_id).get("files", [])}
    assert {"results.csv", "results.png", "results_table.json"} <= files
