"""DALLMi at CPU scale: target-test mAP on PubMed female at 50 / 30 / 10 % of labels kept, mean ±
std over seeds, for every method; written to benchmarks/results/dallmi-cpu.json.

    python benchmarks/dallmi_cpu.py [--seeds 0 1 2] [--ratios 0.5 0.3 0.1] [key=value ...]

Runs the recipe (``raydapt.recipes.dallmi.run``) on jobs/dallmi/pubmed-male-to-female.cpu.yaml
with the training loop in-process (``source.in_process=true adapt.in_process=true``: the same
loop function as on Ray Train, without the 30-45 s TorchTrainer start per fit). Compute is
shared: the source model is trained once per seed (cached), and no_adapt / bce_oracle / aad do
not depend on the ratio, so they run only at the first ratio. A finished (seed, ratio) job is
not rerun (its results.json is reused), so an interrupted grid resumes; the JSON is rewritten
after every job, so partial grids are reported as such.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

from raydapt.config import load_job  # noqa: E402
from raydapt.recipes import dallmi  # noqa: E402

RATIO_FREE = ["no_adapt", "bce_oracle", "aad"]
PER_RATIO = ["bce_partial", "dallmi", "dallmi_log"]


def _aggregate(runs: dict, ratios: list[float]) -> dict:
    """{method: {ratio: {mean, std, n, per_seed}}} for every metric."""
    table: dict = {}
    for metric in ("map", "map_bin", "micro_f1", "macro_f1"):
        t: dict = {}
        for method in RATIO_FREE + PER_RATIO:
            for r in ratios:
                vals = []
                for key, res in runs.items():
                    seed, ratio = key.split("/")
                    src = res if method in PER_RATIO else runs.get(f"{seed}/{ratios[0]}", {})
                    if method in PER_RATIO and float(ratio) != r:
                        continue
                    if method not in PER_RATIO and float(ratio) != ratios[0]:
                        continue
                    if method in src.get("methods", {}):
                        vals.append(src["methods"][method][metric])
                if vals:
                    t.setdefault(method, {})[str(r)] = {
                        "mean": round(float(np.mean(vals)), 4),
                        "std": round(float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, 4),
                        "n": len(vals), "per_seed": [round(v, 4) for v in vals]}
        table[metric] = t
    return table


def _write(args, base: list[str], runs: dict, t_all: float) -> dict:
    report = {"benchmark": "dallmi-cpu", "job": args.job, "overrides": base,
              "seeds": args.seeds, "ratios": args.ratios, "machine": describe(),
              "complete": len(runs) == len(args.seeds) * len(args.ratios),
              "wall_seconds": round(time.time() - t_all, 1),
              "table": _aggregate(runs, args.ratios),
              "runs": {k: {m: {kk: vv for kk, vv in v.items() if kk != "history"}
                           for m, v in r["methods"].items()} | {
                               "counts": r["counts"], "source": r["source"],
                               "seconds": r["seconds"],
                               "target_train_observed": r["target_train_observed"],
                               "target_train_positives": r["target_train_positives"]}
                       for k, r in runs.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def run(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", default="jobs/dallmi/pubmed-male-to-female.cpu.yaml")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.3, 0.1])
    ap.add_argument("--out", default="benchmarks/results/dallmi-cpu.json")
    ap.add_argument("--runs-dir", default="runs/dallmi-bench")
    ap.add_argument("--per-ratio-methods", nargs="+", default=PER_RATIO,
                    help="methods run at every ratio (a subset when compute is short)")
    ap.add_argument("--ratio-free-methods", nargs="*", default=RATIO_FREE,
                    help="methods run once per seed, at the first ratio")
    ap.add_argument("--reuse-any", action="store_true",
                    help="reuse every finished (seed, ratio) job whatever methods it ran")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    base = ["source.in_process=true", "adapt.in_process=true", "source.num_workers=1",
            "adapt.num_workers=1", "tracking.experiment=dallmi-bench",
            f"run.output_dir={args.runs_dir}", *args.overrides]
    runs: dict = {}
    t_all = time.time()
    for seed in args.seeds:
        for i, ratio in enumerate(args.ratios):
            methods = (args.ratio_free_methods if i == 0 else []) + args.per_ratio_methods
            name = f"seed{seed}-keep{int(round(ratio * 100))}"
            ov = [*base, f"run.seed={seed}", f"hide.keep_ratio={ratio}", f"run.name={name}",
                  f"methods=[{', '.join(methods)}]"]
            cfg = load_job(args.job, ov)
            res_path = Path(cfg.run.output_dir) / name / "results.json"
            if res_path.exists():
                res = json.loads(res_path.read_text())
                if set(methods) <= set(res.get("methods", {})) or args.reuse_any:
                    print(f"{name}: reusing {res_path}", flush=True)
                    runs[f"{seed}/{ratio}"] = res
                    continue
            print(f"=== {name}: {methods}", flush=True)
            runs[f"{seed}/{ratio}"] = dallmi.run(cfg)
            _write(args, base, runs, t_all)
    report = _write(args, base, runs, t_all)
    t = report["table"]["map"]
    print("mAP (mean ± std over seeds) at keep ratio " + " / ".join(map(str, args.ratios)))
    for m, row in t.items():
        print(f"  {m:<12} " + "  ".join(
            f"{row[str(r)]['mean']:.3f}±{row[str(r)]['std']:.3f}" if str(r) in row else "   -   "
            for r in args.ratios))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    run()
