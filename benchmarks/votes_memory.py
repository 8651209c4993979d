"""The driver's private memory during stage 1's exact streaming votes, by allocator setting.

    python benchmarks/votes_memory.py --shards '/tmp/pool-scale/<cache>/embed/*/part-*.parquet'
        # -> benchmarks/results/votes-memory-cpu.json (appends a run)

Over the 1M-row stage-1 shards of ``pool_scale.py`` the votes (``knn_votes_streaming``, k = 300,
100 random unit domain rows) take a driver's private memory up by ~140 MiB while Arrow's live
allocations stay at ~3 MiB (docs/scale.md). This runs the same votes in a plain process (no Ray,
no model) under each allocator setting, in a fresh child process each, and records the private
(anonymous) memory before, at the peak (sampled every 50 ms) and after:

- ``default``: Arrow's mimalloc pool, glibc's dynamic mmap threshold;
- ``arrow_system_pool``: ``ARROW_DEFAULT_MEMORY_POOL=system``;
- ``glibc_fixed_mmap_threshold``: ``MALLOC_MMAP_THRESHOLD_=131072`` (freed large blocks go back
  to the kernel instead of raising the threshold and staying in the heap);
- ``both``;
- ``in_process``: no environment; the child calls ``raydapt.core.runtime.return_freed_memory``
  first, as ``init_ray`` does in a driver with ``ray.driver_returns_freed_memory`` (the
  default): the same two changes made at run time.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "votes-memory-cpu.json"
SETTINGS = {
    "default": {},
    "arrow_system_pool": {"ARROW_DEFAULT_MEMORY_POOL": "system"},
    "glibc_fixed_mmap_threshold": {"MALLOC_MMAP_THRESHOLD_": "131072"},
    "both": {"ARROW_DEFAULT_MEMORY_POOL": "system", "MALLOC_MMAP_THRESHOLD_": "131072"},
    "in_process": {},
}


def _anon_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return 0.0


def child(pattern: str, k: int, name: str) -> dict:
    if name == "in_process":
        from raydapt.core.runtime import return_freed_memory

        return_freed_memory()
    import numpy as np
    import pyarrow.parquet as pq

    from raydapt.select.votes import knn_votes_streaming

    files = sorted(glob.glob(pattern))
    width = len(pq.read_table(files[0], columns=["emb"])["emb"][0].values)
    dom = np.random.default_rng(0).standard_normal((100, width)).astype(np.float32)
    peak, stop = [0.0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _anon_mb())
            time.sleep(0.05)

    before = _anon_mb()
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.time()
    votes = knn_votes_streaming(dom, (pq.read_table(f, columns=["id", "emb", "_error", "_reject"])
                                      for f in files), k=k)
    secs = time.time() - t0
    stop.set()
    th.join()
    return {"anon_before_mb": round(before, 1), "anon_peak_mb": round(peak[0], 1),
            "anon_after_mb": round(_anon_mb(), 1), "growth_at_peak_mb": round(peak[0] - before, 1),
            "seconds": round(secs, 1), "shards": len(files), "voted_rows": len(votes),
            "votes": int(votes["votes"].sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", required=True, help="glob of the stage-1 shard files")
    ap.add_argument("--k", type=int, default=300)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.shards, args.k, args.child)))
        return
    res = {}
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = [round(x, 2) for x in os.getloadavg()]
    for name, env in SETTINGS.items():
        out = subprocess.run([sys.executable, __file__, "--shards", args.shards, "--k",
                              str(args.k), "--child", name], env={**os.environ, **env},
                             capture_output=True, text=True, check=True)
        res[name] = {"env": env, **json.loads(out.stdout.strip().splitlines()[-1])}
        print(name, res[name], flush=True)
    runs = json.loads(OUT.read_text()).get("runs", []) if OUT.exists() else []
    runs.append({"date": date, "load_average_at_start": load, "settings": res})
    OUT.write_text(json.dumps({
        "benchmark": "votes-memory-cpu",
        "command": f"python benchmarks/votes_memory.py --shards '{args.shards}' --k {args.k}",
        "note": "each run appends an entry to runs, in order; settings a run did not have are "
                "missing from it",
        "machine": describe(), "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
