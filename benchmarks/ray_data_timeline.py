"""Per-operator progress of one Ray Data execution, read from Ray Data's own log of it
(``<ray session>/logs/ray-data/ray-data-<dataset>.log``, its DEBUG lines
``streaming_executor.py:755 -- <i>: <operator> - ... Queued blocks: N (size) ... Blocks
Outputted: k/n``), so a pass's pipeline can be seen: when each operator finished, how far ahead
of the next one it ran, how much waited in the object store. Merges an entry into
benchmarks/results/pool-scale-operators-cpu.json.

    python benchmarks/ray_data_timeline.py KEY LOG [--every 30] [--rows N]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "pool-scale-operators-cpu.json"
LINE = re.compile(r"^(\S+ \S+),\d+\s+DEBUG streaming_executor\.py:\d+ -- (\d+): (.+?) - .*?"
                  r"Queued blocks: (\d+) \(([\d.]+)([KMGT]?i?B)\).*?Blocks Outputted: (\d+)/")
UNIT = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def timeline(log: Path, every_s: float) -> dict:
    """Samples (seconds since the first line, per operator: blocks output so far, blocks and
    MiB queued at its input) at most every ``every_s`` seconds, and each operator's last
    sample."""
    t0, last_t, samples, cur, last = None, None, [], {}, {}
    for ln in log.read_text(errors="replace").splitlines():
        m = LINE.match(ln)
        if not m:
            continue
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp()
        t0 = t if t0 is None else t0
        op = m.group(3)
        rec = {"out_blocks": int(m.group(7)), "queued_blocks": int(m.group(4)),
               "queued_mib": round(float(m.group(5)) * UNIT[m.group(6)] / 2**20, 1)}
        cur[op] = rec
        last[op] = {"t_s": round(t - t0, 1), **rec}
        if last_t is None or t - last_t >= every_s:
            samples.append({"t_s": round(t - t0, 1), **{k: dict(v) for k, v in cur.items()}})
            last_t = t
    return {"log": str(log), "samples": samples, "last": last}


def phases(tl: dict, rows: int) -> dict:
    """The last operator's rate (rows/s, from its share of output blocks) before and after each
    earlier operator finished (its output count reached its final value)."""
    ops = list(tl["last"])
    final = ops[-1]
    total, t_end = tl["last"][final]["out_blocks"], tl["last"][final]["t_s"]
    out = {}
    for op in ops[1:-1]:
        done = next((s["t_s"] for s in tl["samples"]
                     if s.get(op, {}).get("out_blocks") == tl["last"][op]["out_blocks"]), None)
        if done is None or done >= t_end or not total:
            continue
        at = next(s.get(final, {}).get("out_blocks", 0) for s in tl["samples"]
                  if s["t_s"] == done)
        out[op] = {"finished_s": done, "last_op_blocks_then": at, "last_op_blocks": total,
                   "last_op_rows_per_s_before": round(at / total * rows / max(done, 1e-9), 1),
                   "last_op_rows_per_s_after": round((total - at) / total * rows
                                                     / (t_end - done), 1)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("key")
    ap.add_argument("log", type=Path)
    ap.add_argument("--every", type=float, default=30.0)
    ap.add_argument("--rows", type=int, default=0,
                    help="rows of the pass: adds the last operator's rate per phase")
    a = ap.parse_args(argv)
    doc = json.loads(RESULTS.read_text()) if RESULTS.exists() else {
        "what": "Ray Data's per-operator progress of pool_scale passes, from Ray Data's log",
        "command": "python benchmarks/ray_data_timeline.py KEY LOG", "runs": {}}
    doc["runs"][a.key] = timeline(a.log, a.every)
    if a.rows:
        doc["runs"][a.key]["phases"] = phases(timeline(a.log, 5.0), a.rows)
    RESULTS.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc["runs"][a.key]["last"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
