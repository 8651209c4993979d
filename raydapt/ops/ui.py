"""``raydapt ui [JOB.yaml] [--tracking-uri URI] [--experiment NAME] [--port 5000]``: the MLflow
UI on a job's store, opened where the user needs it.

A local store (sqlite, file) is served by ``mlflow ui`` started here (its own process group,
stopped with Ctrl-C / SIGTERM); an http(s) tracking server is its own UI. Either way the links
printed go straight to the runs (``workflowType=machine_learning``: MLflow 3 would open the
experiment's empty GenAI overview), to the job's parent run (every method's accuracy in its
metrics table) and to the compare view of its method runs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from raydapt import RaydaptError
from raydapt.core.secrets import environ_snapshot
from raydapt.core.tracking import UI_PORT, absolute_tracking_uri, job_links, ui_base_url


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve(uri: str, *, host: str = "127.0.0.1", port: int = UI_PORT,
          start_timeout: float = 180.0) -> tuple[subprocess.Popen, str]:
    """Start ``mlflow ui`` on a local store; return the process and its base URL once its
    ``/health`` answers. Raises RaydaptError if it does not start."""
    if port == 0 or not _port_free(host, port):  # 0: any free port
        new = _free_port(host)
        if port:
            print(f"raydapt: port {port} is in use; serving on {new}", file=sys.stderr)
        port = new
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "ui", "--backend-store-uri",
           uri, "--host", host, "--port", str(port), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            env={**environ_snapshot(), "MLFLOW_ENABLE_TELEMETRY": "false"})
    base = f"http://{host}:{port}"
    t0 = time.time()
    while True:
        try:
            urllib.request.urlopen(f"{base}/health", timeout=2).close()
            return proc, base
        except Exception:
            if proc.poll() is not None or time.time() - t0 > start_timeout:
                stop(proc)
                err = (proc.stderr.read() if proc.stderr else "")[-1500:]
                raise RaydaptError(f"mlflow ui did not start on {base}: {err.strip()}") from None
            time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    """Stop the UI's process group (the server and its workers), nothing else."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


def ui(uri: str, experiment: str | None, run_name: str | None = None, *,
       host: str = "127.0.0.1", port: int = UI_PORT, wait: bool = True) -> dict[str, str]:
    """Serve (unless ``uri`` is a server) and print the links; block until Ctrl-C / SIGTERM
    when ``wait``. Returns the links."""
    uri = absolute_tracking_uri(uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise RaydaptError(f"no MLflow store at {uri} (run a job first, or pass "
                           "--tracking-uri / a job file)")
    proc = None
    base = ui_base_url(uri, port, host)
    if not uri.startswith(("http://", "https://")):
        proc, base = serve(uri, host=host, port=port)
    try:
        links = job_links(uri, experiment, run_name, base=base) if experiment else {}
        if experiment and not links:
            from mlflow.tracking import MlflowClient

            names = sorted(e.name for e in MlflowClient(tracking_uri=uri).search_experiments())
            raise RaydaptError(f"no experiment {experiment!r} in {uri}; experiments: {names}")
        print(f"MLflow UI: {base}" + (f" (serving {uri}; Ctrl-C stops it)" if proc else ""))
        job = "this job" if run_name else "the newest job"
        for k, label in (("runs", "runs"), ("job", f"{job} (accuracy per method)"),
                         ("compare", "methods side by side")):
            if k in links:
                print(f"  {label}: {links[k]}")
        sys.stdout.flush()
        if proc is not None and wait:
            proc.wait()
        return links
    finally:
        if proc is not None:
            stop(proc)
