"""Time the README's main job from an empty stage cache and record what it printed.

    python benchmarks/main_job.py [--job jobs/simda/amazon-books-to-kitchen.cpu.yaml]
        → benchmarks/results/main-job-cpu.json

Runs ``raydapt run JOB run.cache_dir=<fresh> run.output_dir=<fresh>`` as a separate process (the
packaged models are already unpacked by scripts/setup.sh, as after the README's first command),
and records its wall time, its peak RSS (the driver and every process under it, sampled each
second), the load average before and after (other work on the machine makes the time no timing),
the machine, and the job's results.json accuracies. The README's ≤ 12 min budget is checked
against this file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, matmul_peak  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "main-job-cpu.json"


def _tree_rss(p: psutil.Process) -> int:
    total = 0
    for q in [p, *p.children(recursive=True)]:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", default="jobs/simda/amazon-books-to-kitchen.cpu.yaml")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="main-job-"))
    cmd = [str(Path(sys.executable).with_name("raydapt")), "run", args.job,
           f"run.cache_dir={work}/cache", f"run.output_dir={work}/runs",
           f"tracking.uri=sqlite:///{work}/mlruns.db", f"tracking.artifact_location={work}/art"]
    load0 = [round(x, 2) for x in os.getloadavg()]
    t0 = time.time()
    log = work / "console.log"
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        ps, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            peak = max(peak, _tree_rss(ps))
            time.sleep(1)
    wall = time.time() - t0
    text = log.read_text(errors="replace")
    res_files = list((work / "runs").glob("*/results.json"))
    report = {
        "benchmark": "main-job-cpu", "command": "raydapt run " + " ".join(cmd[2:]),
        "job": args.job, "rc": proc.returncode, "wall_seconds": round(wall, 1),
        "peak_rss_tree_gib": round(peak / 2**30, 2), "load_average_before": load0,
        "load_average_after": [round(x, 2) for x in os.getloadavg()], "machine": describe(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "console_lines": len(text.splitlines()), "console_tail": text.splitlines()[-25:],
        "accuracy": json.loads(res_files[0].read_text())["accuracy"] if res_files else None}
    # the machine's yardstick, measured after the job (machines of one name differ 1.75x here)
    report["fp32_matmul"] = matmul_peak("float32", threads=2)
    # earlier runs stay in the file, newest first, so a README claim keeps its source
    if args.out.exists():
        prev = json.loads(args.out.read_text())
        report["earlier_runs"] = [{k: v for k, v in prev.items() if k != "earlier_runs"},
                                  *prev.get("earlier_runs", [])]
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("rc", "wall_seconds", "peak_rss_tree_gib",
                                             "load_average_before")}))
    return report


if __name__ == "__main__":
    main()
