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
        ray.init(**kw)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.verbose_progress = False
