"""Watching a job on the local autoscaling cluster (:mod:`raydapt.ops.local_cluster`): the node
count per type over time, where every actor ran (Ray's state API: actor -> node id -> node
type), and killing one node's raylet the way a lost machine dies.

Used by ``tests/cluster/test_rehearsal.py`` and ``benchmarks/cluster_rehearsal.py``. The caller
is connected to the cluster (``ray.init(address=state["address"])``).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from raydapt.ops import local_cluster as lc

#: Ray Data's actor class for a ``map_batches`` callable class C is ``MapWorker(MapBatches(C))``.
TEACHER_ACTOR = "MapBatches(TeacherScore)"
TRAIN_WORKER = "RayTrainWorker"


class NodeWatch:
    """Polls ``ray.nodes()`` every ``every_s`` seconds in a thread: ``timeline`` is a list of
    ``(seconds since start, {node type: alive nodes})`` (one entry per change), ``types``
    maps every node id ever seen to its node type, ``first_seen`` node id -> seconds."""

    def __init__(self, st: dict[str, Any], every_s: float = 0.5) -> None:
        self.st, self.every_s = st, every_s
        self.t0 = time.time()
        self.timeline: list[tuple[float, dict[str, int]]] = []
        self.types: dict[str, str] = {}
        self.first_seen: dict[str, float] = {}
        self.alive: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._lock = threading.Lock()

    def __enter__(self) -> NodeWatch:
        self.poll()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def poll(self) -> dict[str, int]:
        import ray

        nodes = ray.nodes()
        now = time.time() - self.t0
        with self._lock:
            for n in nodes:
                nid = n["NodeID"]
                if nid not in self.types:
                    self.types[nid] = lc.node_type_of(n, self.st)
                    self.first_seen[nid] = now
            self.alive = {n["NodeID"] for n in nodes if n.get("Alive")}
            counts = lc.nodes_by_type(self.st, nodes)
            if not self.timeline or self.timeline[-1][1] != counts:
                self.timeline.append((round(now, 2), counts))
        return counts

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.poll()
            except Exception:  # a GCS hiccup while a node dies: try again next tick
                pass

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.timeline[-1][1])

    def first_time(self, node_type: str) -> float | None:
        """Seconds from the start until the first node of ``node_type`` was alive."""
        for t, c in self.timeline:
            if c.get(node_type, 0) > 0:
                return t
        return None

    def wait_for(self, cond, timeout_s: float, what: str) -> float:
        t0 = time.time()
        while time.time() - t0 < timeout_s:
            if cond(self.counts()):
                return time.time() - self.t0
            time.sleep(0.5)
        raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}; nodes "
                           f"{self.counts()}")


def actors(st: dict[str, Any]) -> list[dict[str, Any]]:
    """Every actor the cluster has had (alive or dead): class name, node id, state, pid."""
    from ray.util.state import list_actors

    rows = list_actors(address=st["dashboard"], limit=10_000, detail=True,
                       raise_on_missing_output=False)
    return [{"class_name": a.class_name, "node_id": a.node_id, "state": a.state,
             "pid": a.pid, "actor_id": a.actor_id, "name": a.name or "",
             # what it asked for: CPU, GPU, custom (not the node:<ip> affinity markers)
             "resources": {k: v for k, v in (a.required_resources or {}).items()
                           if v and not k.startswith("node:")}}
            for a in rows]


def head_actors(st: dict[str, Any], watch: NodeWatch) -> dict[str, dict[str, float]]:
    """Actor class -> the resources it asked for, of every actor that ran on the head."""
    watch.poll()
    return {a["class_name"]: a["resources"] for a in actors(st)
            if a["node_id"] and watch.types.get(a["node_id"]) == st["head_node_type"]}


def placement(st: dict[str, Any], watch: NodeWatch) -> dict[str, Counter]:
    """Actor class -> Counter of node types it ran on (dead actors included)."""
    out: dict[str, Counter] = {}
    for a in actors(st):
        if not a["node_id"]:
            continue  # never placed (e.g. a pending actor of a pool that scaled down)
        watch.poll()
        out.setdefault(a["class_name"], Counter())[watch.types.get(a["node_id"], "?")] += 1
    return out


def failed_tasks_on(st: dict[str, Any], node_id: str, name_part: str) -> list[dict[str, Any]]:
    """Tasks (attempts) that were running on ``node_id`` and failed: the in-flight work a lost
    node took with it, which Ray retries elsewhere."""
    from ray.util.state import list_tasks

    rows = list_tasks(address=st["dashboard"], filters=[("node_id", "=", node_id)],
                      limit=10_000, detail=True, raise_on_missing_output=False)
    return [{"name": t.name, "state": t.state, "attempt": t.attempt_number,
             "task_id": t.task_id} for t in rows
            if name_part in (t.name or "") and t.state == "FAILED"]


def kill_raylet(st: dict[str, Any], node_id: str) -> int:
    """SIGKILL the raylet of one worker node of the local cluster (the node's workers and agents
    die with it, as on a lost machine). Returns the raylet's PID."""
    for p in lc.cluster_processes(st["temp_dir"]):
        try:
            cmd = p.cmdline()
        except Exception:
            continue
        if cmd and cmd[0].endswith("/raylet") and f"--node_id={node_id}" in cmd:
            p.send_signal(signal.SIGKILL)
            return p.pid
    raise RuntimeError(f"no raylet of node {node_id} among the cluster's processes")


def task_placement(st: dict[str, Any], watch: NodeWatch) -> dict[str, Counter]:
    """Task name -> Counter of node types its attempts ran on (Ray Data read / map tasks, ...;
    actor method calls excluded: :func:`placement` has their actors)."""
    from ray.util.state import list_tasks

    rows = list_tasks(address=st["dashboard"], limit=10_000, detail=True,
                      raise_on_missing_output=False)
    out: dict[str, Counter] = {}
    for t in rows:
        if not t.node_id or t.type != "NORMAL_TASK":
            continue
        out.setdefault(t.name, Counter())[watch.types.get(t.node_id, "?")] += 1
    return out


def nodes_of(st: dict[str, Any], class_name: str, state: str | None = None) -> list[str]:
    """Node ids of the actors of ``class_name`` (only those in ``state``, e.g. ALIVE)."""
    return [a["node_id"] for a in actors(st)
            if a["class_name"] == class_name and a["node_id"]
            and (state is None or a["state"] == state)]


def checkpointed(run_dir: str | Path) -> bool:
    """Whether a Ray Train fit of the job whose output is ``run_dir`` (``<output_dir>/<run
    name>``; fits under ``train/``) has reported a checkpoint: its run snapshot lists one. A
    snapshot being written counts as not yet."""
    for snap in Path(run_dir).glob("train/*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snap.read_text() or "{}").get("checkpoint_results"):
                return True
        except (OSError, ValueError):
            pass
    return False
