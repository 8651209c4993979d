"""The whole SimDA job on ~90 rows: real SmolLM2 teacher, real MiniLM student, real Ray Train,
real FAISS and a real MLflow store. Checks outputs, tracking, rejects and the stage cache."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from raydapt.cli import main

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.timeout(900), pytest.mark.e2e]


SECRET = "hf_PlantedSecret_0d5c9e7a41"


def _files_containing(root, needle: str) -> list[str]:
    return [str(f) for f in root.rglob("*") if f.is_file() and needle.encode() in f.read_bytes()]


def test_simda_end_to_end(tmp_path, capsys, monkeypatch, tiny_simda_job, data_dir):
    # a planted secret, as a user would have it: in the environment and referenced by the config
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET + "_aws")
    bad = [{"id": "bad-1", "text": "", "label": "positive"},
           {"id": "bad-2", "text": "ok text", "label": "neutral"}]
    db = tmp_path / "mlruns.db"
    job = tiny_simda_job(
        tmp_path, source_rows=40, extra_source=bad, tracking={"experiment": "t"},
        data={"max_target_train_rows": 24, "max_target_test_rows": 24},
        teacher={"text_max_tokens": 32, "demo_max_tokens": 12, "hf_token": "${HF_TOKEN}",
                 "pool": {"concurrency": 1, "num_cpus": 1, "batch_size": 16}},
        annotate={"k": 8, "prompt_k": 2, "baseline_max_rows": 6,
                  "baselines": ["zero_shot", "knn", "icl_random", "icl_nearest", "knn_prompt"]},
        distill={"variants": ["kl_sim"], "epochs": 1, "batch_size": 8,
                 "max_length": 32, "num_workers": 2, "cpus_per_worker": 0.9})
    assert main(["run", str(job)]) == 0
    logged = capsys.readouterr()
    # a console a person can read (issue 16): stage lines, no Ray noise, no traceback
    console = logged.out + logged.err
    assert len(console.splitlines()) < 80, console
    for noise in ("Traceback", "\x1b[", "streaming_executor", "Running Dataset",
                  "DeprecationWarning", "Reporting training result", "Checkpoint successfully",
                  "Setting up process group", "execution finished"):
        assert noise not in console, noise
    out = tmp_path / "runs/tiny"
    res = json.loads((out / "results.json").read_text())
    # the results table and chart land beside results.json too, not only in MLflow
    table = (out / "results.csv").read_text().splitlines()
    assert table[0].startswith("method,family,metric,value") and len(table) == 1 + len(
        res["accuracy"])
    assert (out / "results.png").stat().st_size > 10_000
    want = {"student:kl_sim", "teacher:zero_shot", "teacher:knn",
            "teacher:icl_random", "teacher:icl_nearest", "teacher:knn_prompt", "teacher:teacher"}
    assert want <= set(res["accuracy"])
    assert all(0.0 <= v <= 1.0 for v in res["accuracy"].values())
    assert res["counts"]["source_rows"] == 40 and res["counts"]["target_test_rows"] == 24
    # 24 target-train rows, batch 8 on 2 workers, 1 epoch = 3 steps (the step-matched
    # source-only student gets the same 3: tests/unit/test_train_steps.py; one student here
    # saves a Ray Train start, ~36 s)
    st = res["students"]
    assert (st["kl_sim"]["rows"], st["kl_sim"]["steps"]) == (24, 3)

    ann = pd.read_parquet(out / "annotations.parquet")
    assert len(ann) == 24 and ann["id"].is_unique
    p_t = np.stack(ann["p_t"])
    np.testing.assert_allclose(p_t.sum(1), 1.0, rtol=1e-5)
    assert (ann["pseudo_label"] == p_t.argmax(1)).all()
    assert np.stack(ann["h_t"]).shape == (24, 576) and len(ann["nbr_ids"][0]) == 8

    rej = pd.read_parquet(out / "rejects.parquet")
    assert set(rej["id"]) == {"bad-1", "bad-2"}
    assert any("empty text" in r for r in rej["reason"])
    assert (out / "confusion.png").stat().st_size > 1000

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("t")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    p = parent[0]
    assert p.data.params["annotate.k"] == "8" and "data_fingerprint.source" in p.data.params
    assert p.data.metrics["acc.student.kl_sim"] == pytest.approx(res["accuracy"]["student:kl_sim"])
    children = {r.data.tags["mlflow.runName"]: r for r in runs if r is not p and
                r.data.tags.get("mlflow.parentRunId") == p.info.run_id}
    assert {"read", "teacher", "prompted", "student-kl_sim"} <= set(children)
    hist = client.get_metric_history(children["student-kl_sim"].info.run_id, "accuracy")
    assert len(hist) == 1  # one epoch -> one accuracy point from rank 0
    arts = {a.path for a in client.list_artifacts(p.info.run_id)}
    assert {"config.yaml", "annotations.parquet", "results.json", "confusion.png"} <= arts
    # results at a glance (one row per teacher read-out / student), datasets, child tags
    assert {"results.csv", "results.png", "results_table.json"} <= arts
    table = pd.read_csv(client.download_artifacts(p.info.run_id, "results.csv", str(tmp_path)))
    assert set(table["method"]) == set(res["accuracy"]) and table["value"].is_monotonic_decreasing
    assert {i.dataset.name for i in client.get_run(p.info.run_id).inputs.dataset_inputs} == {
        "source", "target"}
    kl = children["student-kl_sim"].data.tags
    assert (kl["raydapt.method"], kl["raydapt.stage"], kl["raydapt.variant"]) == (
        "simda", "student", "kl_sim")

    # raydapt plan's estimates sit next to the measured stage times on the parent run
    assert int(p.data.params["plan.teacher.rows"]) > 0 and "plan.teacher.llm_tokens" in p.data.params
    assert p.data.metrics["actual.teacher.seconds"] > 0

    # the planted secret is nowhere: params, tags, artifacts, outputs, cache keys, logs
    assert p.data.params["teacher.hf_token"] == "***"
    for r in runs:
        for k, v in {**r.data.params, **r.data.tags}.items():
            assert SECRET not in v, f"secret in {k} of run {r.info.run_name}"
    for root in (tmp_path / "art", tmp_path / "runs", tmp_path / "cache"):
        assert not _files_containing(root, SECRET), root
    assert SECRET not in logged.out + logged.err

    # a second run with unchanged inputs reuses the teacher and prompted stages; it chooses
    # k / tau / lam on a labelled third domain (16 dvd rows + one without a label: a reject);
    # no student (nothing below depends on one: a Ray Train start saved)
    dev = [json.loads(r) for r in (data_dir / "amazon/dvd.jsonl").read_text().splitlines()[:16]]
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dev + [
        {"id": "dev-nolabel", "text": "fine"}]))
    capsys.readouterr()
    assert main(["run", str(job), "distill.variants=[]", "annotate.select_on_dev=true",
                 "data.dev.path=dev.jsonl", "annotate.k_grid=[2, 4]"]) == 0
    log = capsys.readouterr().out
    assert "teacher: cached" in log and "prompted: cached" in log
    assert "select on dev (16 labelled dev.jsonl rows" in log
    chosen = json.loads((out / "select-on-dev.json").read_text())
    assert chosen["rows"] == 16 and len(chosen["curve"]) == 2 * 4 * 11  # k x tau x lam grid
    res2 = json.loads((out / "results.json").read_text())
    assert res2["k_tau_lam_chosen_on"] == "dev:dev.jsonl"
    assert (res2["k"], res2["tau"], res2["lam"]) == tuple(chosen["best"][x] for x in (
        "k", "tau", "lam"))
    assert "dev-nolabel" in set(pd.read_parquet(out / "rejects.parquet")["id"])
    runs2 = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    sel = [r for r in runs2 if r.data.tags.get("mlflow.runName") == "select-on-dev"]
    assert len(sel) == 1 and sel[0].data.metrics["best_dev_accuracy"] == pytest.approx(
        chosen["best"]["accuracy"])
    # the recorded config is the config that ran: the chosen k / tau / lam under their own
    # keys, the job file's values beside them as <key>.requested (issue 27)
    p2 = client.get_run(sel[0].data.tags["mlflow.parentRunId"])
    for key in ("k", "tau", "lam"):
        assert float(p2.data.params[f"annotate.{key}"]) == float(res2[key]), key
    assert p2.data.params["annotate.k.requested"] == "8"
    assert p2.data.params["annotate.lam.requested"] == "0.5"
    ran = yaml.safe_load((out / "config.yaml").read_text())
    assert ran["annotate"]["k"] == res2["k"] and ran["annotate"]["lam"] == res2["lam"]
    assert "#   annotate.k: " in (out / "config.yaml").read_text()
