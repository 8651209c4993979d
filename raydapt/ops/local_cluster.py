"""A multi-node, autoscaling Ray cluster on this machine: ``raydapt cluster up --local`` /
``raydapt cluster down``.

What runs: a head node (``ray start --head``, ``CPU: 0``: the GCS, the dashboard / job server,
the job drivers) started with ``--autoscaling-config``, so Ray's **real autoscaler** (the v1
``monitor`` process) runs next to it with Ray's fake multi-node provider
(``ray.autoscaler._private.fake_multi_node``). Every worker node the autoscaler adds is a real
raylet (plus its agents and workers) on this machine with the resources its node type declares
in ``cluster/node_types.yaml`` (``local`` half): CPU workers, annotation workers offering
``annotate_gpu``, training workers offering ``train_gpu``. Idle nodes are removed after the
local idle timeout. Custom resources work without a GPU, so a job YAML that steers its stages
with them runs unchanged.

This is what ``ray.cluster_utils.AutoscalingCluster`` does, without its two problems here: it
runs ``ray stop --force`` (which kills every Ray on the machine, other users' included) and
reads an ``example.yaml`` the Ray 2.60 wheel does not ship. We start the head on free ports,
with its own ``--temp-dir``, and tear down only the processes that name that directory (head,
autoscaler, every worker node's raylet and workers, job drivers), by PID.

The state file (default ``~/.raydapt/local-cluster.json``, or ``RAYDAPT_LOCAL_CLUSTER``) records
the addresses and the temp dir, so ``down`` finds everything ``up`` started.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from raydapt import RaydaptError
from raydapt.core.secrets import environ_snapshot
from raydapt.ops import node_types as nt_mod

STATE_ENV = "RAYDAPT_LOCAL_CLUSTER"


def default_state_path() -> Path:
    return Path(os.environ.get(STATE_ENV) or Path.home() / ".raydapt" / "local-cluster.json")


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _ray_bin() -> Path:
    ray = Path(sys.executable).with_name("ray")
    if not ray.exists():
        found = shutil.which("ray")
        if not found:
            raise RaydaptError(f"no ray CLI next to {sys.executable} or on PATH")
        ray = Path(found)
    return ray


def _token_available() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    p = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(p).is_file() if p else (Path.home() / ".ray" / "auth_token").is_file()


def read_state(path: str | Path | None = None) -> dict[str, Any] | None:
    p = Path(path) if path else default_state_path()
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise RaydaptError(f"{p}: not a local-cluster state file ({exc})") from None


def up(*, state: str | Path | None = None, node_types_file: str | Path | None = None,
       heartbeat_timeout_s: int = 10, timeout_s: float = 450.0, quiet: bool = False,
       attempts: int = 5) -> dict[str, Any]:
    """Start the head and the autoscaler; returns (and writes) the state: ``address`` (the GCS,
    for ``ray.init``), ``dashboard`` (the job server, for ``raydapt submit``), ``temp_dir``,
    ``node_types`` (the local node types as started)."""
    state_path = Path(state) if state else default_state_path()
    old = read_state(state_path)
    if old and _alive(old):
        raise RaydaptError(f"a local cluster is already up ({old['dashboard']}, state "
                           f"{state_path}): `raydapt cluster down` first")
    raw = nt_mod.load(node_types_file) if node_types_file else nt_mod.load()
    local = nt_mod.local(raw)
    ray_bin = _ray_bin()
    if not _token_available():  # `ray start` with token auth needs a token to exist
        subprocess.run([str(ray_bin), "get-auth-token", "--generate"], check=True,
                       capture_output=True, timeout=60)
    last = ""
    for attempt in range(1, attempts + 1):
        st = _start_head(local, ray_bin, state_path, heartbeat_timeout_s, timeout_s)
        try:
            r = subprocess.run(st.pop("_cmd"), env=st.pop("_env"), capture_output=True,
                               text=True, timeout=timeout_s)
            if r.returncode == 0:
                _wait_ready(st["dashboard"], timeout_s)
                break
            last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["?"]
            last = last[0]
        except subprocess.TimeoutExpired:
            last = f"ray start took over {timeout_s:.0f}s"
        except BaseException:
            down(state=state_path, quiet=True)
            raise
        last += _raylet_fatal(st["temp_dir"])
        # Ray waits a fixed time for a starting raylet (and the raylet for its dashboard
        # agent): an overloaded machine can miss it. Clean up this try completely and start
        # again on fresh ports.
        down(state=state_path, quiet=True)
        if attempt == attempts:
            raise RaydaptError(f"ray start failed {attempts} times; last: {last}")
        print(f"raydapt: ray start failed ({last[:200]}); retrying", file=sys.stderr)
    if not quiet:
        print(render(st))
    return st


def _start_head(local, ray_bin: Path, state_path: Path, heartbeat_timeout_s: int,
                timeout_s: float) -> dict[str, Any]:
    """Pick a temp dir and free ports, write the autoscaler config and the state file; returns
    the state with the ``ray start --head`` command (``_cmd``) and environment (``_env``)."""
    temp_dir = tempfile.mkdtemp(prefix="rdc-", dir="/tmp")  # short: unix socket paths
    gcs, dash, client, agent, agent_grpc, renv, metrics, nm, om = free_ports(9)
    picked = {gcs, dash, client, agent, agent_grpc, renv, metrics, nm, om}
    lo = 10000 + (os.getpid() % 100) * 100  # the head's worker ports, clear of the picked ones
    while any(lo <= p < lo + 100 for p in picked):
        lo += 100
    gcs_address = f"127.0.0.1:{gcs}"
    cfg = nt_mod.autoscaler_config(local, gcs_address, nodes_dir=f"{temp_dir}/nodes")
    cfg_path = Path(temp_dir) / "autoscaler.json"
    cfg_path.write_text(json.dumps(cfg, indent=1))
    head_res = dict(local.types[local.head]["resources"])
    cpus = head_res.pop("CPU", 0)
    gpus = head_res.pop("GPU", 0)
    osm = head_res.pop("object_store_memory", None)
    env = {**environ_snapshot(), "PATH": f"{ray_bin.parent}:{os.environ.get('PATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_FAKE_CLUSTER": "1",
           "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           # a loaded machine: give a starting node's agents longer to report their ports
           "RAY_agent_register_timeout_ms": "300000",
           "AUTOSCALER_HEARTBEAT_TIMEOUT_S": str(heartbeat_timeout_s)}
    # Every process of the cluster (raylets, the autoscaler, the worker nodes it starts, their
    # workers) knows the cluster's address: the head's raylet names the GCS 127.0.0.1:<port>
    # and a worker node's 192.0.2.x:<port>, so Ray code that looks for "the" local cluster
    # from a worker (Ray Train's PlacementGroupCleaner, through the state API) found two and
    # died, leaving a dead fit's placement group in place after a training node was lost
    env["RAY_ADDRESS"] = gcs_address
    # `ray start`, with a longer wait for the head's raylet to register (raydapt.ops.fake_nodes)
    cmd = [sys.executable, "-m", "raydapt.ops.fake_nodes", "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
           "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(renv),
           "--metrics-export-port", str(metrics), "--node-manager-port", str(nm),
           "--object-manager-port", str(om), "--min-worker-port", str(lo),
           "--max-worker-port", str(lo + 99), "--temp-dir", temp_dir,
           "--num-cpus", str(cpus), "--num-gpus", str(gpus),
           "--autoscaling-config", str(cfg_path), "--disable-usage-stats"]
    if osm:
        cmd += ["--object-store-memory", str(int(osm))]
    if head_res:
        cmd += ["--resources", json.dumps(head_res)]
    st = {"address": gcs_address, "dashboard": f"http://127.0.0.1:{dash}",
          "temp_dir": temp_dir, "autoscaler_config": str(cfg_path),
          "node_types": local.types, "head_node_type": local.head,
          "idle_timeout_minutes": local.idle_timeout_minutes, "started": time.time(),
          "state_file": str(state_path)}
    state_path.parent.mkdir(parents=True, exist_ok=True)
    state_path.write_text(json.dumps(st, indent=1))  # before start: `down` can clean a half-up one
    return {**st, "_cmd": cmd, "_env": env}


def _raylet_fatal(temp_dir: str) -> str:
    """The head raylet's fatal log line, if it died (Ray's own reason, e.g. its dashboard agent
    not reporting its port within Ray's fixed wait on an overloaded machine)."""
    for f in sorted(Path(temp_dir).glob("session_*/logs/raylet.out")):
        for line in f.read_text(errors="replace").splitlines():
            if " C " in line[:40] and "Check failed" in line:
                return " [raylet: " + line.split("Check failed:", 1)[1].strip()[:200] + "]"
    return ""


def render(st: dict[str, Any]) -> str:
    types = nt_mod.NodeTypes(st["node_types"], st["head_node_type"],
                             st["idle_timeout_minutes"], "local")
    lines = [f"local autoscaling Ray cluster up (temp dir {st['temp_dir']})",
             f"  address:   {st['address']}        (ray.init / RAY_ADDRESS for `raydapt run`)",
             f"  dashboard: {st['dashboard']}  (job server: raydapt submit JOB.yaml "
             f"--address {st['dashboard']})",
             f"  node types ({st['idle_timeout_minutes'] * 60:g} s idle timeout):"]
    for n, t in st["node_types"].items():
        rng = "1" if n == st["head_node_type"] else f"{t['min_workers']}..{t['max_workers']}"
        res = ", ".join(f"{k}={v:g}" for k, v in types.offered(n).items())
        lines.append(f"    {n:<14}{rng:>6}  {res}")
    lines.append("  clients: export RAY_AUTH_MODE=token (Ray token auth; the token is "
                 "~/.ray/auth_token)")
    lines.append(f"  state: {st['state_file']}; stop with `raydapt cluster down`")
    return "\n".join(lines)


def _wait_ready(address: str, timeout_s: float) -> None:
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
    raise RaydaptError(f"the job server at {address} did not come up in {timeout_s:.0f}s")


def cluster_processes(temp_dir: str) -> list:
    """Every process of the cluster whose temp dir is ``temp_dir`` (its command line names it),
    and their children: head daemons, the autoscaler, each worker node's raylet, agents and
    workers, job drivers."""
    import psutil

    procs: dict[int, Any] = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in a for a in (p.info["cmdline"] or [])):
                procs[p.pid] = p
                for c in p.children(recursive=True):
                    procs[c.pid] = c
        except psutil.Error:
            continue
    procs.pop(os.getpid(), None)
    return list(procs.values())


def _alive(st: dict[str, Any]) -> bool:
    return bool(cluster_processes(st["temp_dir"]))


def down(*, state: str | Path | None = None, grace_s: float = 5.0, quiet: bool = False,
         keep_temp: bool = False) -> list[int]:
    """Stop every process of the local cluster by PID (SIGTERM, then SIGKILL), remove its temp
    dir and the state file; returns the PIDs. Never ``ray stop`` (it would stop every Ray on
    the machine)."""
    import psutil

    state_path = Path(state) if state else default_state_path()
    st = read_state(state_path)
    if st is None:
        if not quiet:
            print(f"no local cluster (no state file {state_path})")
        return []
    pids: set[int] = set()
    for _ in range(3):  # a dying monitor can still be starting a node: sweep until none is left
        procs = cluster_processes(st["temp_dir"])
        if not procs:
            break
        for p in procs:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=grace_s)
        pids |= {p.pid for p in procs}
    if not keep_temp:
        shutil.rmtree(st["temp_dir"], ignore_errors=True)
    state_path.unlink(missing_ok=True)
    if not quiet:
        print(f"local cluster down: {len(pids)} processes stopped, {st['temp_dir']} removed")
    return sorted(pids)


# --------------------------------------------------------------------------------------------
# Watching it: nodes per type (the GCS's view; each node reports its type name)
# --------------------------------------------------------------------------------------------


def node_type_of(node: dict[str, Any], st: dict[str, Any]) -> str:
    """The node type of a ``ray.nodes()`` entry: the type whose custom resources it offers (the
    head offers none and is the one with CPU 0 at the GCS's address)."""
    res = node.get("Resources", {})
    for n in st["node_types"]:
        custom = set(st["node_types"][n]["resources"]) - {"CPU", "GPU", *nt_mod.NODE_SETTINGS}
        if custom and custom <= set(res):
            return n
    if node.get("IsHeadNode") or res.get("CPU", 0) == 0:
        return st["head_node_type"]
    return "cpu" if "cpu" in st["node_types"] else "?"


def nodes_by_type(st: dict[str, Any], nodes: list[dict[str, Any]]) -> dict[str, int]:
    out = {n: 0 for n in st["node_types"]}
    for node in nodes:
        if node.get("Alive"):
            out[node_type_of(node, st)] += 1
    return out
