"""MLflow on PostgreSQL, for real: a throw-away PostgreSQL cluster (Debian's binaries, initdb in a
temp dir, 127.0.0.1 on a free port), an ``mlflow server`` against it, a tiny SimDA job logging
through the server's HTTP API, and the runs read back. CI installs PostgreSQL (.ci/run); without
its binaries (a laptop) the test skips and says why.

Teardown stops only what the test started: the mlflow server by its process group, PostgreSQL
with ``pg_ctl stop`` on its own data directory."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from serve_mlflow import free_port, mlflow_server_at  # tests/tracking/serve_mlflow.py

from raydapt.cli import main

pytestmark = [pytest.mark.postgres, pytest.mark.usefixtures("ray_local"), pytest.mark.timeout(300)]


def _pg_bin() -> Path | None:
    for cand in [shutil.which("initdb"), *sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))]:
        if cand and Path(cand).with_name("pg_ctl").exists():
            return Path(cand).resolve().parent
    return None


def _as_pg_user(cmd: list[str]) -> list[str]:
    """initdb / postgres refuse to run as root: run them as the 'postgres' user then."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


@pytest.fixture(scope="module")
def postgres_uri():
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found: apt-get install postgresql "
                    "(CI does this in .ci/run)")
    pytest.importorskip("psycopg2", reason="psycopg2-binary is not installed (pinned in "
                        "constraints.txt)")
    if os.geteuid() == 0:
        try:
            pg = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server")
    base = Path(tempfile.mkdtemp(prefix="rdpg-", dir="/tmp"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        for p in (base, sock):
            os.chown(p, pg.pw_uid, pg.pw_gid)
    port = free_port()
    subprocess.run(_as_pg_user([str(bindir / "initdb"), "-D", str(data), "-U", "postgres",
                                "--auth=trust", "-E", "UTF8", "--no-sync"]),
                   check=True, capture_output=True, timeout=120)
    opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(_as_pg_user([str(bindir / "pg_ctl"), "-D", str(data), "-o", opts,
                                "-l", str(base / "pg.log"), "-w", "-t", "60", "start"]),
                   check=True, capture_output=True, timeout=90)
    try:
        subprocess.run([str(bindir / "createdb") if (bindir / "createdb").exists() else "createdb",
                        "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow"],
                       check=True, capture_output=True, timeout=60)
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(_as_pg_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast",
                                    "-w", "stop"]), capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(postgres_uri, tmp_path_factory):
    art = tmp_path_factory.mktemp("mlflow-art")
    # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3: name the pinned psycopg2 driver
    with mlflow_server_at(postgres_uri.replace("postgresql://", "postgresql+psycopg2://"), art,
                          art / "server.log", start_timeout=120) as url:
        yield url


def test_tiny_job_logs_to_mlflow_server_on_postgres(mlflow_server, postgres_uri, tmp_path,
                                                     tiny_simda_job):
    job = tiny_simda_job(
        tmp_path, target_rows=24, name="pg-tiny", ray={"progress": False},
        tracking={"uri": mlflow_server, "artifact_location": f"{tmp_path}/art", "experiment": "pg"},
        data={"max_target_train_rows": 8, "max_target_test_rows": 8},
        teacher={"text_max_tokens": 24, "pool": {"concurrency": 1, "num_cpus": 1, "threads": 1,
                                                 "batch_size": 32}},
        annotate={"k": 4, "baselines": ["zero_shot", "knn"]}, distill={"variants": []})
    assert main(["run", str(job)]) == 0

    from mlflow.tracking import MlflowClient

    # read back through the server ...
    cl = MlflowClient(tracking_uri=mlflow_server)
    runs = cl.search_runs([cl.get_experiment_by_name("pg").experiment_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    p = parent[0]
    assert p.data.params["annotate.k"] == "4" and "acc.teacher.knn" in p.data.metrics
    kids = {r.data.tags["mlflow.runName"] for r in runs
            if r.data.tags.get("mlflow.parentRunId") == p.info.run_id}
    assert {"read", "teacher"} <= kids
    assert "config.yaml" in {a.path for a in cl.list_artifacts(p.info.run_id)}
    # ... and straight from PostgreSQL: the rows really live there
    import psycopg2

    with psycopg2.connect(postgres_uri) as conn, conn.cursor() as cur:
        cur.execute("select count(*) from runs r join experiments e on "
                    "r.experiment_id = e.experiment_id where e.name = 'pg'")
        assert cur.fetchone()[0] == len(runs)
    # runs compare reads the same server
    assert main(["runs", "compare", "--experiment", "pg", "--tracking-uri", mlflow_server,
                 "--metric", "acc.teacher.*", "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp/compare.png").stat().st_size > 1000
