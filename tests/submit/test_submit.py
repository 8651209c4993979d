"""`raydapt submit` / `raydapt jobs` against a real local Ray head (tests/submit/conftest.py):
a tiny SimDA job (real SmolLM2 teacher, FAISS, MLflow sqlite) goes through the Job Submission
API, runs to SUCCEEDED and logs under the parent run the client created."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from raydapt.cli import main
from raydapt.ops.submit import (
    WORKING_DIR_EXCLUDES,
    build_runtime_env,
    pinned_requirements,
    prepare,
)

pytestmark = pytest.mark.timeout(300)


def _tiny_job(make, tmp_path, name="sub-tiny"):
    return make(tmp_path, target_rows=24, name=name, tracking={"experiment": "sub"},
                ray={"progress": False}, data={"max_target_train_rows": 8,
                                               "max_target_test_rows": 8},
                teacher={"text_max_tokens": 24, "pool": {"concurrency": 1, "num_cpus": 1,
                                                         "threads": 1, "batch_size": 32}},
                annotate={"k": 4, "baselines": ["zero_shot", "knn"]}, distill={"variants": []})


def test_runtime_env_pins_and_excludes():
    reqs = pinned_requirements()
    by_name = {r.split("[")[0].split("=")[0]: r for r in reqs}
    assert "ray" not in by_name  # the cluster's Ray comes with its image
    assert by_name["torch"] == "torch==2.13.0" and by_name["mlflow"].startswith("mlflow==3.17.")
    assert all("==" in r for r in reqs), reqs
    env = build_runtime_env(env_vars={"A": "1"}, extra={"env_vars": {"B": "2"}, "pip": None})
    assert "pip" not in env and env["env_vars"] == {"A": "1", "B": "2"}
    assert {".venv", "runs", "mlruns*", ".raydapt"} <= set(env["excludes"])
    assert env["working_dir"].endswith("main") or (env["working_dir"] + "/raydapt")
    assert set(WORKING_DIR_EXCLUDES) == set(env["excludes"])


def test_bad_override_fails_before_contacting_a_cluster(tmp_path, tiny_simda_job, capsys):
    job = _tiny_job(tiny_simda_job, tmp_path)
    # no cluster listens on this address: the config error must come first
    rc = main(["submit", str(job), "teacher.pool.concurency=2", "--address", "http://127.0.0.1:9"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "teacher.pool.concurency: unknown key" in err and "concurrency" in err
    cfg, raw = prepare(job, ["run.name=x", "annotate.k=5"])
    assert cfg.run.name == "x" and raw["annotate"]["k"] == 5


def test_submit_follow_succeeds_and_logs_under_parent(ray_head, tmp_path, tiny_simda_job):
    job = _tiny_job(tiny_simda_job, tmp_path)
    cmd = [sys.executable, "-m", "raydapt.cli", "submit", str(job), "annotate.k=5",
           "--address", ray_head, "--no-pip", "--follow"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "submitted sub-tiny to" in out and "target-test accuracy" in out

    # the job ran on the cluster and logged under the parent run the client created
    from mlflow.tracking import MlflowClient

    cl = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns.db")
    runs = cl.search_runs([cl.get_experiment_by_name("sub").experiment_id])
    parents = [x for x in runs if "mlflow.parentRunId" not in x.data.tags]
    assert len(parents) == 1, [x.data.tags.get("mlflow.runName") for x in runs]
    p = parents[0]
    assert p.info.status == "FINISHED" and p.data.tags["raydapt.submission_id"] == "sub-tiny"
    assert p.data.tags["raydapt.method"] == "simda" and "raydapt.config_hash" in p.data.tags
    assert p.data.params["annotate.k"] == "5"  # the override reached the cluster
    assert p.data.params["plan.teacher.rows"] == "40"  # 24 source + 8 + 8 target rows
    assert "acc.teacher.knn" in p.data.metrics
    # the estimate next to the actual: plan.teacher.* params, actual.teacher.seconds metric
    assert float(p.data.params["plan.teacher.hours"]) > 0
    assert p.data.metrics["actual.teacher.seconds"] > 0
    kids = {x.data.tags["mlflow.runName"] for x in runs
            if x.data.tags.get("mlflow.parentRunId") == p.info.run_id}
    assert {"read", "teacher"} <= kids

    # jobs status / logs; a second submission of the same run name gets a suffixed id
    assert main(["jobs", "status", "sub-tiny", "--address", ray_head]) == 0
    from raydapt.ops.submit import client, unique_submission_id

    c = client(ray_head)
    assert c.get_job_info("sub-tiny").metadata["raydapt.mlflow_run_id"] == p.info.run_id
    sid = unique_submission_id(c, "sub-tiny")
    assert sid.startswith("sub-tiny-") and len(sid) == len("sub-tiny-") + 6


def test_failed_job_exit_code_and_stop(ray_head, tmp_path, tiny_simda_job, monkeypatch,
                                       capsys):
    """${VAR} placeholders are resolved on the cluster: a variable set only on the client
    validates here and fails there, fast -> exit code 1 and the parent run marked FAILED."""
    job = _tiny_job(tiny_simda_job, tmp_path, name="sub-bad")
    text = job.read_text()
    assert f"root: {tmp_path}\n" in text  # the placeholder below must replace a real path
    job.write_text(text.replace(f"root: {tmp_path}\n", "root: ${RAYDAPT_ONLY_HERE}\n"))
    monkeypatch.setenv("RAYDAPT_ONLY_HERE", str(tmp_path))
    rc = main(["submit", str(job), "--address", ray_head, "--no-pip", "--follow", "--no-plan"])
    out = capsys.readouterr()
    assert rc == 1, out.err[-3000:]
    assert "environment variable RAYDAPT_ONLY_HERE is not set" in out.out + out.err
    from mlflow.tracking import MlflowClient

    cl = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns.db")
    runs = cl.search_runs([cl.get_experiment_by_name("sub").experiment_id])
    assert [x.info.status for x in runs] == ["FAILED"]
    assert main(["jobs", "logs", "sub-bad", "--address", ray_head]) == 0
    assert "RAYDAPT_ONLY_HERE" in capsys.readouterr().out
    assert main(["jobs", "status", "sub-bad", "--address", ray_head]) == 1
    assert "sub-bad: FAILED" in capsys.readouterr().out
    assert main(["jobs", "stop", "sub-bad", "--address", ray_head]) == 0
    assert "already finished" in capsys.readouterr().out
    rc = main(["jobs", "status", "nope-123", "--address", ray_head])
    assert rc == 2 and "no job 'nope-123'" in capsys.readouterr().err
    # token auth is on (Ray 2.60 default): a client that sends no token gets one clear message
    r = subprocess.run([sys.executable, "-m", "raydapt.cli", "jobs", "status", "sub-bad",
                        "--address", ray_head], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert r.returncode == 2 and "token auth" in r.stderr and "RAY_AUTH_MODE=token" in r.stderr
    assert main(["jobs", "status", "x", "--address", "http://127.0.0.1:9"]) == 2
    assert "cannot reach the Ray job server" in capsys.readouterr().err
