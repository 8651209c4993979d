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
            gpus = _local_gpus()
            if gpus:  # one machine plays every node type of cluster/
                kw["resources"] = {r: float(gpus) for r in CLUSTER_RESOURCES}
        ray.init(**kw)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.verbose_progress = False
