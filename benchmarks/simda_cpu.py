"""SimDA at CPU scale on Amazon transfer pairs: target-test accuracy of every teacher read-out
and student, with the source-only and KL + sim students over several student seeds, written to
benchmarks/results/simda-cpu.json with the machine described.

    python benchmarks/simda_cpu.py [--pairs books:kitchen dvd:electronics kitchen:books \
        electronics:dvd] [--full-pairs books:kitchen dvd:electronics] [--seeds 0 1 2] \
        [key=value ...]

Each pair runs the benchmark job (jobs/simda/amazon-benchmark.cpu.yaml, student seed = first of
--seeds): a --full-pairs pair with every teacher row and student, the others with the zero-shot
and kNN rows and the source-only and KL + sim students only (to fit the four pairs in about an
hour and a quarter on 2 cores). Then only the source-only and KL + sim students are rerun for the
other seeds (distill.seed; same split and cached teacher outputs, so a rerun costs two student
fits). Pairs run in the order given and the file is rewritten after each, so an
interrupted benchmark keeps the pairs it finished. The headline is kl_sim - source_only, mean ±
std over the seeds, per pair and over the pairs.

    python benchmarks/simda_cpu.py --ceiling [--collect]

adds ``student_ceiling`` to an existing --out file, for the pairs where the SimDA student stays
under its pseudo-labels (kitchen -> books, dvd -> electronics): the target-oracle student (gold
labels of the same 300 target rows, the same 54 steps) over the seeds -- what any labelling of
those rows can give this student -- and seed 0 of source-only / KL + sim / oracle with a
256-token student window (distill.max_length=256) instead of 128. ~25 min on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

from raydapt.cli import main  # noqa: E402
from raydapt.config import load_job  # noqa: E402

PAIRS = ["books:kitchen", "dvd:electronics", "kitchen:books", "electronics:dvd"]
SEEDED = ["source_only", "kl_sim"]
CEILING_PAIRS = ["kitchen:books", "dvd:electronics"]
LIGHT = "annotate.baselines=[zero_shot,knn]"


def _ms(xs: list[float]) -> dict:
    a = np.asarray(xs, dtype=float)
    return {"mean": round(float(a.mean()), 4), "std": round(float(a.std(ddof=1)), 4)
            if len(a) > 1 else None, "n": len(a), "values": [round(float(x), 4) for x in a]}


def _run(job: str, ov: list[str], collect: bool) -> dict:
    cfg = load_job(job, ov)
    if not collect and main(["run", job, *ov]) != 0:
        raise SystemExit(f"job failed: {job} {ov}")
    return json.loads((Path(cfg.run.output_dir) / cfg.run.name / "results.json").read_text())


def run(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", default="jobs/simda/amazon-benchmark.cpu.yaml")
    ap.add_argument("--pairs", nargs="+", default=PAIRS)
    ap.add_argument("--full-pairs", nargs="*", default=PAIRS[:2],
                    help="pairs that also get the ICL teacher rows and the KL / CE / oracle "
                    "students")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", default="benchmarks/results/simda-cpu.json")
    ap.add_argument("--tag", default="",
                    help="suffix of every run name (e.g. -head_tail for a variant run beside the "
                    "main one, with its overrides)")
    ap.add_argument("--collect", action="store_true",
                    help="do not run: collect the runs' existing results.json files")
    ap.add_argument("--ceiling", action="store_true",
                    help="add the student_ceiling section to --out (oracle seeds, 256 window)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    if args.ceiling:
        return ceiling(args)
    pairs: dict[str, dict] = {}
    report: dict = {"benchmark": "simda-cpu", "job": args.job, "overrides": args.overrides,
                    "seeds": args.seeds, "machine": describe(), "pairs": pairs}
    for pair in args.pairs:
        src, tgt = pair.split(":")
        base = [f"data.source.path={src}.jsonl", f"data.target.path={tgt}.jsonl",
                f"run.name={src}-to-{tgt}{args.tag}", *args.overrides]
        t0 = time.time()
        light = [] if pair in args.full_pairs else [
            f"distill.variants=[{','.join(SEEDED)}]", "annotate.baselines=[zero_shot,knn]"]
        res = _run(args.job, [*base, *light, f"distill.seed={args.seeds[0]}"], args.collect)
        seeded = {v: [res["accuracy"][f"student:{v}"]] for v in SEEDED
                  if f"student:{v}" in res["accuracy"]}
        for s in args.seeds[1:]:
            r = _run(args.job, [*base, f"run.name={src}-to-{tgt}{args.tag}-s{s}", f"distill.seed={s}",
                                f"distill.variants=[{','.join(seeded)}]",
                                "annotate.baselines=[zero_shot,knn]"], args.collect)
            for v in seeded:
                seeded[v].append(r["accuracy"][f"student:{v}"])
        entry = {**res, "student_seeds": {v: _ms(x) for v, x in seeded.items()}}
        if len(seeded) == 2:
            entry["kl_sim_minus_source_only"] = _ms(
                [a - b for a, b in zip(seeded["kl_sim"], seeded["source_only"])])
        if not args.collect:
            entry["wall_seconds"] = round(time.time() - t0, 1)
        pairs[f"{src}->{tgt}"] = entry
        gains = [p["kl_sim_minus_source_only"]["mean"] for p in pairs.values()
                 if "kl_sim_minus_source_only" in p]
        report["kl_sim_minus_source_only_mean_over_pairs"] = (
            round(float(np.mean(gains)), 4) if gains else None)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps({pair: {"accuracy": res["accuracy"],
                                 "seeds": entry["student_seeds"]}}, indent=1), flush=True)
    print(f"wrote {args.out}")
    return report


def ceiling(args) -> dict:
    """``student_ceiling`` of --out: per pair, the oracle student over --seeds (seed 0 from the
    pair's own run) against the pair's pseudo-labels and seeded students, and seed 0 of three
    students with a 256-token window."""
    report = json.loads(Path(args.out).read_text())
    out: dict = {"command": "python benchmarks/simda_cpu.py --ceiling", "machine": describe(),
                 "pairs": {}}
    for pair in CEILING_PAIRS:
        src, tgt = pair.split(":")
        name, entry = f"{src}-to-{tgt}", report["pairs"][f"{src}->{tgt}"]
        base = [f"data.source.path={src}.jsonl", f"data.target.path={tgt}.jsonl", LIGHT,
                *args.overrides]
        oracle = [entry["accuracy"]["student:oracle"]]
        for s in args.seeds[1:]:
            r = _run(args.job, [*base, f"run.name={name}-oracle-s{s}", f"distill.seed={s}",
                                "distill.variants=[oracle]"], args.collect)
            oracle.append(r["accuracy"]["student:oracle"])
        w = _run(args.job, [*base, f"run.name={name}-w256", "distill.max_length=256",
                            "distill.variants=[source_only,kl_sim,oracle]"], args.collect)
        seeds = entry["student_seeds"]
        out["pairs"][f"{src}->{tgt}"] = {
            "pseudo_label_accuracy": entry["pseudo_label_accuracy"],
            "oracle_seeds": _ms(oracle),
            "oracle_minus_source_only": _ms(
                [a - b for a, b in zip(oracle, seeds["source_only"]["values"])]),
            "oracle_minus_kl_sim": _ms([a - b for a, b in zip(oracle, seeds["kl_sim"]["values"])]),
            "window_128_seed0": {v: entry["accuracy"][f"student:{v}"]
                                 for v in ("source_only", "kl_sim", "oracle")},
            "window_256_seed0": {v: w["accuracy"][f"student:{v}"]
                                 for v in ("source_only", "kl_sim", "oracle")},
            "commands": [f"raydapt run {args.job} {shlex.join(base)} run.name={name}-oracle-sS "
                         "distill.seed=S 'distill.variants=[oracle]' (S = "
                         f"{', '.join(map(str, args.seeds[1:]))})",
                         f"raydapt run {args.job} {shlex.join(base)} run.name={name}-w256 "
                         "distill.max_length=256 'distill.variants=[source_only,kl_sim,oracle]'"]}
        report["student_ceiling"] = out
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(out["pairs"], indent=1))
    return report


if __name__ == "__main__":
    run()
