"""A private Ray head for submission tests: ``ray start --head`` on 127.0.0.1 with free ports
and its own --temp-dir, so no other Ray on the machine joins it (or is joined) by accident.

Teardown stops ONLY this cluster: every process whose command line names our temp dir, and their
children, by PID (SIGTERM, then SIGKILL). A bare ``ray stop`` would kill every Ray on the host.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from raydapt.ops.local_cluster import free_ports


def stop_cluster(temp_dir: str, grace_s: float = 5.0) -> list[int]:
    """Terminate the processes of the cluster whose --temp-dir is ``temp_dir``; returns PIDs."""
    import psutil

    procs: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in a for a in (p.info["cmdline"] or [])):
                procs[p.pid] = p
                for c in p.children(recursive=True):
                    procs[c.pid] = c
        except psutil.Error:
            continue
    procs.pop(os.getpid(), None)
    for p in procs.values():
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    return sorted(procs)


@pytest.fixture(scope="session")
def ray_head():
    """Start a private head node; yields its job-server address (http://127.0.0.1:PORT)."""
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists():
        pytest.skip(f"no ray CLI next to {sys.executable}")
    # `ray start --head` with token auth needs an existing token (unlike ray.init(), it does
    # not create one): make the default one on a fresh machine, as a first ray.init() would.
    from raydapt.ops.submit import _token_available

    if not _token_available():
        subprocess.run([str(ray_bin), "get-auth-token", "--generate"], check=True,
                       capture_output=True, timeout=60)
    # short path: Ray's unix sockets live under it (108-byte limit)
    temp_dir = tempfile.mkdtemp(prefix="rdsub-", dir="/tmp")
    gcs, dash, client, agent, agent_grpc, renv, metrics, nm, om = free_ports(9)
    # worker ports: 100 below the kernel's ephemeral range (where free_ports() and every other
    # component port come from), stepping past any picked port so no two components collide
    picked = {gcs, dash, client, agent, agent_grpc, renv, metrics, nm, om}
    lo = 10000 + (os.getpid() % 100) * 100
    while any(lo <= p < lo + 100 for p in picked):
        lo += 100
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(ray_bin), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
           "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(renv),
           "--metrics-export-port", str(metrics), "--node-manager-port", str(nm),
           "--object-manager-port", str(om), "--min-worker-port", str(lo),
           "--max-worker-port", str(lo + 99), "--temp-dir", temp_dir, "--num-cpus", "2",
           "--object-store-memory", str(300 * 1024**2), "--disable-usage-stats"]
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            pytest.fail(f"ray start failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        address = f"http://127.0.0.1:{dash}"
        _wait_ready(address)
        yield address
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_ready(address: str, timeout_s: float = 60) -> None:
    import urllib.error
    import urllib.request

    t0 = time.time()
    while time.time() - t0 < timeout_s:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:  # 401 without a token: the server is up
            return
        except Exception:
            time.sleep(0.5)
    raise TimeoutError(f"the job server at {address} did not come up in {timeout_s}s")
