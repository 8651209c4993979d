"""What the MLflow UI shows, read back through the REST API of a real ``mlflow server`` on
localhost (sqlite store): experiment kind, results table artifacts, child-run tags, datasets,
standard run metadata. Teardown stops only the server this test started (its process group)."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request

import pytest
from serve_mlflow import mlflow_server_at  # tests/tracking/serve_mlflow.py

from raydapt.core.tracking import Tracker


@pytest.fixture
def mlflow_server(tmp_path):
    with mlflow_server_at(f"sqlite:///{tmp_path}/m.db", tmp_path / "art", tmp_path / "server.log",
                          start_timeout=300) as url:
        yield url


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


def test_raydapt_ui_serves_the_store_and_prints_the_runs_link(tmp_path, capsys):
    """`raydapt ui --no-wait` starts `mlflow ui` on a local store, prints the direct runs link
    (which the server answers), and stops the server it started."""
    import psutil

    from raydapt.cli import main

    uri = f"sqlite:///{tmp_path}/m.db"
    tr = Tracker(enabled=True, uri=uri, experiment="simda", artifact_location=str(tmp_path))
    with tr.job("books", tags={"raydapt.method": "simda"}), \
            tr.child("student-kl", tags={"raydapt.variant": "kl"}):
        pass
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    assert main(["ui", "--tracking-uri", uri, "--experiment", "simda", "--port", "0",
                 "--no-wait"]) == 0
    out = capsys.readouterr().out
    (runs,) = [ln.split(": ", 1)[1] for ln in out.splitlines() if ln.strip().startswith("runs:")]
    assert runs.endswith("/runs?workflowType=machine_learning") and "/#/experiments/" in runs
    assert "methods side by side: http://" in out
    # the server is gone (its process group was stopped)
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before
