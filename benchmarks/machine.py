"""Describe the machine a benchmark ran on (written into every results file)."""

from __future__ import annotations

import os
import platform


def describe() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem_gb,
            "python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        pass
    return info


def matmul_peak(dtype: str = "float32", threads: int | None = None, n: int = 1024,
                reps: int = 20) -> float:
    """Measured matrix-multiply rate in FLOP/s: the best of ``reps`` [n, n] @ [n, n] products
    (the best, not the mean, so that other load on a shared machine counts as little as it can)
    with torch in ``dtype`` on ``threads`` threads."""
    import time

    import torch

    if threads:
        torch.set_num_threads(threads)
    dt = getattr(torch, dtype)
    a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
    torch.matmul(a, b)  # warm-up (oneDNN kernel choice)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best
