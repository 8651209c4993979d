"""The node types of a raydapt cluster, from the one file that holds them
(``cluster/node_types.yaml``): the cloud half (``cluster/aws.yaml`` / ``gcp.yaml`` carry it, a
test keeps them equal) and the local half (``raydapt cluster up --local``).

Here: load and check that file, build the local autoscaler config from it, and answer "which
node types can run a stage that asks for these resources" -- the check ``raydapt submit`` and
``raydapt plan`` make, so a stage asking for a resource no node type offers fails at once
instead of waiting for an autoscaler that can never add such a node.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from raydapt import RaydaptError

NODE_TYPES_PATH = Path(__file__).resolve().parents[2] / "cluster" / "node_types.yaml"

#: Ray's name for the head node type of the fake multi-node provider (fixed by Ray).
LOCAL_HEAD_TYPE = "ray.head.default"

#: Resource keys that are node settings, not something a task asks for.
NODE_SETTINGS = ("object_store_memory", "memory")


class NodeTypesError(RaydaptError):
    """A broken node-types file, or a stage no node type can run."""


@dataclass(frozen=True)
class NodeTypes:
    """One set of node types: ``{name: {"resources": {...}, "min_workers", "max_workers"}}``."""

    types: dict[str, dict[str, Any]]
    head: str
    idle_timeout_minutes: float
    where: str  # "cloud" or "local", for messages

    def offered(self, name: str) -> dict[str, float]:
        return {k: float(v) for k, v in self.types[name].get("resources", {}).items()
                if k not in NODE_SETTINGS}

    def workers(self) -> list[str]:
        return [n for n in self.types if n != self.head]

    def fitting(self, request: dict[str, float]) -> list[str]:
        """The node types on which one actor / worker asking for ``request`` fits (the head
        included when it can: a head with CPU: 0 fits no CPU request)."""
        req = {k: float(v) for k, v in request.items() if v}
        return [n for n in self.types
                if all(self.offered(n).get(k, 0.0) >= v for k, v in req.items())]

    def describe(self) -> str:
        return "; ".join(f"{n}: " + ", ".join(f"{k}={v:g}" for k, v in self.offered(n).items())
                         for n in self.types)


def load(path: str | Path = NODE_TYPES_PATH) -> dict[str, Any]:
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise NodeTypesError(f"node-types file not found: {p}") from None
    except yaml.YAMLError as exc:
        raise NodeTypesError(f"{p}: not valid YAML: {exc}") from None
    _check(raw, p)
    return raw


def _check(raw: Any, p: Path) -> None:
    if not isinstance(raw, dict) or not isinstance(raw.get("node_types"), dict):
        raise NodeTypesError(f"{p}: needs a node_types mapping")
    head = raw.get("head_node_type")
    if head not in raw["node_types"]:
        raise NodeTypesError(f"{p}: head_node_type {head!r} is not one of the node_types")
    for name, t in raw["node_types"].items():
        if not isinstance(t.get("resources"), dict):
            raise NodeTypesError(f"{p}: node type {name} has no resources mapping")
        if name != head and not 0 <= t.get("min_workers", 0) <= t.get("max_workers", -1):
            raise NodeTypesError(f"{p}: node type {name}: need 0 <= min_workers <= max_workers")
    local = raw.get("local") or {}
    for name, t in (local.get("node_types") or {}).items():
        if name not in raw["node_types"]:
            raise NodeTypesError(f"{p}: local node type {name} is not a node type")
        extra = set(t) - {"max_workers", "resources"}
        if extra:
            raise NodeTypesError(f"{p}: local node type {name} may set only max_workers and "
                                 f"resources, not {sorted(extra)}")
        cloud = set(raw["node_types"][name]["resources"])
        custom = set(t.get("resources", {})) - {"CPU", "GPU", *NODE_SETTINGS}
        if not custom <= cloud:
            raise NodeTypesError(f"{p}: local node type {name} offers {sorted(custom - cloud)}, "
                                 "which its cloud type does not")


def cloud(raw: dict[str, Any] | None = None) -> NodeTypes:
    raw = raw or load()
    return NodeTypes(copy.deepcopy(raw["node_types"]), raw["head_node_type"],
                     float(raw["idle_timeout_minutes"]), "cloud")


def local(raw: dict[str, Any] | None = None) -> NodeTypes:
    """The cloud types with the ``local`` overrides: GPU dropped (no GPU is there), min_workers
    kept, max_workers and resources as the local half says."""
    raw = raw or load()
    loc = raw.get("local") or {}
    types = {}
    for name, t in raw["node_types"].items():
        o = (loc.get("node_types") or {}).get(name, {})
        res = dict(o.get("resources", {k: v for k, v in t["resources"].items() if k != "GPU"}))
        nt = {"resources": res}
        if name != raw["head_node_type"]:
            nt["min_workers"] = t.get("min_workers", 0)
            nt["max_workers"] = o.get("max_workers", t.get("max_workers", 0))
        types[name] = nt
    return NodeTypes(types, raw["head_node_type"],
                     float(loc.get("idle_timeout_minutes", raw["idle_timeout_minutes"])), "local")


def autoscaler_config(nt: NodeTypes, gcs_address: str, *, nodes_dir: str,
                      upscaling_speed: float = 1.0) -> dict[str, Any]:
    """The autoscaler config of a local cluster: Ray's fake multi-node provider (every worker
    node a raylet on this machine, each in its own temp dir under ``nodes_dir``:
    :mod:`raydapt.ops.fake_nodes`), the node types of ``nt``. The head type is renamed to
    Ray's fixed ``ray.head.default``."""
    types: dict[str, Any] = {}
    for name, t in nt.types.items():
        if name == nt.head:
            types[LOCAL_HEAD_TYPE] = {"resources": dict(t["resources"]), "node_config": {},
                                      "max_workers": 0}
        else:
            types[name] = {"resources": dict(t["resources"]), "node_config": {},
                           "min_workers": t["min_workers"], "max_workers": t["max_workers"]}
    return {
        "cluster_name": "raydapt-local",
        "max_workers": sum(t["max_workers"] for n, t in nt.types.items() if n != nt.head),
        "upscaling_speed": upscaling_speed,
        "idle_timeout_minutes": nt.idle_timeout_minutes,
        "provider": {"type": "external",
                     "module": "raydapt.ops.fake_nodes.SeparateDirsFakeProvider",
                     "nodes_dir": nodes_dir, "gcs_address": gcs_address,
                     "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": types,
        "head_node_type": LOCAL_HEAD_TYPE,
        "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


# --------------------------------------------------------------------------------------------
# What a job asks for, and where it lands
# --------------------------------------------------------------------------------------------


def job_requests(cfg) -> dict[str, dict[str, float]]:
    """Every Ray resource request of a validated job config, by its dotted section:
    actor pools (``num_cpus`` / ``num_gpus`` / ``resources`` per actor) and Ray Train sections
    (``cpus_per_worker``, one GPU with ``use_gpu``, ``resources`` per worker)."""
    from raydapt.config import ActorPoolSection, TrainSection

    out: dict[str, dict[str, float]] = {}

    def walk(node, path: str) -> None:
        if isinstance(node, ActorPoolSection):
            out[path] = {"CPU": node.num_cpus, "GPU": node.num_gpus, **node.resources}
        elif isinstance(node, TrainSection):
            out[path] = {"CPU": node.cpus_per_worker, "GPU": 1.0 if node.use_gpu else 0.0,
                         **node.resources}
        if isinstance(node, BaseModel):
            for name in type(node).model_fields:
                walk(getattr(node, name), f"{path}.{name}" if path else name)

    walk(cfg, "")
    return {k: {r: float(v) for r, v in req.items() if v} for k, req in out.items()}


def placement(cfg, nt: NodeTypes) -> dict[str, list[str]]:
    """Section -> the node types one of its actors / workers fits on. Raises
    :class:`NodeTypesError` naming the section, the resource(s) and the node types when one
    fits nowhere (the autoscaler would wait for it forever)."""
    out, bad = {}, []
    for sec, req in job_requests(cfg).items():
        fit = nt.fitting(req)
        if not fit:
            missing = sorted(k for k, v in req.items()
                             if not any(nt.offered(n).get(k, 0.0) >= v for n in nt.types))
            what = ", ".join(f"{k}={req[k]:g}" for k in missing) or \
                ", ".join(f"{k}={v:g}" for k, v in req.items()) + " together"
            bad.append(f"{sec} asks for {what}, which no {nt.where} node type offers")
        out[sec] = fit
    if bad:
        raise NodeTypesError("; ".join(bad) + f" (node types: {nt.describe()})")
    return out
