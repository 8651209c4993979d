"""A job whose cache, outputs, Ray Train checkpoints and MLflow artifacts live on an object store
(issue 24 item 3), against the S3-compatible server on 127.0.0.1 (tests/cluster/conftest.py):
no shared disk needed. Each run is a separate `raydapt run` process (its own local Ray), with a
fresh local scratch directory, as a run on another machine would have."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from s3_objects import list_objects  # tests/cluster/s3_objects.py

from raydapt.ops.local_cluster import free_ports

pytestmark = [pytest.mark.timeout(900), pytest.mark.e2e]

BUCKET = "rdtest"


def _objects(s3, prefix: str) -> dict[str, tuple[str, object]]:
    return list_objects(s3, BUCKET, prefix)


def _start(job: Path, log: Path, scratch: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1", "RAYDAPT_SCRATCH": str(scratch)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "raydapt.cli", "run", str(job)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the driver (as a crash would) and the local Ray it started (only ours)."""
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        kids = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    for k in kids:
        try:
            k.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(kids, timeout=30)


def _run(job: Path, log: Path, scratch: Path, *, rc: int = 0, timeout: int = 600) -> str:
    """Run the job to its end (its process tree killed whatever happens); assert its exit
    code; return its console."""
    p = _start(job, log, scratch)
    try:
        got = p.wait(timeout=timeout)
    finally:
        _kill_tree(p)
    text = log.read_text()
    assert got == rc, text[-4000:]
    return text


def _job(make, tmp: Path, prefix: str) -> Path:
    uri = f"s3://{BUCKET}/{prefix}"
    return make(tmp, source_rows=8, target_rows=24, ray={"num_cpus": 2, "progress": False},
                run={"output_dir": f"{uri}/runs", "cache_dir": f"{uri}/cache"},
                tracking={"artifact_location": f"{uri}/art", "experiment": "s3"},
                data={"max_target_train_rows": 8, "max_target_test_rows": 8},
                teacher={"text_max_tokens": 24, "pool": {
                    "concurrency": 1, "num_cpus": 1, "threads": 1, "batch_size": 4,
                    "shard_rows": 8}},
                annotate={"k": 4, "baselines": ["zero_shot", "knn"]},
                distill={"variants": ["kl"], "epochs": 1, "batch_size": 8, "max_length": 32,
                         "num_workers": 1, "cpus_per_worker": 1})


def test_a_job_on_s3_resumes_after_a_driver_kill(
        tmp_path, tiny_simda_job, s3_client, request):
    prefix = request.node.name
    job = _job(tiny_simda_job, tmp_path, prefix)
    n_shards = -(-(8 + 8 + 8) // 8)  # source + target train + target test rows, 8 per shard

    # 1. the driver is SIGKILLed once the first teacher shard is in the store
    p = _start(job, tmp_path / "1.log", tmp_path / "scratch-1")
    try:
        t0 = time.time()
        while not any("teacher/" in k and "/part-" in k
                      for k in _objects(s3_client, f"{prefix}/cache")):
            assert p.poll() is None, (tmp_path / "1.log").read_text()[-4000:]
            assert time.time() - t0 < 400, "no teacher shard after 400 s"
            time.sleep(0.2)
    finally:
        _kill_tree(p)
    before = {k: v for k, v in _objects(s3_client, f"{prefix}/cache").items()
              if k.startswith("teacher/")}
    shards = {k: v for k, v in before.items() if "/part-" in k}
    assert 1 <= len(shards) < n_shards and not any(k.endswith("_SUCCESS") for k in before)

    # 2. the rerun, from an empty scratch directory: the finished shards are reused as they are
    log = _run(job, tmp_path / "2.log", tmp_path / "scratch-2")
    assert f"resuming, {len(shards)}/{n_shards} shards already done" in log, log[-4000:]
    cache = _objects(s3_client, f"{prefix}/cache")
    assert {k: cache[k] for k in shards} == shards
    assert sum(k.startswith("teacher/") and "/part-" in k for k in cache) == n_shards
    assert any(k.startswith("teacher/") and k.endswith("_SUCCESS") for k in cache)
    out = _objects(s3_client, f"{prefix}/runs/tiny")
    assert {"results.json", "config.yaml", "annotations.parquet"} <= set(out), sorted(out)
    res = json.loads(s3_client.get_object(Bucket=BUCKET, Key=f"{prefix}/runs/tiny/results.json")
                     ["Body"].read())
    assert "student:kl" in res["accuracy"], res["accuracy"]
    # Ray Train's checkpoints and run state went to the store, under the job's output URI,
    # and the finished fit's final metrics beside them
    assert any(k.startswith("train/") and "checkpoint" in k for k in out), sorted(out)
    assert any(k.startswith("train/") and k.endswith("/final_metrics.json") for k in out)
    # MLflow artifacts (the config, the results table) went to the s3:// artifact location
    art = _objects(s3_client, f"{prefix}/art")
    assert any(k.endswith("config.yaml") for k in art), sorted(art)
    # (a third run that finds every stage and the finished student in the bucket was cut for
    # CI time: the cache's reuse on s3:// is test_cache_s3.py's, a finished student's
    # test_train_steps.py's)


def test_an_unreachable_object_store_is_one_line_before_any_stage(tmp_path, tiny_simda_job,
                                                                  monkeypatch):
    monkeypatch.setenv("RAYDAPT_S3_ENDPOINT", f"http://127.0.0.1:{free_ports(1)[0]}")  # nobody
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    job = tiny_simda_job(tmp_path, run={"cache_dir": "s3://somebucket/cache"})
    r = subprocess.run([sys.executable, "-m", "raydapt.cli", "run", str(job)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(
        "raydapt: error: run.cache_dir: storage s3://somebucket/cache is not usable: "), lines
    assert r.stdout == ""  # no stage started (a stage prints its progress to stdout)


def test_rejects_of_a_file_with_no_usable_rows_land_on_s3(tmp_path, tiny_simda_job, s3_client,
                                                          request):
    """The job's one error line names the rejects' URI, and the file is there."""
    import io

    import pandas as pd

    prefix = request.node.name
    bad = [{"id": f"b{i}", "text": "" if i % 2 else "ok", "label": "neutral"} for i in range(6)]
    job = tiny_simda_job(tmp_path, source_rows=0, extra_source=bad, target_rows=8,
                         run={"output_dir": f"s3://{BUCKET}/{prefix}/runs",
                              "cache_dir": f"s3://{BUCKET}/{prefix}/cache"},
                         ray={"num_cpus": 2, "progress": False})
    text = _run(job, tmp_path / "run.log", tmp_path / "scratch", rc=2, timeout=300)
    want = f"see s3://{BUCKET}/{prefix}/runs/tiny/rejects.parquet"
    assert [ln for ln in text.splitlines() if ln.startswith("raydapt: error:")][0].endswith(
        want), text[-3000:]
    body = s3_client.get_object(Bucket=BUCKET, Key=f"{prefix}/runs/tiny/rejects.parquet")
    rej = pd.read_parquet(io.BytesIO(body["Body"].read()))
    assert sorted(rej["id"]) == [f"b{i}" for i in range(6)]
