"""What a user sees in MLflow: experiment kind and description, results table and chart on the
parent run, child-run tags, standard run metadata and datasets. Real sqlite stores, tiny runs."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from raydapt.config import load_job
from raydapt.core.tracking import Tracker
from raydapt.job import job_context


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite store for the module (a new store costs its schema migrations)."""
    return f"sqlite:///{tmp_path_factory.mktemp('ui-store')}/m.db"


def _tracker(tmp_path, store: str, experiment: str = "ui") -> Tracker:
    return Tracker(enabled=True, uri=store, experiment=experiment,
                   artifact_location=str(tmp_path / "art"))


def test_experiment_is_model_development_with_a_description(tmp_path, store):
    tr = _tracker(tmp_path, store, "ui-kind")
    with tr.job("j1"):
        pass
    exp = MlflowClient(tracking_uri=tr.uri).get_experiment_by_name("ui-kind")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "raydapt" in exp.tags["mlflow.note.content"]

    # an experiment made before (no kind) gets the kind on the next job
    cl = MlflowClient(tracking_uri=tr.uri)
    cl.create_experiment("old", artifact_location=(tmp_path / "old").as_uri())
    tr2 = _tracker(tmp_path, store, "old")
    with tr2.job("j2"):
        pass
    assert cl.get_experiment_by_name("old").tags["mlflow.experimentKind"] == \
        "custom_model_development"


def test_results_table_chart_and_child_tags(tmp_path, store):
    tr = _tracker(tmp_path, store)
    results = {"teacher:knn": 0.72, "student:kl_sim": 0.74, "student:oracle": 0.8}
    with tr.job("j", tags={"raydapt.method": "simda"}) as parent:
        with tr.child("read"):
            pass
        with tr.child("student-kl_sim", tags={"raydapt.variant": "kl_sim"}):
            pass
        parent.results_table(results, metric="accuracy", seeds=[0],
                             details={"teacher:knn": {"rows": 120},
                                      "student:kl_sim": {"rows": 400, "epochs": 2}})
    cl = MlflowClient(tracking_uri=tr.uri)
    run_id = parent.run_id
    arts = {a.path for a in cl.list_artifacts(run_id)}
    assert {"results.csv", "results.png", "results_table.json"} <= arts
    df = pd.read_csv(cl.download_artifacts(run_id, "results.csv", str(tmp_path)))
    assert list(df["method"]) == ["student:oracle", "student:kl_sim", "teacher:knn"]  # best first
    assert list(df["family"]) == ["student", "student", "teacher"]
    assert df.set_index("method").loc["teacher:knn", "rows"] == 120
    assert df.set_index("method").loc["student:kl_sim", "epochs"] == 2
    assert set(df["seeds"].astype(str)) == {"0"} and set(df["metric"]) == {"accuracy"}
    table = json.loads(open(cl.download_artifacts(run_id, "results_table.json",
                                                  str(tmp_path / "t"))).read())
    assert table["columns"][:4] == ["method", "family", "metric", "value"]
    assert [r[3] for r in table["data"]] == pytest.approx([0.8, 0.74, 0.72])
    png = cl.download_artifacts(run_id, "results.png", str(tmp_path / "p"))
    assert open(png, "rb").read(4) == b"\x89PNG"

    children = {r.data.tags["mlflow.runName"]: r.data.tags for r in cl.search_runs(
        [cl.get_experiment_by_name("ui").experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{run_id}'")}
    assert {k: children["read"][k] for k in ("raydapt.method", "raydapt.stage",
                                             "raydapt.variant")} == {
        "raydapt.method": "simda", "raydapt.stage": "read", "raydapt.variant": "-"}
    assert children["student-kl_sim"]["raydapt.stage"] == "student"
    assert children["student-kl_sim"]["raydapt.variant"] == "kl_sim"


def test_run_description_is_the_job_yaml_header(tmp_path, store, tiny_simda_job):
    path = tiny_simda_job(tmp_path, tracking={"uri": store, "experiment": "ui-note"})
    path.write_text("# raydapt run job.yaml\n#\n# Tiny SimDA. Expect: nothing.\n"
                    + path.read_text())
    cfg = load_job(path)
    assert cfg._header == "raydapt run job.yaml\n\nTiny SimDA. Expect: nothing."
    assert "_header" not in cfg.model_dump()
    with job_context(cfg, ray=False) as ctx:
        run_id = ctx.parent.run_id
    note = MlflowClient(tracking_uri=ctx.tracker.uri).get_run(run_id).data.tags[
        "mlflow.note.content"]
    assert note.startswith("raydapt run job.yaml  \n") and "Tiny SimDA" in note


def test_standard_run_metadata_and_datasets(tmp_path, store):
    import getpass

    tr = _tracker(tmp_path, store, "ui-meta")
    with tr.job("j") as parent:
        parent.datasets({"source": "0123456789abcdef", "target": "fedcba9876543210"},
                        sources={"source": "/data/books.jsonl"})
        with tr.child("read") as child:
            pass
    cl = MlflowClient(tracking_uri=tr.uri)
    for run_id in (parent.run_id, child.run_id):
        tags = cl.get_run(run_id).data.tags
        assert tags["mlflow.user"] == getpass.getuser()
        assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"]
        assert len(tags["mlflow.source.git.commit"]) == 40  # the tests run in a git checkout
    inputs = cl.get_run(parent.run_id).inputs.dataset_inputs
    got = {i.dataset.name: (i.dataset.digest, json.loads(i.dataset.source)["uri"])
           for i in inputs}
    assert got == {"source": ("0123456789abcdef", "/data/books.jsonl"),
                   "target": ("fedcba9876543210", "target")}


def test_params_and_config_yaml_are_the_config_that_ran(tmp_path, store, tiny_simda_job):
    """Keys chosen at run time (SimDA's k / tau / lam on source labels, the template): the
    params hold the chosen value once chosen and the job file's as ``<key>.requested``; the
    config.yaml artifact and file are rewritten with the chosen values (issue 27)."""
    path = tiny_simda_job(tmp_path, tracking={"uri": store, "experiment": "ui-ran"},
                          annotate={"k": 32, "lam": 0.5, "select_on_source": True},
                          teacher={"templates": ["A: {text}", "B: {text}"]})
    cfg = load_job(path)
    assert cfg.chosen_at_run_time() == ["teacher.template", "annotate.k", "annotate.tau",
                                        "annotate.lam"]
    with job_context(cfg, ray=False) as ctx:
        run_id = ctx.parent.run_id
        before = MlflowClient(tracking_uri=ctx.tracker.uri).get_run(run_id).data.params
        ran = cfg.model_copy(update={
            "annotate": cfg.annotate.model_copy(update={"k": 16, "tau": 0.3, "lam": 0.4}),
            "teacher": cfg.teacher.model_copy(update={"template": "B: {text}"})})
        ctx.record_config(ran)
    assert "annotate.k" not in before and before["annotate.k.requested"] == "32"
    params = MlflowClient(tracking_uri=ctx.tracker.uri).get_run(run_id).data.params
    assert (params["annotate.k"], params["annotate.tau"], params["annotate.lam"]) == (
        "16", "0.3", "0.4")
    assert params["annotate.k.requested"] == "32" and params["annotate.lam.requested"] == "0.5"
    assert params["teacher.template"] == "B: {text}"
    assert params["annotate.k_grid"] == json.dumps(cfg.annotate.k_grid)  # the rest as before
    text = (ctx.out / "config.yaml").read_text()
    assert yaml.safe_load(text)["annotate"]["k"] == 16
    assert "#   annotate.k: 16  (requested 32)" in text
    art = MlflowClient(tracking_uri=ctx.tracker.uri).download_artifacts(
        run_id, "config.yaml", str(tmp_path / "dl"))
    assert open(art).read() == text
