"""A real ``mlflow server`` on localhost for the tracking tests, stopped by its process group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
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
