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
  API); the autoscaler brings up a replacement annotation node. Then, once the student's
  first epoch is checkpointed, the raylet under one of its Ray Train workers is SIGKILLed:
  Ray Train restarts the worker group from that checkpoint (FailureConfig) and the fit
  finishes its 3 epochs;
- same numbers: annotations equal a single-node run of the same job and seed (pseudo-labels
  identical, teacher probabilities within 1e-4; batches are composed differently across actors,
  so padding can move the last float bits), student accuracy reported next to it;
- tracking: the job logs over HTTP to an ``mlflow server`` on a throw-away PostgreSQL
  (artifacts proxied by the server; SQLite where PostgreSQL is not installed), read back
  through the server, counted in PostgreSQL, compared with ``raydapt runs compare``;
- scale down: after the job, every worker node is removed (idle timeout 15 s);
- a stage asking for a resource no node type offers is refused at submit, naming it;
- NTK-Selector's stage-2 scoring pool (``grad_pool`` asking for ``annotate_gpu``), driven from
  this process: annotation nodes from zero, scoring actors only there, a node killed after the
  first score shard (finished shards kept, the pass finishes), scores equal to the in-process
  reference.

The cluster is started and stopped with the CLI a user runs (`raydapt cluster up --local`,
`status`, `down`), each checked. Teardown stops every process of the cluster by PID (never
`ray stop`), also on failure, and fails if anything is left.
"""

from __future__ import annotations

import json
import os
import re
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

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1500)]  # ~5.5 min on an idle 2-core box

SHARD_ROWS = 4
N_SOURCE, N_TARGET, N_TRAIN, N_TEST = 24, 64, 24, 8
TEACHER = "MapWorker(" + rh.TEACHER_ACTOR + ")"
#: what runs a stage's rows: Ray Data's map actors and Ray Train's workers
STAGE_WORK = ("MapWorker(", rh.TRAIN_WORKER)


def job_sections(cluster: bool) -> dict:
    pool = {"concurrency": [1, 3], "num_cpus": 1, "threads": 1, "batch_size": 2,
            "shard_rows": SHARD_ROWS, "max_restarts": 3, "max_task_retries": 3}
    distill = {"variants": ["kl"], "epochs": 3, "batch_size": 8, "max_length": 24,
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


def _cli(*args: str, state: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**_env(), "RAYDAPT_LOCAL_CLUSTER": str(state)}
    return subprocess.run([sys.executable, "-m", "raydapt.cli", "cluster", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local autoscaling cluster for this module, started and stopped as a user does
    (`raydapt cluster up --local` / `status` / `down`, each checked); torn down by PID whatever
    happens, and nothing of it may be left behind."""
    state = tmp_path_factory.mktemp("rdc") / "state.json"
    os.environ["RAY_AUTH_MODE"] = "token"
    import ray

    ray.shutdown()
    st = None
    try:
        r = _cli("up", "--local", state=state, timeout=480)
        assert r.returncode == 0, r.stdout + r.stderr
        st = json.loads(state.read_text())
        assert f"dashboard: {st['dashboard']}" in r.stdout and st["address"] in r.stdout
        assert "annotate_gpu    0..3" in r.stdout and "train_gpu       0..2" in r.stdout
        procs = lc.cluster_processes(st["temp_dir"])
        assert any(p.name() == "raylet" for p in procs) and any(p.name() == "gcs_server"
                                                                for p in procs)
        # the real autoscaler runs, with the fake multi-node provider's config
        assert any("monitor.py" in " ".join(p.cmdline()) for p in procs)
        r = _cli("up", "--local", state=state, timeout=60)
        assert r.returncode == 2 and "already up" in r.stderr, r.stdout + r.stderr
        r = _cli("status", state=state, timeout=60)
        assert r.returncode == 0 and "processes:" in r.stdout, r.stdout + r.stderr
        ray.init(address=st["address"], logging_level="WARNING", log_to_driver=False)
        yield st
    finally:
        ray.shutdown()
        try:
            r = _cli("down", state=state, timeout=120)
        finally:
            lc.down(state=state, quiet=True)  # a no-op after a good `cluster down`
            if st:
                left = lc.cluster_processes(st["temp_dir"])
                assert not left, f"processes left behind: {[p.pid for p in left]}"
    assert r.returncode == 0 and "local cluster down" in r.stdout, r.stdout + r.stderr
    assert not Path(st["temp_dir"]).exists() and not state.exists()


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


def _while_running(cl, sid: str, done, timeout_s: float, poll_s: float) -> None:
    """Poll until ``done()`` (at most ``timeout_s``), failing at once if the job failed or was
    stopped meanwhile."""
    t_end = time.time() + timeout_s
    while time.time() < t_end:
        status = str(cl.get_job_status(sid))
        assert "FAILED" not in status and "STOPPED" not in status, cl.get_job_logs(sid)[-4000:]
        if done():
            return
        time.sleep(poll_s)


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
        _while_running(cl, sid, lambda: bool(_shards(cache)), 600, 0.5)
        done_before = _shards(cache)
        n_shards = -(-(N_SOURCE + N_TRAIN + N_TEST) // SHARD_ROWS)
        assert 1 <= len(done_before) < n_shards, "the teacher pass ended before the kill"
        alive = [a for a in rh.actors(st) if a["class_name"] == TEACHER and a["state"] == "ALIVE"]
        assert alive, "no teacher actor alive mid-pass"
        victim = alive[0]["node_id"]
        annotate_before = {n for n, t in watch.types.items() if t == "annotate_gpu"}
        rh.kill_raylet(st, victim)
        t_kill = time.time() - watch.t0

        # then a training node: once the student's first epoch is checkpointed, kill the raylet
        # under one of its two Ray Train workers; Ray Train restarts the group (FailureConfig,
        # distill.max_failures) from that checkpoint on a replacement node
        _while_running(cl, sid, lambda: rh.checkpointed(tmp_path / "runs" / "tiny"), 900, 0.3)
        train_victims = rh.nodes_of(st, rh.TRAIN_WORKER, "ALIVE")
        assert train_victims and not str(cl.get_job_status(sid)).endswith("SUCCEEDED"), \
            "the student finished before a training node could be killed"
        rh.kill_raylet(st, train_victims[0])
        t_train_kill = time.time() - watch.t0

        t_end = time.time() + 900
        while time.time() < t_end:
            status = str(cl.get_job_status(sid))
            if status.endswith(("SUCCEEDED", "FAILED", "STOPPED")):
                break
            time.sleep(1)
        logs = cl.get_job_logs(sid)
        assert status.endswith("SUCCEEDED"), logs[-5000:]
        # ... and the fit went on from the checkpoint, not from scratch, to all its epochs
        resumed = re.search(r"resumed from the checkpoint of epoch ([12])/3", logs)
        assert resumed, logs[-5000:]
        student = json.loads((tmp_path / "runs" / "tiny" / "results.json").read_text())[
            "students"]["kl"]
        assert student["epochs"] == 3, student

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
              f"replacement node(s) {[n[-5:] for n in replaced]}; training node "
              f"{train_victims[0][-5:]} killed at {t_train_kill:.0f}s, the fit resumed from "
              f"epoch {resumed.group(1)}'s checkpoint")

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


GRAD_ACTOR = "MapBatches(GradProject)"  # NTK's stage-2 scoring step (stream_pass names it)
GRAD = "MapWorker(" + GRAD_ACTOR + ")"


def test_ntk_stage2_pool_scales_out_and_loses_a_node(cluster, tmp_path):
    """NTK-Selector's stage-2 scoring pool (per-sample LoRA gradients, projected and scored
    against ḡ_D; a tiny random Llama with SmolLM2's tokenizer, tests/recipes/ntk_tiny.py),
    driven by this process as the NTK job's driver drives it, with ``grad_pool`` asking for
    ``annotate_gpu``: annotation nodes come up from zero, the scoring actors run only there, a
    node lost mid-pass costs no finished shard (the pass restarts over the unfinished ones), and
    the scores equal the in-process reference. (The whole NTK job submitted to the cluster,
    warm-up and fine-tunes included, is benchmarks/cluster_rehearsal.py --job ntk: 197 s, too
    long for CI.)"""
    import threading

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    from ntk_tiny import encoded, random_adapter, reference_scores, tiny_model  # tests/recipes/

    from raydapt.config import validate_job
    from raydapt.core.cache import StageCache
    from raydapt.core.tracking import Tracker
    from raydapt.recipes.ntk_select import (
        STAGE_VERSIONS,
        candidate_source,
        candidates_file,
        read_scores,
        stage2_scores,
    )

    st = cluster
    model = tiny_model(tmp_path / "tiny")
    net = random_adapter(model, tmp_path / "warm")
    n, shard, proj = 96, 3, 32  # 32 shards, ~0.1 s of gradients each
    rows = encoded(model, n, max_length=64)
    pool = {"concurrency": [1, 2], "num_cpus": 1, "threads": 1, "batch_size": shard,
            "resources": {"annotate_gpu": 1}, "max_restarts": 3, "max_task_retries": 3}
    cfg = validate_job({"method": "ntk_select", "model": str(model),
                        "run": {"cache_dir": str(tmp_path / "cache")},
                        "select": {"proj_dim": proj, "proj_chunk_rows": 256, "shard_rows": shard,
                                   "grad_micro_batch": shard, "grad_pool": pool}})
    against = np.random.default_rng(0).normal(size=proj).astype(np.float32)
    cache = StageCache(cfg.run.cache_dir, versions=STAGE_VERSIONS)
    tracker = Tracker(enabled=False, uri="sqlite:///unused.db", experiment="x",
                      artifact_location="")
    path = candidates_file(cfg, cache, tracker, ids=list(rows["id"]), parts={"rehearsal": 1},
                           rows=lambda: rows)

    def score_shards() -> dict[str, int]:
        return {str(p): p.stat().st_mtime_ns
                for p in (tmp_path / "cache").glob("scores-ntk/*/part-*.parquet")}

    got: dict = {}

    def stage2() -> None:
        try:
            got["scores"] = read_scores(stage2_scores(
                cfg, cache, tracker, adapter=tmp_path / "warm", kind="ntk",
                source=candidate_source(path, shard), against=against))
        except BaseException as e:  # noqa: BLE001 (re-raised in the test's thread)
            got["error"] = e

    with rh.NodeWatch(st) as watch:
        # from zero: the SimDA rehearsal's annotation nodes are gone once idle
        watch.wait_for(lambda c: c["annotate_gpu"] == 0, 120, "no annotation node")
        t_start = time.time() - watch.t0
        th = threading.Thread(target=stage2, daemon=True)
        th.start()
        # the victim: the node of the first scoring actor (state API, while the actor loads its
        # model); its raylet is killed the moment the first score shard is written
        t_end = time.time() + 600
        alive: list = []
        while not alive and th.is_alive() and time.time() < t_end:
            alive = [a for a in rh.actors(st) if a["class_name"] == GRAD and a["state"] == "ALIVE"]
            time.sleep(0.2)
        assert alive, "no scoring actor came up"
        victim = alive[0]["node_id"]
        while not score_shards() and th.is_alive() and time.time() < t_end:
            time.sleep(0.05)
        rh.kill_raylet(st, victim)
        done_before = score_shards()
        n_shards = -(-n // shard)
        assert 1 <= len(done_before) < n_shards, "the scoring pass ended before the kill"
        th.join(timeout=600)
        assert not th.is_alive(), "the scoring pass did not finish after the node loss"
        if "error" in got:
            raise got["error"]
        first = watch.first_time("annotate_gpu")
        assert first is not None and first > t_start, watch.timeline  # scaled up from zero
        where = rh.placement(st, watch)
        assert set(where[GRAD]) == {"annotate_gpu"}, where
        lost = rh.failed_tasks_on(st, victim, GRAD_ACTOR)

    # no finished shard rewritten; every shard there
    after = score_shards()
    assert {k: after[k] for k in done_before} == done_before, "finished shards recomputed"
    assert len(after) == n_shards
    # same numbers: the in-process reference of the same gradients and projection
    scores = got["scores"]
    assert list(scores["id"]) == list(rows["id"]) and (scores["_error"] == "").all()
    ref = reference_scores(net, rows, proj, against)
    np.testing.assert_allclose(scores["score"].to_numpy(), ref, rtol=1e-3, atol=1e-4)
    print(f"ntk stage 2: first annotation node at {first:.0f}s; node {victim[-5:]} killed with "
          f"{len(done_before)}/{n_shards} shards done; {len(lost)} scoring task(s) in flight "
          f"were retried elsewhere; timeline {json.dumps(watch.timeline)}")
