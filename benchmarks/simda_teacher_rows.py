"""Teacher read-out rows from a finished (cached) SimDA teacher stage, computed in-process with
the recipe's own functions (no Ray): zero-shot raw / median / domain_mean, kNN, p_T, pseudo-label
accuracy, and the source-only (leave-one-out) selection of k, tau, lam.
usage: python benchmarks/simda_teacher_rows.py CACHE_DIR/teacher/<key> job.yaml [overrides...]
(the same job and overrides as the run that filled the cache)."""
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from raydapt.config import load_job
from raydapt.data.readers import split_and_subsample
from raydapt.stages.annotate import calibrator, knn_distribution, mix, select_on_source
from raydapt.stages.teacher import build_index, loo_neighbours

d, job, ov = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
cfg = load_job(job, ov)
labels = cfg.data.labels


def read(path):
    df = pd.read_json(Path(cfg.data.root) / path, lines=True)
    df = df.rename(columns={"label": "lab"})
    df["id"] = df["id"].astype(str)
    df["y"] = df["lab"].map({lab: i for i, lab in enumerate(labels)})
    return df[["id", "text", "y"]].drop_duplicates("id")


src, tgt = read(cfg.data.source.path), read(cfg.data.target.path)
source, _ = split_and_subsample(src, seed=cfg.run.seed, max_rows=cfg.data.max_source_rows)
tr, te = split_and_subsample(tgt, seed=cfg.run.seed, test_fraction=cfg.data.target_test_fraction,
                             max_rows=cfg.data.max_target_train_rows,
                             max_test_rows=cfg.data.max_target_test_rows)
sc = pd.concat([pd.read_parquet(f) for f in sorted(d.glob("part-*.parquet"))]).set_index("id")
assert set(source["id"]) | set(tr["id"]) | set(te["id"]) <= set(sc.index), "ids differ"


def p_llm(ids):
    z = np.stack(sc.loc[ids, "llm_logp"].to_numpy()).astype(np.float64)
    z -= z.max(1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


H = lambda ids: np.stack(sc.loc[ids, "hidden"].to_numpy()).astype(np.float32)  # noqa: E731
a = cfg.annotate
idx = build_index(H(source["id"]))
ys = source["y"].to_numpy()
out = {"rows": {"source": len(source), "target_train": len(tr), "target_test": len(te)}}
p_tr, p_te = p_llm(tr["id"]), p_llm(te["id"])
yt, ytr = te["y"].to_numpy(), tr["y"].to_numpy()
for kind in ("none", "domain_mean", "median"):
    out[f"zero_shot_{kind}"] = float((calibrator(kind, p_tr)(p_te).argmax(1) == yt).mean())
cal = calibrator(a.calibrate_llm, p_tr, a.calibrate_prior)


def knn(ids, k, tau):
    dd, ii = idx.search(H(ids), k)
    return knn_distribution(dd, ys[ii], len(labels), tau=tau, distance_norm=a.distance_norm)


pk_te, pk_tr = knn(te["id"], a.k, a.tau), knn(tr["id"], a.k, a.tau)
out["knn"] = float((pk_te.argmax(1) == yt).mean())
out["p_T"] = float((mix(pk_te, cal(p_te), a.lam).argmax(1) == yt).mean())
out["pseudo_label_accuracy"] = float((mix(pk_tr, cal(p_tr), a.lam).argmax(1) == ytr).mean())
out["p_T_by_lam_test"] = {lam: float((mix(pk_te, cal(p_te), lam).argmax(1) == yt).mean())
                          for lam in (0.0, 0.25, 0.5, 0.75, 1.0)}
# source-only choice of k, tau, lam (leave-one-out over the store)
dd, ii = loo_neighbours(H(source["id"]), max(a.k_grid))
ps = p_llm(source["id"])
best, curve = select_on_source(dd, ys[ii], calibrator(a.calibrate_llm, ps)(ps), ys,
                               ks=a.k_grid, taus=a.tau_grid, lams=a.lam_grid,
                               distance_norm=a.distance_norm)
out["source_selection"] = best
out["source_llm_only"] = max(r["accuracy"] for r in curve if r["lam"] == 0)
pk_b = knn(te["id"], best["k"], best["tau"])
out["p_T_source_selected"] = float((mix(pk_b, cal(p_te), best["lam"]).argmax(1) == yt).mean())
print(json.dumps(out, indent=1))
