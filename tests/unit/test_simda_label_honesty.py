"""Guards for SimDA's claims (issue 26):

- the source-side choice of k / tau / lam (``annotate.select_on_source``) and its leave-one-out
  neighbours (``teacher.loo_neighbours``) against a naive NumPy reference;
- target labels reach nothing but the report: with the target labels shuffled, the recipe's own
  steps (data store, select-on-source, the kNN search, annotate) give the same chosen k / tau /
  lam, the same p_T and the same distillation rows (``annotations.parquet``: what the distilled
  students train on, with the target-train texts), while the pseudo-label accuracy, which reads
  the labels for the report, changes.

Synthetic teacher outputs (keys, LLM log-probs) through the real functions; no model, no Ray."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from raydapt.stages.annotate import select_on_source
from raydapt.stages.teacher import KnnSearch, loo_neighbours


def _naive_loo(keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k nearest other rows by squared L2 (FAISS's IndexFlatL2 reports squared
    distances), nearest first, ties by row index."""
    n = len(keys)
    d2 = ((keys[:, None, :].astype(np.float64) - keys[None, :, :]) ** 2).sum(-1)
    dist, idx = np.zeros((n, k)), np.zeros((n, k), dtype=np.int64)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        order = sorted(others, key=lambda j: (d2[i, j], j))[:k]
        idx[i], dist[i] = order, d2[i, order]
    return dist, idx


def _naive_select(dist, labels, p_llm, y, ks, taus, lams):
    """select_on_source written out: p_kNN(c) ∝ Σ_{neighbours with label c} exp(−(d / median
    d) / tau) over the first k neighbours, p_T = lam p_kNN + (1 − lam) p_LLM, accuracy of the
    argmax; the first best in grid order (k, then tau, then lam)."""
    curve = []
    C = p_llm.shape[1]
    for k in ks:
        for tau in taus:
            pk = np.zeros((len(y), C))
            for i in range(len(y)):
                d = dist[i, :k] / np.median(dist[i, :k])
                for dj, lj in zip(d, labels[i, :k]):
                    pk[i, lj] += np.exp(-dj / tau)
                pk[i] /= pk[i].sum()
            for lam in lams:
                acc = float(((lam * pk + (1 - lam) * p_llm).argmax(1) == y).mean())
                curve.append({"k": k, "tau": tau, "lam": lam, "accuracy": acc})
    best = curve[int(np.argmax([r["accuracy"] for r in curve]))]
    return best, curve


def _source(n=60, h=12, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    keys = (rng.normal(size=(n, h)) + 0.8 * y[:, None]).astype(np.float32)
    return keys, y, rng


def test_loo_neighbours_match_a_naive_reference():
    keys, _, _ = _source()
    keys[7] = keys[3]  # an exact duplicate: each must get the other at distance 0, never itself
    d, idx = loo_neighbours(keys, 10)
    nd, nidx = _naive_loo(keys, 10)
    assert idx.shape == (60, 10) and not (idx == np.arange(60)[:, None]).any()
    np.testing.assert_array_equal(idx, nidx)
    np.testing.assert_allclose(d, nd, rtol=1e-4, atol=1e-4)
    assert idx[3, 0] == 7 and idx[7, 0] == 3 and d[3, 0] == pytest.approx(0, abs=1e-5)
    # k is capped at N - 1
    d2, idx2 = loo_neighbours(keys[:5], 10)
    assert idx2.shape == (5, 4) and all(set(r) == set(range(5)) - {i} for i, r in enumerate(idx2))


def test_select_on_source_matches_a_naive_reference():
    keys, y, rng = _source()
    d, idx = loo_neighbours(keys, 16)
    logits = rng.normal(size=(60, 2)) + 0.6 * np.eye(2)[y]
    p_llm = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    grid = {"ks": [4, 8, 16], "taus": [0.1, 0.3, 1.0, 3.0], "lams": [i / 10 for i in range(11)]}
    best, curve = select_on_source(d, y[idx], p_llm, y, **grid)
    nbest, ncurve = _naive_select(d.astype(np.float64), y[idx], p_llm, y, **grid)
    assert len(curve) == 3 * 4 * 11
    assert [(r["k"], r["tau"], r["lam"]) for r in curve] == [
        (r["k"], r["tau"], r["lam"]) for r in ncurve]
    np.testing.assert_allclose([r["accuracy"] for r in curve], [r["accuracy"] for r in ncurve])
    assert best == nbest
    # the choice moves with the source labels it is given (the test can fail)
    flipped, _ = select_on_source(d, (1 - y)[idx], p_llm, 1 - y, **grid)
    assert flipped != best


@pytest.fixture
def simda_state(tmp_path, tiny_simda_job):
    """A real SimDA config and job context (no Ray, tracking off) and synthetic teacher outputs
    for 60 source, 40 target-train and 20 target-test rows."""
    from raydapt.config import load_job

    job = tiny_simda_job(tmp_path, tracking={"enabled": False},
                         annotate={"select_on_source": True, "k_grid": [4, 8, 16],
                                   "tau_grid": [0.1, 0.3, 1.0], "baselines": ["zero_shot"]})
    cfg = load_job(job)
    keys, ys, rng = _source()
    yt = rng.integers(0, 2, 60)
    tkeys = (rng.normal(size=(60, 12)) + 0.5 + 0.6 * yt[:, None]).astype(np.float32)
    src = pd.DataFrame({"id": [f"s{i}" for i in range(60)], "text": [f"src {i}" for i in range(60)],
                        "y": ys})
    tgt = pd.DataFrame({"id": [f"t{i}" for i in range(60)], "text": [f"tgt {i}" for i in range(60)],
                        "y": yt})
    logp = np.log(np.exp(rng.normal(size=(120, 2)) + 0.7 * np.eye(2)[np.r_[ys, yt]]))
    by_id = pd.DataFrame({"id": list(src["id"]) + list(tgt["id"]),
                          "hidden": list(np.r_[keys, tkeys]), "llm_logp": list(logp)}).set_index("id")
    return cfg, src, tgt.iloc[:40].reset_index(drop=True), tgt.iloc[40:].reset_index(drop=True), by_id


def _recipe_steps(cfg, src, tgt_train, tgt_test, by_id, name):
    """The recipe's steps 3, select-on-source, 4 and 6 (data store, select on source, the kNN
    search its knn pass maps over the target rows, annotate) on the given state. Works with
    the step functions (recipes/simda.py before the Recipe class) and with ``SimDARecipe``."""
    from raydapt.job import job_context
    from raydapt.recipes import simda

    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": name})})
    state = {"source": src, "tgt_train": tgt_train, "tgt_test": tgt_test, "by_id": by_id,
             "rejects": [], "prompted": None}
    C = len(cfg.data.labels)

    def knn(c, store):
        ids = pd.concat([tgt_train["id"], tgt_test["id"]], ignore_index=True)
        q = pd.DataFrame({"id": ids, "hidden": list(by_id.loc[ids, "hidden"])})
        return KnnSearch(store=str(store.resolve()), k=c.annotate.k, num_classes=C,
                         tau=c.annotate.tau, distance_norm=c.annotate.distance_norm)(
            q).set_index("id")

    with job_context(cfg, ray=False) as ctx:
        if hasattr(simda, "SimDARecipe"):
            st = simda.SimDARecipe(cfg, ctx)
            for k, v in state.items():
                setattr(st, k, v)
            st.data_store()
            st.select_on_source()
            st.knn = knn(st.cfg, st.store)
            st.annotate()
            chosen_cfg = st.cfg
        else:
            st = SimpleNamespace(labels=cfg.data.labels, C=C, **state)
            simda.data_store(cfg, ctx, st)
            chosen_cfg = simda.select_on_source(cfg, ctx, st)
            st.knn = knn(chosen_cfg, st.store)
            simda.annotate(chosen_cfg, ctx, st)
        ann = pd.read_parquet(ctx.out / "annotations.parquet")
        chosen = json.loads((ctx.out / "select-on-source.json").read_text())
    return chosen_cfg.annotate, st, ann, chosen


def test_shuffled_target_labels_change_nothing_but_the_report(simda_state):
    cfg, src, tr, te, by_id = simda_state
    perm = np.random.default_rng(1).permutation
    tr_s = tr.assign(y=tr["y"].to_numpy()[perm(len(tr))])
    te_s = te.assign(y=1 - te["y"].to_numpy())
    assert (tr_s["y"] != tr["y"]).any()
    a0, st0, ann0, ch0 = _recipe_steps(cfg, src, tr, te, by_id, "gold")
    a1, st1, ann1, ch1 = _recipe_steps(cfg, src, tr_s, te_s, by_id, "shuffled")
    assert (a0.k, a0.tau, a0.lam) == (a1.k, a1.tau, a1.lam)
    assert ch0 == ch1  # the whole source curve
    np.testing.assert_array_equal(st0.p_t, st1.p_t)
    pd.testing.assert_frame_equal(ann0, ann1)  # id, p_t, pseudo-label, p_LLM, p_kNN, h_t, nbrs
    # the distilled students' rows: target-train text + p_T + h_T, in the same order
    assert tr_s["text"].tolist() == tr["text"].tolist()
    # the labels did reach the report: the pseudo-label accuracy reads them
    assert st0.pseudo_acc != st1.pseudo_acc
    # and the choice is not a constant: with the SOURCE labels shuffled it moves
    src_s = src.assign(y=src["y"].to_numpy()[perm(len(src))])
    a2, st2, _, ch2 = _recipe_steps(cfg, src_s, tr, te, by_id, "source-shuffled")
    assert ch2 != ch0 and not np.array_equal(st2.p_t, st0.p_t)
