"""Same numbers before and after the NTK recipe moved onto the streaming path (issue 25):
run a job with the code of one checkout, then compare two runs' outputs. Writes
benchmarks/results/ntk-stream-same.json (one entry per compared pair, merged into the file).

    git -C . archive <base commit> | tar -x -C /tmp/base          # the code before
    # the e2e test's tiny job (tests/recipes/test_ntk_select_recipe.py), with each code
    PYTHONPATH=/tmp/base python benchmarks/ntk_stream_same.py tiny /tmp/cmp/tiny-before
    PYTHONPATH=$PWD      python benchmarks/ntk_stream_same.py tiny /tmp/cmp/tiny-after
    # the main CPU job's steps up to selection (no fine-tunes / evaluations), reduced sizes,
    # one cache for both (the warm-up and domain gradients are shared: their keys are unchanged)
    PYTHONPATH=/tmp/base python benchmarks/ntk_stream_same.py select /tmp/cmp/sel-before
    PYTHONPATH=$PWD      python benchmarks/ntk_stream_same.py select /tmp/cmp/sel-after
    python benchmarks/ntk_stream_same.py compare tiny /tmp/cmp/tiny-before /tmp/cmp/tiny-after
    python benchmarks/ntk_stream_same.py compare select /tmp/cmp/sel-before /tmp/cmp/sel-after

Run from the checkout whose code is measured (the script imports ``raydapt`` from PYTHONPATH).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "ntk-stream-same.json"
SELECT_OVERRIDES = [
    "data.max_pool_rows=400", "select.n=24",
    "data.tasks=[{path: medical/pubmedqa.jsonl, name: pubmedqa, domain_rows: 20, eval_rows: 10},"
    " {path: medical/medmcqa.jsonl, name: medmcqa, domain_rows: 20, eval_rows: 10}]"]


def tiny(out: Path) -> None:
    """The e2e test's job (same data, tiny model, config), outputs kept under ``out``."""
    sys.path.insert(0, os.getcwd())
    from raydapt.config import validate_job
    from raydapt.core.runtime import init_ray
    from tests.recipes.test_ntk_select_recipe import _data, _tiny_model

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _data(out / "data")
    model = _tiny_model(out / "tiny")
    pool_sec = {"concurrency": 1, "num_cpus": 0.5, "batch_size": 4, "threads": 1}
    train = {"num_workers": 2, "cpus_per_worker": 0.5, "threads": 1, "epochs": 1,
             "batch_size": 8, "lr": 1e-3, "zero_stage": 2}
    cfg = validate_job({
        "method": "ntk_select",
        "run": {"name": "tiny", "output_dir": str(out / "runs"), "cache_dir": str(out / "cache")},
        "tracking": {"uri": f"sqlite:///{out}/mlruns.db", "artifact_location": str(out / "art"),
                     "experiment": "ntk-test"},
        "data": {"root": str(out / "data"), "pool": ["pool/toy.jsonl"],
                 "tasks": [{"path": "med/toyqa.jsonl", "name": "toyqa", "domain_rows": 8,
                            "eval_rows": None}]},
        "model": str(model), "format": {"max_length": 64}, "lora": {"r": 2, "alpha": 4},
        "warmup": train, "finetune": train,
        "select": {"selectors": ["ntk"], "baselines": ["domain_only"], "n": 4, "m_factor": 2,
                   "k": 4, "proj_dim": 64, "proj_chunk_rows": 256, "shard_rows": 3,
                   "embed_pool": pool_sec, "grad_pool": pool_sec},
        "eval": {"max_length": 96, "pool": pool_sec, "nll": True}})
    init_ray(num_cpus=2, progress=False)
    from raydapt.recipes import ntk_select

    ntk_select.run(cfg)


def select(out: Path, cache: str, overrides: list[str]) -> None:
    """jobs/ntk_select/medical-smollm.cpu.yaml up to selection: read, warm-up, stage 1, the
    stage-2 scores and all four selections (the recipe's own steps), no fine-tune."""
    from raydapt.config import load_job
    from raydapt.job import job_context
    from raydapt.recipes.ntk_select import NTKSelectRecipe

    cfg = load_job(ROOT / "jobs/ntk_select/medical-smollm.cpu.yaml", [
        "ray.progress=false", f"run.output_dir={out}", f"run.cache_dir={cache}",
        f"tracking.uri=sqlite:///{out}.db", f"tracking.artifact_location={out}-art",
        *overrides])
    with job_context(cfg, ray=True, stage_versions=NTKSelectRecipe.STAGE_VERSIONS) as ctx:
        r = NTKSelectRecipe(cfg, ctx)
        r.read()
        r.warmup()
        r.stage1()
        sel = {}
        for name in cfg.select.selectors:
            if name in ("ntk", "less"):
                r.scores_for(name)
            sel[name] = list(r.select(name)["id"])
        sizes = {"pool": len(getattr(r, "pool_ids", getattr(r, "pool", []))), "N": r.n,
                 "M": getattr(r, "n_cand", None) or len(getattr(r, "cand", [])),
                 "counts": r.counts}
        (r.out / "sel.json").write_text(json.dumps({"selected": sel, "sizes": sizes,
                                                    "overrides": overrides}, indent=1))


def compare(kind: str, a: Path, b: Path) -> dict:
    import numpy as np
    import pandas as pd

    da = a / "runs" / "tiny" if kind == "tiny" else a / "medical-smollm"
    db = b / "runs" / "tiny" if kind == "tiny" else b / "medical-smollm"
    res: dict = {"before": str(a), "after": str(b)}
    if kind == "tiny":
        ra, rb = (json.loads((d / "results.json").read_text()) for d in (da, db))
        keys = sorted(k for k in set(ra) | set(rb) if k not in ("seconds", "stage_seconds",
                                                                 "model"))
        res["results_json_same"] = {k: ra.get(k) == rb.get(k) for k in keys}
        res["results_json"] = {k: rb.get(k) for k in ("accuracy", "response_nll", "sizes",
                                                       "counts", "rejects")}
        pa_, pb_ = (pd.read_parquet(d / "predictions.parquet") for d in (da, db))
        res["predictions_same"] = bool(pa_[["variant", "id", "pred"]].equals(
            pb_[["variant", "id", "pred"]]))
        names = sorted(p.stem.removeprefix("selected_") for p in da.glob("selected_*.parquet"))
        sel_a = {n: list(pd.read_parquet(da / f"selected_{n}.parquet")["id"]) for n in names}
        sel_b = {n: list(pd.read_parquet(db / f"selected_{n}.parquet")["id"]) for n in names}
    else:
        ja, jb = (json.loads((d / "sel.json").read_text()) for d in (da, db))
        res["overrides"] = ja.get("overrides", SELECT_OVERRIDES)
        res["sizes_same"] = ja["sizes"] == jb["sizes"]
        res["sizes"] = jb["sizes"]
        sel_a, sel_b = ja["selected"], jb["selected"]
    res["selected_ids_same_in_order"] = {n: sel_a[n] == sel_b[n] for n in sel_a}
    res["selected_n"] = {n: len(v) for n, v in sel_b.items()}
    for f, col in (("stage1_votes", "votes"), ("scores_ntk", "score"), ("scores_less", "score")):
        if not (da / f"{f}.parquet").exists():
            continue
        x, y = pd.read_parquet(da / f"{f}.parquet"), pd.read_parquet(db / f"{f}.parquet")
        same_ids = list(x["id"]) == list(y["id"])
        entry = {"rows": [len(x), len(y)], "ids_same_in_order": same_ids}
        if same_ids:
            entry[f"{col}_exactly_equal"] = bool((x[col].to_numpy() == y[col].to_numpy()).all())
            entry[f"{col}_max_rel_diff"] = float(np.max(np.abs(x[col] - y[col]) / np.maximum(
                np.abs(x[col]), 1e-12)))
            if col == "votes":
                entry["vote_sim_max_abs_diff"] = float(np.max(np.abs(x["vote_sim"]
                                                                      - y["vote_sim"])))
        res[f] = entry
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=["tiny", "select", "compare"])
    ap.add_argument("args", nargs="+")
    ap.add_argument("--cache", default="/tmp/ntk-stream-same-cache")
    a = ap.parse_args(argv)
    if a.action == "tiny":
        tiny(Path(a.args[0]))
    elif a.action == "select":
        select(Path(a.args[0]), a.cache, a.args[1:] or SELECT_OVERRIDES)
    else:
        kind, before, after = a.args
        r = compare(kind, Path(before), Path(after))
        print(json.dumps(r, indent=1))
        doc = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        doc[kind] = r
        doc["command"] = "python benchmarks/ntk_stream_same.py ... (see its docstring)"
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
