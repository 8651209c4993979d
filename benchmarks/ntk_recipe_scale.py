"""The NTK-Selector recipe end to end on 10K and 100K-row pools (issue 25): `raydapt run` as a user
runs it, on the pool files of ``pool_scale.py`` and the tiny random Llama built there, with the
driver's memory read from outside. Writes benchmarks/results/ntk-recipe-scale-cpu.json.

    python benchmarks/pool_scale.py build --sizes 10000,100000     # the pools (scratch, not git)
    python benchmarks/ntk_recipe_scale.py --sizes 10000,100000

``pool_scale.py`` measures the recipe's streamed passes one by one; this runs the whole job
(read, warm-up LoRA fit, stage 1 embed + votes + top-M, stage 2 NTK scores, selection, the
fine-tunes on D + S through Ray Train + DeepSpeed, evaluation, MLflow), so the stages between
the passes (pool index, candidates, fine-tune rows) are at scale too. The job is
``jobs/ntk_select/medical-smollm.cpu.yaml`` with: the tiny model (2 layers, width 128, random
init: the platform's cost, not matmuls), the whole pool (no subsample), N = 1 % of the pool
capped at 500 and M = 2 N, rows cut to 64 tokens, ``ntk`` and ``random`` selections, one
domain-only baseline, 40 test items a task, and ``ray.data_object_store_mb: 128``. Accuracy of
a random-init model is chance and is not the point; sizes, counts, time and memory are.

Recorded per size: wall seconds, the recipe's own stage seconds (results.json), the driver's
RSS peak and its private (anonymous) and shared (object-store pages) parts, sampled every
0.5 s from /proc/<pid>/status, and the sizes and reject counts the recipe reports.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402
from pool_scale import DATA, _proc_rss, build, build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "ntk-recipe-scale-cpu.json"
BASE_JOB = ROOT / "jobs" / "ntk_select" / "medical-smollm.cpu.yaml"


def job_for(scratch: Path, size: int, mdir: str, store_mb: int) -> Path:
    cfg = yaml.safe_load(BASE_JOB.read_text())
    n = min(500, max(10, size // 100))
    work = scratch / f"recipe-{size}"
    cfg["run"] = {"name": f"pool-{size}", "seed": 0, "output_dir": str(work / "runs"),
                  "cache_dir": str(work / "cache")}
    cfg["tracking"] = {"uri": f"sqlite:///{work}/mlruns.db",
                       "artifact_location": str(work / "art"), "experiment": "ntk-recipe-scale"}
    cfg["ray"] = {"num_cpus": 2, "progress": False, "data_object_store_mb": store_mb}
    cfg["model"] = mdir
    cfg["data"].update({"root": str(DATA), "max_pool_rows": None,
                        "pool": [str(build(scratch, size) / "files")]})
    for t in cfg["data"]["tasks"]:
        t["eval_rows"] = 40
    cfg["format"]["max_length"] = 64
    cfg["lora"]["r"] = 8
    cfg["select"].update({"selectors": ["ntk", "random"], "baselines": ["domain_only"],
                          "n": n, "m_factor": 2.0, "k": 64, "proj_dim": 512,
                          "shard_rows": 256})
    cfg["eval"]["max_length"] = 128
    work.mkdir(parents=True, exist_ok=True)
    path = work / "job.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_job(job: Path, log: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "raydapt.cli", "run", str(job)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    peak = {"driver_rss_mb": 0.0, "driver_rss_anon_mb": 0.0, "driver_rss_shmem_mb": 0.0}
    series: list[list[float]] = []
    stop = threading.Event()

    def sample() -> None:
        last = -10.0
        while not stop.is_set():
            try:
                m = _proc_rss(proc.pid)
            except OSError:
                break
            for key in peak:
                peak[key] = max(peak[key], m.get(key, 0.0))
            s = time.time() - t0
            if s - last >= 10:
                series.append([round(s, 1), *(round(m.get(k, 0.0), 1) for k in peak)])
                last = s
            time.sleep(0.5)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    rc = proc.wait()
    stop.set()
    th.join()
    return {"rc": rc, "wall_s": round(time.time() - t0, 1),
            **{f"{k}_peak": round(v, 1) for k, v in peak.items()},
            "driver_series": {"columns": ["s", "rss_mb", "rss_anon_mb", "rss_shmem_mb"],
                              "every_s": 10, "rows": series}}


def record_run(job: Path, size: int, name: str) -> tuple[dict[str, Any], str]:
    """``raydapt run job`` (its log beside it) with the driver's memory sampled: a results
    entry (size, job, date, load averages, :func:`run_job`'s figures) and the console text.
    A failed run prints its log's tail and exits."""
    log = job.parent / "run.log"
    print(f"[{name}] {size} rows: raydapt run {job} (log {log})", flush=True)
    entry: dict[str, Any] = {"size": size, "job": yaml.safe_load(job.read_text()),
                             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                             "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    entry.update(run_job(job, log))
    entry["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    text = log.read_text()
    if entry["rc"] != 0:
        print(text[-4000:])
        raise SystemExit(f"the {size}-row job failed (rc {entry['rc']}); log {log}")
    return entry, text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--scratch", default="/tmp/pool-scale")
    ap.add_argument("--store-budget-mb", type=int, default=128)
    args = ap.parse_args()
    scratch = Path(args.scratch)
    mdir, _ = build_model(scratch)
    out = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": {}}
    out.update({"benchmark": "ntk-recipe-scale-cpu", "machine": describe(),
                "command": "python benchmarks/ntk_recipe_scale.py --sizes " + args.sizes})
    for size in map(int, args.sizes.split(",")):
        job = job_for(scratch, size, mdir, args.store_budget_mb)
        entry, _ = record_run(job, size, "ntk_recipe_scale")
        res = json.loads((job.parent / "runs" / f"pool-{size}" / "results.json").read_text())
        entry.update({k: res.get(k) for k in ("sizes", "counts", "stage_seconds", "seconds",
                                               "complete", "rejects")})
        entry["rows_per_s_stage1"] = round(size / res["stage_seconds"]["stage1"], 1)
        out["runs"][str(size)] = entry
        RESULTS.write_text(json.dumps(out, indent=1) + "\n")
        print(f"[ntk_recipe_scale] {size}: {entry['wall_s']} s, driver RSS peak "
              f"{entry['driver_rss_mb_peak']} MiB (private {entry['driver_rss_anon_mb_peak']}), "
              f"stage 1 {entry['rows_per_s_stage1']} rows/s, sizes {entry['sizes']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
