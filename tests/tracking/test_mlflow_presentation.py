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


def test_lambda_curves_are_a_table_and_a_plot_with_lambda_on_x(tmp_path, store):
    """Issue 28: select-on-source logged each lam curve as a metric with step = lam x 100 (shown
    as "Step"), and the runs table showed each curve's last point (lam = 1.0) beside the best.
    Now: a table artifact, one row per point, and a PNG with lam on the x-axis; no metric
    curves."""
    tr = _tracker(tmp_path, store, "ui-curves")
    curve = [{"k": k, "tau": 1.0, "lam": lam, "accuracy": acc}
             for k, accs in ((4, (0.70, 0.90, 0.83)), (8, (0.70, 0.85, 0.80)))
             for lam, acc in zip((0.0, 0.5, 1.0), accs)]
    best = max(curve, key=lambda r: r["accuracy"])
    with tr.job("j"), tr.child("select-on-source") as run_log:
        run_log.curves(curve, x="lam", y="accuracy", series=("k", "tau"), best=best,
                       name="select-on-source-curves", title="source accuracy over lam",
                       out_dir=tmp_path / "out")
    cl = MlflowClient(tracking_uri=tr.uri)
    arts = {a.path for a in cl.list_artifacts(run_log.run_id)}
    assert {"select-on-source-curves.json", "select-on-source-curves.png"} <= arts
    table = json.loads(open(cl.download_artifacts(
        run_log.run_id, "select-on-source-curves.json", str(tmp_path))).read())
    assert table["columns"] == ["k", "tau", "lam", "accuracy"]
    assert [r[2] for r in table["data"]] == [0.0, 0.5, 1.0, 0.0, 0.5, 1.0]
    assert max(r[3] for r in table["data"]) == 0.90
    assert cl.get_run(run_log.run_id).data.metrics == {}  # no lam-stepped metric curves
    png = tmp_path / "out/select-on-source-curves.png"
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_stage_runs_carry_their_params_and_ctrl_c_marks_runs_killed(tmp_path, store):
    """Issue 28: the teacher and read child runs had no params; SIGTERM / Ctrl-C (both end in
    KeyboardInterrupt) left runs FAILED or RUNNING instead of KILLED."""
    tr = _tracker(tmp_path, store, "ui-params")
    tr.stage_params("teacher", {"model": "pkg:smollm2-135m-instruct", "rows": 48})
    with pytest.raises(KeyboardInterrupt), tr.job("j") as parent:
        with tr.child("read", params={"source": "books.jsonl"}) as read:
            pass
        with tr.child("teacher") as teacher:
            raise KeyboardInterrupt
    cl = MlflowClient(tracking_uri=tr.uri)
    assert cl.get_run(read.run_id).data.params == {"source": "books.jsonl"}
    assert cl.get_run(teacher.run_id).data.params == {"model": "pkg:smollm2-135m-instruct",
                                                      "rows": "48"}
    assert cl.get_run(teacher.run_id).info.status == "KILLED"
    assert cl.get_run(parent.run_id).info.status == "KILLED"
    assert cl.get_run(read.run_id).info.status == "FINISHED"


def test_job_links_open_the_runs_not_the_genai_page(tmp_path, store):
    """Issue 28: `mlflow ui` opened the experiment on MLflow 3's empty GenAI overview. The links
    a job prints go to the runs (workflowType=machine_learning), to the job's run and to its
    methods side by side (the compare view of its variant runs)."""
    from urllib.parse import unquote

    from raydapt.core.tracking import browse_lines, job_links

    tr = _tracker(tmp_path, store, "ui-links")
    with tr.job("books", tags={"raydapt.method": "simda"}) as parent:
        with tr.child("teacher"):
            pass
        with tr.child("student-kl_sim", tags={"raydapt.variant": "kl_sim"}) as a:
            pass
        with tr.child("student-source_only", tags={"raydapt.variant": "source_only"}) as b:
            pass
    eid = MlflowClient(tracking_uri=tr.uri).get_experiment_by_name("ui-links").experiment_id
    links = job_links(tr.uri, "ui-links", "books")
    base = "http://127.0.0.1:5000"
    assert links["runs"] == f"{base}/#/experiments/{eid}/runs?workflowType=machine_learning"
    assert links["job"] == (f"{base}/#/experiments/{eid}/runs/{parent.run_id}"
                            "?workflowType=machine_learning")
    assert unquote(links["compare"]) == (f'{base}/#/compare-runs?runs=["{a.run_id}",'
                                         f'"{b.run_id}"]&experiments=["{eid}"]'
                                         "&workflowType=machine_learning")
    lines = browse_lines(tr.uri, "ui-links", "books")
    assert lines[0].startswith(f"MLflow: raydapt ui --tracking-uri {tr.uri} --experiment "
                               "ui-links")
    assert any(links["runs"] in ln for ln in lines) and any(links["compare"] in ln
                                                             for ln in lines)
    # an http tracking server is its own UI
    assert job_links(tr.uri, "ui-links", base="http://mlflow:8080")["runs"].startswith(
        "http://mlflow:8080/#/experiments/")
    assert browse_lines(tr.uri, "no-such-experiment") == []
