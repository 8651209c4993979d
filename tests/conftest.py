"""Shared fixtures: one local Ray instance per session, offline hub, data location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RAYDAPT_DATA", REPO.parent / "shared" / "data"))


def pytest_collection_modifyitems(config, items):
    """``ray`` on every test that uses the ``ray_local`` fixture; ``gpu`` tests skip without CUDA."""
    import torch

    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance shared by every test that needs one (start-up costs ~7 s)."""
    import ray

    from raydapt.core.runtime import init_ray

    init_ray(num_cpus=2, progress=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA / "amazon" / "books.jsonl").exists():
        pytest.skip(f"research data not found at {DATA} (set RAYDAPT_DATA)")
    return DATA
