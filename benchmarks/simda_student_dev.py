"""SimDA students' optimisation checked on a labelled SOURCE dev split (target labels unused).

    python benchmarks/simda_student_dev.py [--source dvd.jsonl] [--seed 0]
        → benchmarks/results/simda-student-dev.json

The students of jobs/simda/amazon-benchmark.cpu.yaml train 54 steps at lr 5e-5 on 128 MiniLM
tokens. Is that budget what a labelled split of the *source* domain would choose? Each setting
below fits the supervised student (the source-only student's objective, the recipe's own
``fit_student`` on Ray Train, the job's batch size, workers and text truncation) on 300 labelled
source rows and scores it on 600 other labelled rows of the same file:

- the job's budget (54 steps, lr 5e-5, 128 tokens);
- twice the steps (108), twice the learning rate (1e-4), both;
- a 256-token window.

Rows: the source file's rows with a label, shuffled with --seed; the first 300 train, the next
600 are the dev split. The target domain is never read. One student seed: differences under
~0.02 (the seed std of the step-matched students) are noise. Cost: ~15 min on 2 idle cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

from raydapt.config import load_job  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"job": {}, "steps108": {"steps": 108}, "lr1e-4": {"lr": 1e-4},
            "steps108_lr1e-4": {"steps": 108, "lr": 1e-4}, "window256": {"max_length": 256}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", default=str(REPO / "jobs/simda/amazon-benchmark.cpu.yaml"))
    ap.add_argument("--source", default="dvd.jsonl", help="file under the job's data.root")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-rows", type=int, default=300)
    ap.add_argument("--dev-rows", type=int, default=600)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/simda-student-dev.json"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    import ray

    from raydapt.core.runtime import init_ray_for
    from raydapt.recipes.simda import matched_steps, student_train_kw
    from raydapt.train.student import StudentTrain, fit_student

    cfg = load_job(args.job, args.overrides)
    d = cfg.distill
    rows = pd.read_json(Path(cfg.data.root) / args.source, lines=True)
    rows = rows[rows["label"].isin(cfg.data.labels)]
    rows = rows.sample(frac=1.0, random_state=args.seed).reset_index(drop=True)
    rows["y"] = rows["label"].map({lab: i for i, lab in enumerate(cfg.data.labels)})
    n_tr, n_dev = args.train_rows, args.dev_rows
    if len(rows) < n_tr + n_dev:
        raise SystemExit(f"{args.source}: {len(rows)} labelled rows, need {n_tr + n_dev}")
    train, dev = rows.iloc[:n_tr], rows.iloc[n_tr:n_tr + n_dev]
    assert not set(train["id"]) & set(dev["id"])
    init_ray_for(cfg.ray)
    base = student_train_kw(d)  # the recipe's own student fields, steps as it counts them
    base["steps"] = base["steps"] or matched_steps(n_tr, d.batch_size, d.num_workers, d.epochs)
    report = {"benchmark": "simda-student-dev", "command": "python benchmarks/simda_student_dev.py "
              + " ".join(sys.argv[1:] if argv is None else argv), "machine": describe(),
              "job": str(Path(args.job).relative_to(REPO)) if Path(args.job).is_relative_to(REPO)
              else args.job, "source": args.source, "train_rows": n_tr, "dev_rows": n_dev,
              "seed": args.seed, "student": d.student, "settings": {}}
    storage = tempfile.mkdtemp(prefix="student-dev-")
    for name in args.settings.split(","):
        kw = {**base, **SETTINGS[name]}
        t0 = time.time()
        m = fit_student(name=f"dev-{name}-s{args.seed}", objective="supervised",
                        train_ds=ray.data.from_pandas(train[["text", "y"]]),
                        eval_df=dev[["text", "y"]], num_classes=len(cfg.data.labels),
                        student=d.student, train=StudentTrain(**kw), seed=args.seed,
                        storage=storage)
        report["settings"][name] = {
            "overrides": SETTINGS[name], "steps": kw["steps"], "lr": kw["lr"],
            "max_length": kw["max_length"], "dev_accuracy": round(float(m["accuracy"]), 4),
            "final_loss": round(float(m["loss"]), 4), "seconds": round(time.time() - t0, 1)}
        print(f"[student-dev] {name}: dev accuracy {m['accuracy']:.4f} "
              f"({time.time() - t0:.0f}s)", flush=True)
        best = max(report["settings"], key=lambda k: report["settings"][k]["dev_accuracy"])
        report["best_on_source_dev"] = best
        report["best_minus_job"] = round(report["settings"][best]["dev_accuracy"]
                                         - report["settings"].get("job", {}).get(
                                             "dev_accuracy", np.nan), 4)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(storage, ignore_errors=True)  # ~270 MB of checkpoint per fit
    return report


if __name__ == "__main__":
    main()
