"""SimDA at CPU scale on several Amazon transfer pairs: target-test accuracy of every teacher
read-out and student, written to benchmarks/results/simda-cpu.json with the machine described.

    python benchmarks/simda_cpu.py --pairs books:kitchen dvd:electronics [key=value ...]

Each pair runs the CPU job (jobs/simda/amazon-books-to-kitchen.cpu.yaml by default) with the
source/target paths overridden; ~15 min per pair on 2 cores. The headline comparison is the
distilled student (student:kl_sim) against the source-only student, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

from raydapt.cli import main  # noqa: E402
from raydapt.config import load_job  # noqa: E402


def run(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", default="jobs/simda/amazon-books-to-kitchen.cpu.yaml")
    ap.add_argument("--pairs", nargs="+", default=["books:kitchen", "dvd:electronics"])
    ap.add_argument("--out", default="benchmarks/results/simda-cpu.json")
    ap.add_argument("--collect", action="store_true",
                    help="do not run: collect the pairs' existing results.json files")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    pairs = {}
    for pair in args.pairs:
        src, tgt = pair.split(":")
        ov = [f"data.source.path={src}.jsonl", f"data.target.path={tgt}.jsonl",
              f"run.name={src}-to-{tgt}", *args.overrides]
        cfg = load_job(args.job, ov)
        t0 = time.time()
        if not args.collect and main(["run", args.job, *ov]) != 0:
            raise SystemExit(f"job failed for {pair}")
        res = json.loads((Path(cfg.run.output_dir) / cfg.run.name / "results.json").read_text())
        if not args.collect:
            res["wall_seconds"] = round(time.time() - t0, 1)
        pairs[f"{src}->{tgt}"] = res
        print(json.dumps({pair: res["accuracy"]}, indent=1), flush=True)
    acc = {p: r["accuracy"] for p, r in pairs.items()}
    gain = {p: round(a["student:kl_sim"] - a["student:source_only"], 4) for p, a in acc.items()
            if "student:kl_sim" in a and "student:source_only" in a}
    report = {"benchmark": "simda-cpu", "job": args.job, "overrides": args.overrides,
              "machine": describe(), "kl_sim_minus_source_only": gain, "pairs": pairs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}; kl_sim - source_only: {gain}")
    return report


if __name__ == "__main__":
    run()
