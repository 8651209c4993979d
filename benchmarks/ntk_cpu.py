"""NTK-Selector at CPU scale: accuracy on the medical tasks for base, domain-only, random,
embedding, LESS and NTK selection (one job run, shared warm-up and stage-1 outputs), with the
selection sizes and the per-sample-gradient throughput ratio, written to
benchmarks/results/ntk-cpu.json with the machine described.

    python benchmarks/ntk_cpu.py [key=value ...]          # runs jobs/ntk_select/medical-smollm.cpu.yaml
    python benchmarks/ntk_cpu.py --collect                 # re-collect an existing run's results.json
                                                           # (also a partial one: complete=false)

The throughput part is read from benchmarks/results/ntk-scoring-cpu.json (written by
benchmarks/ntk_scoring.py: batched per-sample gradients vs a batch-size-1 loop).
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

RESULTS = Path(__file__).resolve().parent / "results"


def run(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", default="jobs/ntk_select/medical-smollm.cpu.yaml")
    ap.add_argument("--out", default=str(RESULTS / "ntk-cpu.json"))
    ap.add_argument("--collect", action="store_true", help="do not run; collect results.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cfg = load_job(args.job, args.overrides)
    t0 = time.time()
    if not args.collect and main(["run", args.job, *args.overrides]) != 0:
        raise SystemExit("job failed")
    out_dir = Path(cfg.run.output_dir) / cfg.run.name
    res = json.loads((out_dir / "results.json").read_text())
    acc = res["accuracy"]
    if "majority_letter_from_D" not in res:  # results.json of an older recipe: recompute (no model)
        from raydapt.recipes.ntk_select import majority_letter_accuracy, read_data

        data = read_data(cfg)
        res["majority_letter_from_D"] = majority_letter_accuracy(data["domain"], data["tests"])
    ref = acc.get("random", {}).get("mean")
    vs_random = {k: round(v["mean"] - ref, 4) for k, v in acc.items() if ref is not None}
    scoring = RESULTS / "ntk-scoring-cpu.json"
    thr = json.loads(scoring.read_text()) if scoring.exists() else {}
    report = {
        "benchmark": "ntk-cpu", "job": args.job, "overrides": args.overrides,
        "machine": describe(), "model": res["model"], "complete": res.get("complete", True),
        "sizes": res["sizes"],
        "accuracy": acc, "mean_minus_random": vs_random,
        "accuracy_calibrated": res.get("accuracy_calibrated"),
        "gold_option_logprob": res.get("gold_option_logprob"),
        "majority_letter_from_D": res["majority_letter_from_D"],
        **selection_agreement(out_dir),
        "selected_sources": res["selected_sources"],
        "wall_seconds": None if args.collect else round(time.time() - t0, 1),
        "job_seconds": res["seconds"], "stage_seconds": res["stage_seconds"],
        "scoring_throughput": {k: thr.get(k) for k in (
            "methods", "ratio_batched_over_loop", "ratio_grad_only", "lora_params_P",
            "projection", "samples_timed") if k in thr},
        "scoring_throughput_file": str(scoring.relative_to(RESULTS.parent.parent)),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(acc, indent=1))
    print(f"wrote {args.out}")
    return report


def selection_agreement(out_dir: Path) -> dict:
    """How much the selectors agree: |S_a ∩ S_b| for every pair of selections, and Spearman's ρ
    between the stage-2 scores (ntk, less) and the stage-1 votes on the M candidates."""
    import pandas as pd

    sel = {p.stem.removeprefix("selected_"): set(pd.read_parquet(p)["id"])
           for p in sorted(out_dir.glob("selected_*.parquet"))}
    names = sorted(sel)
    overlap = {f"{a}&{b}": len(sel[a] & sel[b]) for i, a in enumerate(names)
               for b in names[i + 1:]}
    cols = {p.stem.removeprefix("scores_"): pd.read_parquet(p).set_index("id")["score"]
            for p in sorted(out_dir.glob("scores_*.parquet"))}
    votes = out_dir / "stage1_votes.parquet"
    if cols and votes.exists():
        cols["votes"] = pd.read_parquet(votes).set_index("id")["votes"]
    rho: dict[str, float] = {}
    if len(cols) > 1:
        frame = pd.DataFrame(cols).dropna()  # the M candidates: the rows every column scored
        corr = frame.corr(method="spearman")
        keys = list(frame.columns)
        rho = {f"{a}~{b}": round(float(corr.loc[a, b]), 3) for i, a in enumerate(keys)
               for b in keys[i + 1:]}
    return {"selection_overlap": overlap, "score_spearman": rho}


if __name__ == "__main__":
    run()
