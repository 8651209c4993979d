"""A real ``mlflow server`` on localhost for the tracking tests, stopped by its process group;
and a throw-away PostgreSQL cluster to back it (Debian's binaries, initdb in a temp dir,
127.0.0.1 on a free port, stopped with ``pg_ctl stop`` on its own data directory)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server_at(backend_uri: str, artifacts: Path, log_path: Path, *,
                     start_timeout: float) -> Iterator[str]:
    """Start ``mlflow server`` on ``backend_uri`` (artifacts under ``artifacts``, output to
    ``log_path``), wait for ``/health`` up to ``start_timeout`` s, yield its URL; on exit stop
    the process group it started (server + its workers), nothing else."""
    port = free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--backend-store-uri", backend_uri, "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1", "--artifacts-destination", str(artifacts)],
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
                if proc.poll() is not None or time.time() - t0 > start_timeout:
                    raise RuntimeError("mlflow server did not start:\n"
                                       + log_path.read_text()[-3000:]) from None
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


def pg_bin() -> Path | None:
    """The directory of PostgreSQL's server binaries (initdb, pg_ctl), or None."""
    for cand in [shutil.which("initdb"), *sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))]:
        if cand and Path(cand).with_name("pg_ctl").exists():
            return Path(cand).resolve().parent
    return None


def postgres_missing() -> str | None:
    """Why a PostgreSQL cluster cannot be started here (None: it can)."""
    if pg_bin() is None:
        return ("PostgreSQL binaries (initdb, pg_ctl) not found: apt-get install postgresql "
                "(CI does this in .ci/run)")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2-binary is not installed (pinned in constraints.txt)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run the server"
    return None


def _as_pg_user(cmd: list[str]) -> list[str]:
    """initdb / postgres refuse to run as root: run them as the 'postgres' user then."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


@contextmanager
def postgres_at() -> Iterator[str]:
    """Start a PostgreSQL cluster with an empty ``mlflow`` database; yield its URI
    (``postgresql://postgres@127.0.0.1:PORT/mlflow``); stop it and delete it on exit. Call
    :func:`postgres_missing` first."""
    bindir = pg_bin()
    base = Path(tempfile.mkdtemp(prefix="rdpg-", dir="/tmp"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        pg = pwd.getpwnam("postgres")
        for p in (base, sock):
            os.chown(p, pg.pw_uid, pg.pw_gid)
    port = free_port()
    subprocess.run(_as_pg_user([str(bindir / "initdb"), "-D", str(data), "-U", "postgres",
                                "--auth=trust", "-E", "UTF8", "--no-sync"]),
                   check=True, capture_output=True, timeout=120)
    opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off"
    try:
        subprocess.run(_as_pg_user([str(bindir / "pg_ctl"), "-D", str(data), "-o", opts,
                                    "-l", str(base / "pg.log"), "-w", "-t", "60", "start"]),
                       check=True, capture_output=True, timeout=90)
        createdb = bindir / "createdb"
        subprocess.run([str(createdb) if createdb.exists() else "createdb", "-h", "127.0.0.1",
                        "-p", str(port), "-U", "postgres", "mlflow"],
                       check=True, capture_output=True, timeout=60)
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(_as_pg_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast",
                                    "-w", "stop"]), capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def mlflow_backend(pg_uri: str) -> str:
    """The server's backend URI for a PostgreSQL URI: SQLAlchemy 2.1 maps plain postgresql://
    to psycopg 3, so name the pinned psycopg2 driver."""
    return pg_uri.replace("postgresql://", "postgresql+psycopg2://")
