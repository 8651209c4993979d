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
                reps: int = 20) -> dict:
    """Measured matrix-multiply rate of [n, n] @ [n, n] products with torch in ``dtype`` on
    ``threads`` threads: ``gflops_wall`` (best of ``reps`` calls) and ``gflops_cpu_est`` (FLOP
    per CPU-second of this process times ``threads``: the idle-machine rate estimated on a
    shared machine, assuming the threads scale)."""
    import resource
    import time

    import torch

    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    dt = getattr(torch, dtype)
    a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
    torch.matmul(a, b)  # warm-up (oneDNN kernel choice)

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    best, c0 = float("inf"), cpu()
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    c = cpu() - c0
    flop = 2 * n**3
    return {"gflops_wall": round(flop / best / 1e9, 1),
            "gflops_cpu_est": round(flop * reps / (c / threads) / 1e9, 1)}
