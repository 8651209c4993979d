"""NTK-Selector downstream: held-out gold-response NLL and MC accuracy after LoRA on D ∪ S.

    python benchmarks/ntk_heldout.py [--variants ntk,random:0,random:1,random:2,domain_only,base]
        → benchmarks/results/ntk-heldout-cpu.json      (rewritten after every variant)

Setting: the ``medical`` setting of benchmarks/ntk_needles.py (same data root, cache and stages
under --work, so its warm-up, stage-1 embeddings and stage-2 scores are reused): D = 80 PubMedQA
+ 80 MedMCQA train items, pool = 1,000 FLAN + 100 GSM8K + 100 planted medical rows, N = 100 of
M = 150. Each variant is the recipe's own fine-tune (``fit_lora_cached``: LoRA on D ∪ S, Ray Train +
DeepSpeed, the CPU job's settings) and evaluation:

- ``nll``: mean per-token NLL of the gold response (PubMedQA's long answer + ``The answer is X.``)
  on all 500 PubMedQA test items (never in D — D uses PubMedQA's train split — never in the pool;
  :func:`raydapt.recipes.ntk_select.evaluate_nll`), lower is better;
- ``mc``: option-letter accuracy, calibrated accuracy and gold-option log-prob on the same 500
  items (:func:`raydapt.recipes.ntk_select.evaluate_mc`).

Variants: ``base`` (no LoRA), ``domain_only`` (LoRA on D), ``<selector>`` or
``<selector>:<seed>`` (the selection's seed for random, and the fine-tune's seed: the LoRA init and
data order). The random selector's mean ± std over its seeds is the noise the bar compares with.

Expected result (measured, benchmarks/results/ntk-heldout-cpu.json): PubMedQA NLL base 3.110,
domain-only 2.885, D + random 2.808 +- 0.006 (seeds 0-2), D + NTK 2.834 +- 0.007 (fine-tune seeds
0-2; 86 of its 100 rows are planted medical rows, most without a rationale): NTK above random, the
bar missed; on MedMCQA (--eval-task medmcqa) NTK 0.550 +- 0.028 vs random 0.670 +- 0.031, met, but
in the answer template only: with --mc, MC accuracy is at chance for every variant (NTK 0.258 +-
0.019, random 0.257 +- 0.023) and the gold option's log-prob is no better than uniform.
--without-planted (pool minus the 100 medical rows; ntk-heldout-unplanted-cpu.json): PubMedQA NLL
NTK 2.801 vs random 2.807 +- 0.008, no effect. Cost: 53 min on
2 cores at this session's (slow) speed -- warm-up cached, stage-1 embeddings 9 min, NTK scores 3
min, each fine-tune 5-6 min, each evaluation of 500 items ~4 min. --eval-task medmcqa with
data.tasks giving medmcqa eval_rows: 500 scores the other half of D on cached fine-tunes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402
from ntk_needles import REPO, RESULTS, _setting_overrides, warmup_and_stage1  # noqa: E402

from raydapt.config import load_job  # noqa: E402
from raydapt.select.planted import build_needles_data  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", default=str(REPO / "jobs/ntk_select/medical-smollm.cpu.yaml"))
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--work", default="/tmp/ntk-needles")
    ap.add_argument("--variants", default="random:0,random:1,random:2,ntk,domain_only,base,"
                    "embedding,less,ntk:1,ntk:2")
    ap.add_argument("--eval-task", default="pubmedqa")
    ap.add_argument("--without-planted", action="store_true",
                    help="the same pool without its 100 planted medical rows (1,000 FLAN + 100 "
                    "GSM8K): the 'without the planted pool' variants (use another --out)")
    ap.add_argument("--mc", action="store_true",
                    help="also MC accuracy on the same items (doubles the evaluation cost)")
    ap.add_argument("--out", default=str(RESULTS / "ntk-heldout-cpu.json"))
    ap.add_argument("--merge", action="store_true",
                    help="keep the variants of an existing --out file (same setting) and add "
                         "or replace this run's")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    from raydapt.core.cache import StageCache
    from raydapt.core.runtime import init_ray_for
    from raydapt.core.tracking import Tracker
    from raydapt.recipes.ntk_select import (
        STAGE_VERSIONS,
        encode_rows,
        evaluate_mc,
        evaluate_nll,
        fit_lora_cached,
        frame_candidate_scores,
        mc_prompts,
        nll_rows,
        read_data,
        read_pool_frame,
        tokenizer,
    )
    from raydapt.select.selectors import SELECTORS, SelectionInputs
    from raydapt.stages.common import split_errors

    work = Path(args.work)
    info = build_needles_data(args.data, work / "data")
    unplanted = []
    if args.without_planted:  # the pool file minus the planted medical rows, nothing else
        src = Path(info["root"]) / info["pool"]
        med = set(info["groups"]["medical"])
        dst = src.with_name("pool-unplanted.jsonl")
        dst.write_text("".join(line + "\n" for line in src.read_text().splitlines()
                               if line.strip() and json.loads(line)["id"] not in med))
        unplanted = [f"data.pool=[{dst.relative_to(info['root'])}]"]
    ov = _setting_overrides("medical", info, work) + [
        "data.tasks=[{path: medical/pubmedqa.jsonl, name: pubmedqa, domain_rows: 80, "
        "eval_rows: null}, {path: medical/medmcqa.jsonl, name: medmcqa, domain_rows: 80, "
        "eval_rows: 1}]", *unplanted, *args.overrides]
    cfg = load_job(args.job, ov)
    init_ray_for(cfg.ray)
    cache = StageCache(cfg.run.cache_dir, versions=STAGE_VERSIONS)
    tracker = Tracker(enabled=False, uri=cfg.tracking.uri, experiment="heldout",
                      artifact_location=cfg.tracking.artifact_location)
    out = Path(cfg.run.output_dir) / cfg.run.name
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    data = read_data(cfg)
    data["pool"], _ = read_pool_frame(cfg)  # a small planted pool: in memory
    tok = tokenizer(cfg.model)
    dom, _ = encode_rows(data["domain"], tok, cfg)
    pool, _ = encode_rows(data["pool"], tok, cfg)
    test = data["tests"][args.eval_task]
    prompts = mc_prompts(test, tok, cfg)
    nrows, nrej = nll_rows(test, tok, cfg)
    planted = set(info["groups"]["medical"])
    assert not (set(test["id"]) & (set(dom["id"]) | set(pool["id"])))  # held out
    assert not (args.without_planted and planted & set(pool["id"]))

    s = cfg.select
    n, m = s.sizes(len(dom), len(pool))  # the recipe's N and M
    inputs = SelectionInputs(pool_ids=pool["id"].to_numpy())
    stages: dict = {}

    def stage1() -> None:  # warm-up + stage 1, only when a selector needs them (not random)
        if "cand" not in stages:
            stages["warm"], stages["cand"] = warmup_and_stage1(
                cfg, cache, tracker, dom=dom, pool=pool, inputs=inputs, out=out)

    by_id = pool.set_index("id")
    report = {"benchmark": "ntk-heldout", "command": "python benchmarks/ntk_heldout.py "
              + " ".join(sys.argv[1:] if argv is None else argv), "machine": describe(),
              "overrides": ov, "eval_task": args.eval_task, "mc": args.mc,
              "sizes": {"D": len(dom), "pool": len(pool), "M": m, "N": n,
                        "eval_items": len(test), "nll_items": len(nrows),
                        "nll_encode_rejects": len(nrej)},
              "variants": {}}
    if args.merge and Path(args.out).exists():
        prev = json.loads(Path(args.out).read_text())
        same = ("eval_task", "sizes", "overrides")
        if any(prev.get(k) != report[k] for k in same):
            raise SystemExit(f"--merge: {args.out} was measured on another setting "
                             f"({', '.join(k for k in same if prev.get(k) != report[k])} differ)")
        report["variants"] = dict(prev["variants"])
        report["earlier_runs"] = [*prev.get("earlier_runs", []), {
            "command": prev["command"], "machine": prev["machine"],
            "variants": list(prev["variants"])}]
    for v in args.variants.split(","):
        name, _, seed = v.partition(":")
        seed = int(seed) if seed else cfg.run.seed
        t0 = time.time()
        rec: dict = {"selector": name, "seed": seed}
        if name == "base":
            adapter = None
        else:
            fcfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"seed": seed})})
            rows = dom
            if name != "domain_only":
                if name != "random":
                    stage1()
                if name in ("ntk", "less") and name not in inputs.scores:
                    sc, _ = split_errors(frame_candidate_scores(
                        cfg, cache, tracker, adapter=stages["warm"], dom=dom,
                        cand=stages["cand"], kind=name), f"scores-{name}")
                    inputs.scores[name] = sc.set_index("id")["score"]
                sel = SELECTORS[name](seed=seed).select(inputs, n)
                rec["planted_selected"] = int(sel["id"].isin(planted).sum())
                rows = pd.concat([dom, by_id.loc[sel["id"]].reset_index()], ignore_index=True)
            adapter = fit_lora_cached(fcfg, cache, tracker, stage="lora", label=f"finetune-{v}", rows=rows,
                           train=cfg.finetune, storage=out / "train")
            rec["train_rows"] = len(rows)
        rec["nll"], _ = evaluate_nll(cfg, cache, tracker, label=v, adapter=adapter, rows=nrows)
        acc = {}
        if args.mc:
            acc, extra, _ = evaluate_mc(cfg, cache, tracker, label=v, adapter=adapter,
                                        prompts=prompts)
            rec["accuracy"] = acc
            rec.update(extra)
        rec["seconds"] = time.time() - t0
        report["variants"][v] = rec
        print(f"[heldout] {v}: nll {rec['nll']['mean']:.4f} acc {acc.get('mean', float('nan')):.3f}"
              f" ({rec['seconds']:.0f}s)", flush=True)
        summarise(report)
        report["seconds"] = time.time() - t_all
        Path(args.out).write_text(json.dumps(report, indent=2))
    return report


def summarise(report: dict) -> None:
    """Per selector: mean ± std (ddof 1) of the held-out NLL and accuracy over its seeds."""
    by: dict[str, list[dict]] = {}
    for rec in report["variants"].values():
        by.setdefault(rec["selector"], []).append(rec)
    summ = {}
    for name, recs in by.items():
        nll = [r["nll"]["mean"] for r in recs]
        acc = [r["accuracy"]["mean"] for r in recs if "accuracy" in r]  # only with --mc
        summ[name] = {"seeds": [r["seed"] for r in recs], "nll_mean": float(np.mean(nll)),
                      "nll_std": float(np.std(nll, ddof=1)) if len(nll) > 1 else None,
                      "acc_mean": float(np.mean(acc)) if acc else None,
                      "acc_std": float(np.std(acc, ddof=1)) if len(acc) > 1 else None}
    report["summary"] = summ
    r, k = summ.get("random"), summ.get("ntk")
    if r and k and r["nll_std"] is not None:
        report["bar_nll"] = {"ntk_minus_random": k["nll_mean"] - r["nll_mean"],
                             "random_seed_std": r["nll_std"],
                             "passed": (r["nll_mean"] - k["nll_mean"]) > r["nll_std"]}


if __name__ == "__main__":
    main()
