"""The cluster rehearsal: a tiny SimDA job submitted (Ray Jobs API, working_dir) to a local
multi-node autoscaling Ray cluster (`raydapt cluster up --local`: head with CPU 0, Ray's real
autoscaler, the fake multi-node provider; every worker node a real raylet on this machine).

What it checks, on one job:

- scale up from zero: no annotation / training node at the start; the teacher pool
  (concurrency [1, 3], resources {annotate_gpu: 1}) and the student fit (2 Ray Train workers,
  resources {train_gpu: 1}) make the autoscaler add those nodes;
- placement, from Ray's state API (actor -> node id -> node type): teacher actors only on
  annotation nodes, Ray Train workers only on training nodes (over two nodes: DDP over gloo
  between two raylets), and on the head nothing but the job driver and Ray's own zero-CPU
  bookkeeping actors (job supervisor, Ray Data stats);
- node loss: once the first teacher shard is written, the raylet of a node running a teacher
  actor is SIGKILLed. The job still succeeds; no finished shard is rewritten (same mtimes);
  the in-flight work lost with the node is counted (failed teacher tasks on that node, state
  API); the autoscaler brings up a replacement annotation node;
- same numbers: annotations equal a single-node run of the same job and seed (pseudo-labels
  identical, teacher probabilities within 1e-4; batches are composed differently across actors,
  so padding can move the last float bits), student accuracy reported next to it;
- tracking: the job logs over HTTP to an ``mlflow server`` on a throw-away PostgreSQL
  (artifacts proxied by the server; SQLite where PostgreSQL is not installed), read back
  through the server, counted in PostgreSQL, compared with ``raydapt runs compare``;
- scale down: after the job, every worker node is removed (idle timeout 15 s);
- a stage asking for a resource no node type offers is refused at submit, naming it.

Teardown stops every process of the cluster by PID (never `ray stop`), also on failure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tracking"))
from serve_mlflow import (  # noqa: E402  (tests/tracking/serve_mlflow.py)
    mlflow_backend,
    mlflow_server_at,
    postgres_at,
    postgres_missing,
)

from raydapt.cli import main as cli_main
from raydapt.ops import local_cluster as lc
from raydapt.ops import rehearsal as rh
from raydapt.ops.submit import submit

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1500)]  # ~5 min on an idle 2-core box

SHARD_ROWS = 4
N_SOURCE, N_TARGET, N_TRAIN, N_TEST = 24, 64, 24, 8
TEACHER = "MapWorker(" + rh.TEACHER_ACTOR + ")"
#: what runs a stage's rows: Ray Data's map actors and Ray Train's workers
STAGE_WORK = ("MapWorker(", rh.TRAIN_WORKER)


def job_sections(cluster: bool) -> dict:
    pool = {"concurrency": [1, 3], "num_cpus": 1, "threads": 1, "batch_size": 2,
            "shard_rows": SHARD_ROWS, "max_restarts": 3, "max_task_retries": 3}
    distill = {"variants": ["kl"], "epochs": 1, "batch_size": 8, "max_length": 24,
               "num_workers": 2, "cpus_per_worker": 1, "max_failures": 2}
    if cluster:
        pool["resources"] = {"annotate_gpu": 1}
        distill["resources"] = {"train_gpu": 1}
    return dict(source_rows=N_SOURCE, target_rows=N_TARGET,
                ray={"num_cpus": 2, "progress": False},
                data={"max_target_train_rows": N_TRAIN, "max_target_test_rows": N_TEST},
                teacher={"text_max_tokens": 24, "pool": pool},
                annotate={"k": 8, "baselines": ["zero_shot", "knn"]}, distill=distill)


def _env() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local autoscaling cluster for this module; torn down (by PID) whatever happens."""
    state = tmp_path_factory.mktemp("rdc") / "state.json"
    os.environ["RAY_AUTH_MODE"] = "token"
    import ray

    ray.shutdown()
    st = None
    try:
        st = lc.up(state=state, quiet=True)
        ray.init(address=st["address"], logging_level="WARNING", log_to_driver=False)
        yield st
    finally:
        ray.shutdown()
        lc.down(state=state, quiet=True)
        if st:
            left = lc.cluster_processes(st["temp_dir"])
            assert not left, f"processes left behind: {[p.pid for p in left]}"


def test_a_resource_no_node_type_offers_is_refused_at_submit(cluster, tmp_path, tiny_simda_job):
    job = tiny_simda_job(tmp_path, **job_sections(cluster=True))
    r = subprocess.run([sys.executable, "-m", "raydapt.cli", "submit", str(job),
                        "teacher.pool.resources={annotate_tpu: 1}", "--address",
                        cluster["dashboard"], "--no-pip", "--node-types", "local"],
                       capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 2, r.stdout + r.stderr
    assert "teacher.pool asks for annotate_tpu=1, which no local node type offers" in r.stderr
    assert "annotate_gpu: CPU=1, annotate_gpu=1" in r.stderr  # the node types are named


def _shards(cache: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in cache.glob("teacher/*/part-*.parquet")}


def _single_node_reference(make, d: Path) -> subprocess.Popen:
    """The same job and seed on one local Ray node (no custom resources: a CPU machine offers
    none), without the student (only the annotations are compared: the students' 2-worker
    DDP over one vs two nodes is not bit-for-bit the same reduction order)."""
    sec = job_sections(cluster=False)
    sec["distill"]["variants"] = []
    job = make(d, tag="ref", **sec)
    return subprocess.Popen([sys.executable, "-m", "raydapt.cli", "run", str(job)],
                            stdout=(d / "ref.log").open("w"), stderr=subprocess.STDOUT,
                            env=_env(), start_new_session=True)


@pytest.fixture
def mlflow_http(tmp_path):
    """A real ``mlflow server`` on PostgreSQL, as a cluster's would be, with its artifacts
    proxied by the server; the job on the cluster reaches it over HTTP only. Yields (URL,
    PostgreSQL URI). Where this machine has no PostgreSQL (a laptop; CI installs it) the
    server runs on SQLite, and the test says so (PostgreSQL URI None)."""
    why = postgres_missing()
    if why is not None:
        print(f"rehearsal: MLflow server on SQLite ({why})")
        with mlflow_server_at(f"sqlite:///{tmp_path}/mlflow-server.db", tmp_path / "mlflow-art",
                              tmp_path / "mlflow-server.log", start_timeout=180) as url:
            yield url, None
        return
    with postgres_at() as pg, mlflow_server_at(mlflow_backend(pg), tmp_path / "mlflow-art",
                                               tmp_path / "mlflow-server.log",
                                               start_timeout=180) as url:
        yield url, pg


def test_rehearsal_scale_up_placement_node_loss_scale_down(cluster, tmp_path, tiny_simda_job,
                                                           mlflow_http):
    from ray.job_submission import JobSubmissionClient

    st = cluster
    mlflow_url, pg = mlflow_http
    # tracking over HTTP; no artifact_location: the server's proxied default
    job = tiny_simda_job(tmp_path, tracking={"uri": mlflow_url, "artifact_location": "",
                                             "experiment": "rehearsal"},
                         **job_sections(cluster=True))
    cache = tmp_path / "cache"
    with rh.NodeWatch(st) as watch:
        start = watch.counts()
        assert start["annotate_gpu"] == 0 and start["train_gpu"] == 0, start  # from zero
        # as `raydapt submit JOB --address URL --no-pip` (in-process: one Python start less)
        assert submit(job, [], address=st["dashboard"], pip=False) == 0
        sid = "tiny"
        cl = JobSubmissionClient(st["dashboard"])

        # node loss: once a shard is written, kill the raylet of a node running a teacher actor
        t_end = time.time() + 600
        while time.time() < t_end:
            status = str(cl.get_job_status(sid))
            assert "FAILED" not in status and "STOPPED" not in status, cl.get_job_logs(sid)[-4000:]
            if _shards(cache):
                break
            time.sleep(0.5)
        done_before = _shards(cache)
        n_shards = -(-(N_SOURCE + N_TRAIN + N_TEST) // SHARD_ROWS)
        assert 1 <= len(done_before) < n_shards, "the teacher pass ended before the kill"
        alive = [a for a in rh.actors(st) if a["class_name"] == TEACHER and a["state"] == "ALIVE"]
        assert alive, "no teacher actor alive mid-pass"
        victim = alive[0]["node_id"]
        annotate_before = {n for n, t in watch.types.items() if t == "annotate_gpu"}
        rh.kill_raylet(st, victim)
        t_kill = time.time() - watch.t0

        t_end = time.time() + 900
        while time.time() < t_end:
            status = str(cl.get_job_status(sid))
            if status.endswith(("SUCCEEDED", "FAILED", "STOPPED")):
                break
            time.sleep(1)
        logs = cl.get_job_logs(sid)
        assert status.endswith("SUCCEEDED"), logs[-5000:]

        # the autoscaler replaced the lost annotation node
        replaced = [n for n, t in watch.types.items()
                    if t == "annotate_gpu" and n not in annotate_before
                    and watch.first_seen[n] > t_kill]
        assert replaced, f"no new annotation node after the kill; timeline {watch.timeline}"

        # placement, from the state API
        where = rh.placement(st, watch)
        assert set(where[TEACHER]) == {"annotate_gpu"}, where
        assert set(where[rh.TRAIN_WORKER]) == {"train_gpu"}, where
        train_nodes = {a["node_id"] for a in rh.actors(st) if a["class_name"] == rh.TRAIN_WORKER}
        assert len(train_nodes) >= 2, "the two Ray Train workers did not span two nodes"
        # on the CPU-0 head: the driver (a job supervisor) and Ray's own bookkeeping actors
        # (Ray Data's stats / coordinators, Ray Train's controller), which ask for no resources
        on_head = rh.head_actors(st, watch)
        assert not [c for c in on_head if c.startswith(STAGE_WORK)], on_head
        assert not {c: r for c, r in on_head.items() if r}, f"resources used on the head: {on_head}"
        assert "JobSupervisor" in on_head, on_head

        # only in-flight work was redone: finished shards untouched, lost tasks counted
        after = _shards(cache)
        assert {k: after[k] for k in done_before} == done_before, "finished shards recomputed"
        assert len(after) == n_shards
        lost = rh.failed_tasks_on(st, victim, rh.TEACHER_ACTOR)
        print(f"killed node {victim[-5:]} at {t_kill:.0f}s with {len(done_before)}/{n_shards} "
              f"shards done; {len(lost)} teacher task(s) in flight were retried elsewhere; "
              f"replacement node(s) {[n[-5:] for n in replaced]}")

        # scale down: every worker node goes once idle (the single-node reference run
        # meanwhile, on its own local Ray)
        ref = _single_node_reference(tiny_simda_job, tmp_path)
        try:
            watch.wait_for(lambda c: c["annotate_gpu"] == c["train_gpu"] == c["cpu"] == 0,
                           120, "the idle worker nodes to be removed")
            print("timeline", json.dumps(watch.timeline))
            rc = ref.wait(timeout=900)
        finally:
            if ref.poll() is None:
                os.killpg(ref.pid, signal.SIGKILL)
                ref.wait()
        assert rc == 0, (tmp_path / "ref.log").read_text()[-4000:]

    # same numbers as the single-node run
    ref_out = tmp_path / "runs-ref" / "tiny"
    out = tmp_path / "runs" / "tiny"
    ra = pd.read_parquet(ref_out / "annotations.parquet")
    rb = pd.read_parquet(out / "annotations.parquet")
    assert ra["id"].tolist() == rb["id"].tolist()
    assert (ra["pseudo_label"] == rb["pseudo_label"]).all()
    np.testing.assert_allclose(np.stack(ra["p_t"]), np.stack(rb["p_t"]), atol=1e-4)
    a = json.loads((ref_out / "results.json").read_text())["accuracy"]
    b = json.loads((out / "results.json").read_text())["accuracy"]
    assert {k: v for k, v in b.items() if k in a} == a  # teacher / kNN / p_T accuracies
    print("accuracy single-node", a, "cluster", b)

    # the job's runs are on the tracking server, and its artifacts came through it
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_url)
    exp = client.get_experiment_by_name("rehearsal")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED", [
        (r.info.run_name, r.info.status) for r in runs]
    p = parent[0]
    assert p.data.params["annotate.k"] == "8" and "acc.teacher.knn" in p.data.metrics
    kids = {r.data.tags["mlflow.runName"] for r in runs
            if r.data.tags.get("mlflow.parentRunId") == p.info.run_id}
    assert {"read", "teacher", "student-kl"} <= kids, kids
    assert p.info.artifact_uri.startswith("mlflow-artifacts:"), p.info.artifact_uri
    got = mlflow.artifacts.download_artifacts(run_id=p.info.run_id, artifact_path="config.yaml",
                                              tracking_uri=mlflow_url, dst_path=str(tmp_path))
    assert "annotate_gpu" in Path(got).read_text()
    if pg is not None:  # ... and the rows really live in PostgreSQL
        import psycopg2

        with psycopg2.connect(pg) as conn, conn.cursor() as cur:
            cur.execute("select count(*) from runs r join experiments e on "
                        "r.experiment_id = e.experiment_id where e.name = 'rehearsal'")
            assert cur.fetchone()[0] == len(runs)
    # runs compare reads the same server
    assert cli_main(["runs", "compare", "--experiment", "rehearsal", "--tracking-uri",
                     mlflow_url, "--metric", "acc.teacher.*", "--out",
                     str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp/compare.png").stat().st_size > 1000
