"""Why the kNN half of SimDA's teacher does not help on books -> kitchen: kNN accuracy of the
teacher's keys on the labelled SOURCE rows (leave-one-out) against the TARGET test rows, for
the raw keys and four label-free key normalisations, and the p_T mix over lambda on each side.

    python benchmarks/simda_knn_keys.py RUN_DIR [--cache CACHE_DIR] [--dev-run DEV_RUN_DIR]

RUN_DIR is a finished SimDA run of jobs/simda/amazon-books-to-kitchen.cpu.yaml (its
``annotations.parquet`` names the target-train rows; the other target rows of the teacher stage
are the test rows); the keys and p_LLM come from that run's cached teacher stage. Only numpy on
cached outputs, seconds. Writes benchmarks/results/simda-knn-keys.json. This is an analysis
after the fact: the job itself chooses k, tau and lambda on source labels only; the target
columns here explain the result, they choose nothing.

``--dev-run``: a finished run of another pair whose SOURCE domain is neither of RUN_DIR's (e.g.
dvd -> electronics for books -> kitchen). Its labelled source rows serve as a shifted dev set:
(k, tau, lambda) are chosen on them as a target of RUN_DIR's source store (books keys -> dvd
rows, p_LLM median-calibrated on the dev rows), and the choice is then applied to RUN_DIR's
target test rows. Labels of a third domain, never the target's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

from raydapt.stages.annotate import (  # noqa: E402
    apply_log_bias,
    knn_distribution,
    mix,
    rank_calibration_bias,
    select_on_source,
)
from raydapt.stages.teacher import build_index, loo_neighbours  # noqa: E402


def _knn(q: np.ndarray, keys: np.ndarray, loo: bool, k: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The recipe's own search, so the distances mean what they mean in the job (FAISS flat L2,
    squared): ``loo_neighbours`` over the store for the source rows, the store index for
    queries from another domain."""
    if loo:
        return loo_neighbours(keys, k)
    return build_index(keys).search(np.ascontiguousarray(q, dtype=np.float32), k)


def _teacher_frame(run_dir: Path, cache_arg: str | None) -> tuple[dict, pd.DataFrame, dict]:
    """The run's resolved config, its cached teacher stage (keys, p_LLM; the stage whose rows
    come from exactly the run's source and target files) and the gold labels by id."""
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cache = Path(cache_arg or cfg["run"]["cache_dir"])
    want = {Path(cfg["data"][s]["path"]).stem for s in ("source", "target")}
    frame = None
    for done in sorted((cache / "teacher").glob("*/_SUCCESS"), key=lambda p: p.stat().st_mtime):
        parts = sorted(done.parent.glob("part-*.parquet"))
        ids = pd.concat([pd.read_parquet(p, columns=["id"]) for p in parts])["id"]
        if {str(i).rsplit("-", 1)[0] for i in ids} == want:
            frame = pd.concat([pd.read_parquet(p) for p in parts]).set_index("id")
    if frame is None:
        raise SystemExit(f"no teacher stage in {cache} for {sorted(want)}")
    gold = {}
    labels = cfg["data"]["labels"]
    root = Path(cfg["data"]["root"])
    for side in ("source", "target"):
        for line in (root / cfg["data"][side]["path"]).read_text().splitlines():
            r = json.loads(line)
            gold[str(r["id"])] = labels.index(r["label"])
    return cfg, frame, gold


def _dev_choice(dev_run: Path, cache_arg, hs, ys, hte, yte, pte_c) -> dict:
    """(k, tau, lambda) chosen on a third, labelled domain taken as a target of the source
    store; returns the choice, its dev accuracy and the target-test p_T it gives."""
    cfg, df, gold = _teacher_frame(dev_run, cache_arg)
    pfx = Path(cfg["data"]["source"]["path"]).stem
    ids = [i for i in df.index if i.startswith(pfx)]
    hd = np.stack(df.loc[ids, "hidden"].to_numpy()).astype(np.float64)
    z = np.stack(df.loc[ids, "llm_logp"].to_numpy()).astype(np.float64)
    pd_ = np.exp(z - z.max(1, keepdims=True))
    pd_ /= pd_.sum(1, keepdims=True)
    pd_c = apply_log_bias(pd_, rank_calibration_bias(pd_))  # label-free, on the dev rows
    yd = np.array([gold[i] for i in ids])
    dd, i_d = _knn(hd, hs, loo=False)
    best, _ = select_on_source(dd, ys[i_d], pd_c, yd, ks=[4, 8, 16, 32, 64],
                               taus=[0.1, 0.3, 1.0, 3.0], lams=[i / 10 for i in range(11)])
    dt, i_t = _knn(hte, hs, loo=False)
    pk = knn_distribution(dt[:, :best["k"]], ys[i_t][:, :best["k"]], 2, tau=best["tau"])
    return {"dev_domain": pfx, "dev_rows": len(ids), "chosen": best,
            "target_test_p_T": round(float((mix(pk, pte_c, best["lam"]).argmax(1) == yte)
                                           .mean()), 4)}


def run(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--cache", default=None, help="the run's run.cache_dir (default: from its "
                    "config.yaml)")
    ap.add_argument("--dev-run", default=None)
    ap.add_argument("--out", default="benchmarks/results/simda-knn-keys.json")
    args = ap.parse_args(argv)
    run_dir = Path(args.run_dir)
    cfg, df, gold = _teacher_frame(run_dir, args.cache)
    src_pfx = Path(cfg["data"]["source"]["path"]).stem
    train_ids = set(pd.read_parquet(run_dir / "annotations.parquet")["id"])
    src = [i for i in df.index if i.startswith(src_pfx)]
    test = [i for i in df.index if not i.startswith(src_pfx) and i not in train_ids]
    trn = [i for i in df.index if i in train_ids]

    def H(ids):
        return np.stack(df.loc[ids, "hidden"].to_numpy()).astype(np.float64)

    def P(ids):
        z = np.stack(df.loc[ids, "llm_logp"].to_numpy()).astype(np.float64)
        p = np.exp(z - z.max(1, keepdims=True))
        return p / p.sum(1, keepdims=True)

    hs, ht, hte = H(src), H(trn), H(test)
    ys, yte = np.array([gold[i] for i in src]), np.array([gold[i] for i in test])
    ps, pt, pte = P(src), P(trn), P(test)
    ps_c = apply_log_bias(ps, rank_calibration_bias(ps))  # source calibrated on source
    pte_c = apply_log_bias(pte, rank_calibration_bias(pt))  # target test on target-train
    mu = hs.mean(0)
    sd = hs.std(0) + 1e-6
    _, S, Vt = np.linalg.svd(hs - mu, full_matrices=False)

    def l2(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    keys = {  # (source keys, target-test keys); every transform label-free
        "raw (last token, final layer)": (hs, hte),
        "centred on the source mean + L2": (l2(hs - mu), l2(hte - mu)),
        "z-scored by source statistics": ((hs - mu) / sd, (hte - mu) / sd),
        "each domain centred on its own mean + L2": (l2(hs - mu), l2(hte - ht.mean(0))),
        "PCA-16 whitened (source)": ((hs - mu) @ (Vt[:16].T / S[:16]),
                                     (hte - mu) @ (Vt[:16].T / S[:16])),
    }
    out: dict = {"benchmark": "simda-knn-keys", "run_dir": str(run_dir), "rows": {"source": len(src), "target_test": len(test)},
                 "machine": describe(), "llm_calibrated_accuracy": {
                     "source": round(float((ps_c.argmax(1) == ys).mean()), 4),
                     "target_test": round(float((pte_c.argmax(1) == yte).mean()), 4)},
                 "keys": {}}
    for name, (ks, kt) in keys.items():
        ds, i_s = _knn(ks, ks, loo=True)
        dt, i_t = _knn(kt, ks, loo=False)
        row = {}
        for k in (8, 16, 32):
            row[f"knn_k{k}"] = {
                "source_loo": round(float((knn_distribution(ds[:, :k], ys[i_s][:, :k], 2).argmax(1)
                                           == ys).mean()), 4),
                "target_test": round(float((knn_distribution(dt[:, :k], ys[i_t][:, :k], 2).argmax(1)
                                            == yte).mean()), 4)}
        out["keys"][name] = row
    # the p_T mix over lambda at the source-chosen (k, tau), raw keys: source vs target
    ds, i_s = _knn(hs, hs, loo=True)
    dt, i_t = _knn(hte, hs, loo=False)
    best, curve = select_on_source(ds, ys[i_s], ps_c, ys, ks=[4, 8, 16, 32, 64],
                                   taus=[0.1, 0.3, 1.0, 3.0], lams=[i / 10 for i in range(11)])
    k, tau = best["k"], best["tau"]
    pk_s = knn_distribution(ds[:, :k], ys[i_s][:, :k], 2, tau=tau)
    pk_t = knn_distribution(dt[:, :k], ys[i_t][:, :k], 2, tau=tau)
    out["source_choice"] = best
    out["lambda_curve_at_source_choice"] = [
        {"lam": lam, "source_loo": round(float((mix(pk_s, ps_c, lam).argmax(1) == ys).mean()), 4),
         "target_test": round(float((mix(pk_t, pte_c, lam).argmax(1) == yte).mean()), 4)}
        for lam in [i / 10 for i in range(11)]]
    if args.dev_run:
        out["dev_domain_choice"] = _dev_choice(Path(args.dev_run), args.cache, hs, ys, hte, yte,
                                               pte_c)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "machine"}, indent=1))
    return out


if __name__ == "__main__":
    run()
