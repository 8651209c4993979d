"""Process-level set-up shared by recipes: Ray start-up, seeding, quiet logs."""

from __future__ import annotations

import logging
import os
import random

import numpy as np


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch from the one config seed."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


CLUSTER_RESOURCES: tuple[str, ...] = ("annotate_gpu", "train_gpu")
"""Custom resources the cluster configs (cluster/) put on GPU node types; GPU job YAMLs request
them per actor / worker (``*.pool.resources``, ``distill.resources``) to steer stages to the
right nodes. A local instance on a GPU machine advertises each once per GPU, so the same YAMLs
run unchanged on one box."""


def _local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # pragma: no cover
        return 0


_NO_STATE_API = "Failed to query Ray Train Controller actor state"


class _DropNoStateApi(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_NO_STATE_API)


def quiet_worker_logs() -> None:
    """Ray ``worker_process_setup_hook`` of local instances (started without the dashboard, so
    without the State API): silences Ray Train's PlacementGroupCleaner warning that it cannot
    query the controller (hundreds of lines per fit; the local instance goes away with the job,
    so there is nothing for the cleaner to clean)."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner"
                      ).addFilter(_DropNoStateApi())


def init_ray(address: str | None = None, num_cpus: int | None = None,
             progress: bool = True) -> None:
    """Connect to ``address`` (or RAY_ADDRESS), else start a new local instance. Idempotent.

    Without an address we pass ``address="local"``: a bare ``ray.init()`` would silently join the
    latest cluster started by ``ray start`` on this machine (/tmp/ray/ray_current_cluster).
    """
    import ray

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not ray.is_initialized():
        kw: dict = {"logging_level": logging.WARNING, "log_to_driver": True}
        addr = address or os.environ.get("RAY_ADDRESS")
        if addr:
            kw["address"] = addr
        else:
            kw["address"] = "local"
            kw["num_cpus"] = num_cpus
            kw["include_dashboard"] = False
            # no dashboard = no State API: Ray Train's placement-group cleaner then warns once a
            # second per fit that it cannot query its controller; drop just that line
            kw["runtime_env"] = {"worker_process_setup_hook":
                                 "raydapt.core.runtime.quiet_worker_logs"}
            gpus = _local_gpus()
            if gpus:  # one machine plays every node type of cluster/
                kw["resources"] = {r: float(gpus) for r in CLUSTER_RESOURCES}
        ray.init(**kw)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.verbose_progress = False
