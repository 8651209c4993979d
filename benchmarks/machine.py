"""Describe the machine a benchmark ran on (written into every results file)."""

from __future__ import annotations

import os
import platform


def describe() -> dict:
    cpu = platform.processor() or ""
    # "AMD EPYC" alone names machines 1.75x apart in this workplace (main-job-cpu.json): keep
    # the family / model and the vector extensions that decide the matmul peak
    fields: dict[str, str] = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, val = line.partition(":")
            fields.setdefault(key.strip(), val.strip())
            if "flags" in fields:  # x86 lists name, family and model before flags
                break
    except OSError:
        pass
    cpu = fields.get("model name", cpu)
    detail = {k: fields[k] for k in ("cpu family", "model") if k in fields}
    if detail:
        flags = set(fields.get("flags", "").split())
        detail["vector"] = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
                                    if f in flags) or "none of avx2/avx512/amx"
    mem_gb = None
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    info = {"cpu": cpu, **({"cpu_detail": detail} if detail else {}),
            "cores": os.cpu_count(), "memory_gib": mem_gb,
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


def matmul_peak(dtype: str = "float32", *, n: int = 2048, repeats: int = 6,
                threads: int | None = None) -> dict:
    """Measured matrix-multiply throughput of this machine: ``repeats`` timed [n, n] @ [n, n]
    products in ``dtype`` with torch (2·n³ FLOPs each), as GFLOP/s: ``gflops_best`` (the best,
    not the mean: on a shared machine it is the closest to what the cores can do),
    ``gflops_median``, and ``gflops_cpu_est`` (FLOP per CPU-second of this process times the
    threads: the idle-machine rate estimated on a shared machine, assuming the threads scale).
    """
    import resource
    import time

    import torch

    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dt)
    b = torch.randn(n, n, generator=g).to(dt)
    torch.mm(a, b)  # warm-up (allocator, kernel selection)

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    times, c0 = [], cpu()
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    c = cpu() - c0
    flops = 2.0 * n ** 3
    return {"dtype": dtype, "n": n, "threads": threads,
            "gflops_best": flops / min(times) / 1e9,
            "gflops_median": flops / sorted(times)[len(times) // 2] / 1e9,
            "gflops_cpu_est": flops * repeats / (c / threads) / 1e9}
