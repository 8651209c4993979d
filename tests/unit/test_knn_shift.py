"""SimDA under domain shift (issue 29): the label-free target choice of k / tau / lam
(annotate.select_on_target) and the target class-prior estimate (annotate.calibrate_prior: em /
bbse). Real FAISS, real recipe steps on a real job context (no Ray, tracking off)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from raydapt.job import job_context
from raydapt.recipes.simda import STAGE_VERSIONS, SimDARecipe
from raydapt.recipes.simda_config import SimDAJob
from raydapt.stages.annotate import (
    TARGET_RULES,
    calibrator,
    estimate_prior,
    estimated_knn_accuracy,
    select_on_target,
)


def _binary_scores(rng, n: int, pos_share: float, *, sep: float = 1.5, bias: float = 0.8):
    """LLM-like two-class distributions: margin log p1 - log p0 = sep * (+-1) + bias + noise
    (a label-word bias the calibration has to remove)."""
    y = (rng.random(n) < pos_share).astype(np.int64)
    z = rng.normal(size=n) + sep * (2 * y - 1) + bias
    p1 = 1 / (1 + np.exp(-z))
    return np.c_[1 - p1, p1], y


@pytest.mark.parametrize("method", ["em", "bbse"])
@pytest.mark.parametrize("share", [0.5, 0.75, 0.9, 0.25])
def test_prior_estimate_recovers_a_known_prior(method, share):
    rng = np.random.default_rng(1)
    p_s, y_s = _binary_scores(rng, 3000, 0.5)  # balanced labelled source
    p_t, y_t = _binary_scores(rng, 3000, share)  # same p(x | y), another prior
    est = estimate_prior(p_s, y_s, p_t, method=method)
    assert est.sum() == pytest.approx(1.0)
    assert est[1] == pytest.approx(y_t.mean(), abs=0.03)  # the drawn share, not the label
    # and the estimate is no echo of the source prior: a 0.9 target is not read as 0.5
    if share != 0.5:
        assert abs(est[1] - 0.5) > abs(share - 0.5) - 0.05


def test_prior_estimate_three_classes_and_bad_method():
    rng = np.random.default_rng(2)

    def draw(n, prior):
        y = rng.choice(3, size=n, p=prior)
        logits = rng.normal(size=(n, 3)) + 2.0 * np.eye(3)[y] + np.array([0.5, 0.0, -0.5])
        p = np.exp(logits)
        return p / p.sum(1, keepdims=True), y

    p_s, y_s = draw(4000, [1 / 3, 1 / 3, 1 / 3])
    p_t, y_t = draw(4000, [0.6, 0.3, 0.1])
    for m in ("em", "bbse"):
        np.testing.assert_allclose(estimate_prior(p_s, y_s, p_t, method=m),
                                   np.bincount(y_t, minlength=3) / len(y_t), atol=0.04)
    with pytest.raises(ValueError, match="unknown prior estimate"):
        estimate_prior(p_s, y_s, p_t, method="oracle")


def test_estimated_knn_accuracy_hand_values():
    # source: kNN 0.9, agreement with the LLM 0.8 (2A-1 = 0.6); target agreement 0.65 (0.3):
    # 2a-1 = 0.3 * 0.8 / 0.6 = 0.4 -> a = 0.7
    assert estimated_knn_accuracy(0.65, 0.8, 0.9) == pytest.approx(0.7)
    # no drop in agreement: the source accuracy
    assert estimated_knn_accuracy(0.8, 0.8, 0.9) == pytest.approx(0.9)
    # agreement at chance on the target: kNN at chance
    assert estimated_knn_accuracy(0.5, 0.8, 0.9) == pytest.approx(0.5)


def _shift_problem(seed: int = 0, n: int = 120, h: int = 8, shift: float = 3.0):
    """Source keys near their class centre; target keys shifted away (far neighbours)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(2, h)) * 2
    y_s = rng.integers(0, 2, n)
    y_t = rng.integers(0, 2, n)
    k_s = (centres[y_s] + rng.normal(size=(n, h))).astype(np.float32)
    k_t = (centres[y_t] + rng.normal(size=(n, h)) * 2 + shift).astype(np.float32)
    p_s, _ = _binary_scores(rng, n, 0.5)
    p_t, _ = _binary_scores(rng, n, 0.5)
    return k_s, y_s, p_s, k_t, y_t, p_t


@pytest.mark.parametrize("rule", TARGET_RULES)
def test_select_on_target_rules_pick_from_the_grid(rule):
    from raydapt.stages.teacher import loo_neighbours, store_neighbours

    k_s, y_s, p_s, k_t, _, p_t = _shift_problem()
    d_s, i_s = loo_neighbours(k_s, 16)
    d_t, i_t = store_neighbours(k_s, k_t, 16)
    best, curve = select_on_target(d_s, y_s[i_s], p_s, y_s, d_t, y_s[i_t], p_t, src_keys=k_s,
                                   tgt_keys=k_t, rule=rule, ks=[4, 16], taus=[0.3, 1.0],
                                   lams=[0.0, 0.5, 1.0])
    assert len(curve) == 2 * 2 * 3
    assert (best["k"], best["tau"], best["lam"]) in {(r["k"], r["tau"], r["lam"]) for r in curve}
    if rule == "agreement":  # (k, tau) by the estimated kNN accuracy, then lam nearest lam*
        top = max(r["knn_acc_target_est"] for r in curve)
        assert best["knn_acc_target_est"] == top
        assert best["score"] == max(r["score"] for r in curve
                                    if (r["k"], r["tau"]) == (best["k"], best["tau"]))
    else:
        assert best["score"] == max(r["score"] for r in curve)
    with pytest.raises(ValueError, match="unknown select_on_target rule"):
        select_on_target(d_s, y_s[i_s], p_s, y_s, d_t, y_s[i_t], p_t, src_keys=k_s,
                         tgt_keys=k_t, rule="oracle", ks=[4], taus=[1.0], lams=[0.0])


def test_agreement_rule_drops_lam_when_knn_disagrees_on_the_target():
    """kNN that agrees with the LLM on source rows but is at chance on the target (its
    neighbour labels are noise there) gets lam 0; the same kNN agreeing on the target keeps
    a positive lam."""
    rng = np.random.default_rng(3)
    n, k = 400, 8
    p_s, y_s = _binary_scores(rng, n, 0.5, bias=0.0)  # the LLM ~0.85 accurate on both
    p_s = calibrator("median", p_s)(p_s)
    # source: neighbours share the row's label 85% of the time
    lab_s = np.where(rng.random((n, k)) < 0.85, y_s[:, None], 1 - y_s[:, None])
    d_s = np.sort(rng.random((n, k)), 1) + 1
    p_t, y_t = _binary_scores(rng, n, 0.5, bias=0.0)
    p_t = calibrator("median", p_t)(p_t)
    d_t = np.sort(rng.random((n, k)), 1) + 1
    keys = rng.normal(size=(n, 4)).astype(np.float32)
    kw = dict(src_keys=keys, tgt_keys=keys, rule="agreement", ks=[k], taus=[1.0],
              lams=[i / 10 for i in range(11)])
    noise = rng.integers(0, 2, (n, k))
    best, _ = select_on_target(d_s, lab_s, p_s, y_s, d_t, noise, p_t, **kw)
    assert best["lam"] == 0.0 and best["knn_acc_target_est"] < 0.6
    good = np.where(rng.random((n, k)) < 0.85, y_t[:, None], 1 - y_t[:, None])
    best, _ = select_on_target(d_s, lab_s, p_s, y_s, d_t, good, p_t, **kw)
    assert best["lam"] > 0.2 and best["knn_acc_target_est"] > 0.8


@pytest.fixture
def recipe_on(tmp_path):
    """A SimDARecipe on a real job context (no Ray, tracking off) holding a synthetic teacher
    pass: source / target-train / target-test rows with keys and llm_logp."""
    def make(target_rule: str, prior: str, shuffle_seed: int | None):
        k_s, y_s, p_s, k_t, y_t, p_t = _shift_problem(seed=4)
        rng = np.random.default_rng(5)
        k_te = (k_t + rng.normal(size=k_t.shape)).astype(np.float32)
        p_te, y_te = _binary_scores(rng, len(k_t), 0.5)
        ids_s = [f"s{i}" for i in range(len(k_s))]
        ids_t = [f"t{i}" for i in range(len(k_t))]
        ids_te = [f"e{i}" for i in range(len(k_te))]
        if shuffle_seed is not None:  # the target labels (test and the hidden train gold)
            srng = np.random.default_rng(shuffle_seed)
            y_te, y_t = srng.permutation(y_te), srng.permutation(y_t)
        by_id = pd.DataFrame({"id": ids_s + ids_t + ids_te,
                              "llm_logp": list(np.log(np.r_[p_s, p_t, p_te])),
                              "hidden": list(np.r_[k_s, k_t, k_te])}).set_index("id")
        cfg = SimDAJob(run={"name": "knn-shift", "output_dir": str(tmp_path / "runs"),
                            "cache_dir": str(tmp_path / "cache")},
                       tracking={"enabled": False},
                       annotate={"select_on_target": True, "target_rule": target_rule,
                                 "calibrate_llm": "prior", "calibrate_prior": prior,
                                 "k_grid": [4, 8], "tau_grid": [0.3, 1.0],
                                 "lam_grid": [0.0, 0.3, 0.6, 1.0]})
        with job_context(cfg, ray=False, stage_versions=STAGE_VERSIONS) as ctx:
            r = SimDARecipe(cfg, ctx)
            r.source = pd.DataFrame({"id": ids_s, "text": "x", "y": y_s})
            r.tgt_train = pd.DataFrame({"id": ids_t, "text": "x", "y": y_t})
            r.tgt_test = pd.DataFrame({"id": ids_te, "text": "x", "y": y_te})
            r.by_id, r.keys = by_id, k_s
            r.estimate_prior()
            r.select_on_target()
            a = r.cfg.annotate
            return (a.k, a.tau, a.lam, tuple(a.calibrate_prior)), r
    return make


@pytest.mark.parametrize("rule", TARGET_RULES)
def test_target_choice_and_prior_ignore_target_labels(recipe_on, rule):
    """The recipe's select_on_target and estimate_prior steps choose the same k / tau / lam
    and prior when the target labels (test split and the train split's hidden gold) are
    shuffled."""
    prior = "bbse" if rule == "reverse" else "em"
    base, r = recipe_on(rule, prior, None)
    assert base[2] in (0.0, 0.3, 0.6, 1.0) and base[0] in (4, 8)
    assert sum(base[3]) == pytest.approx(1.0, abs=1e-3)
    assert (r.ctx.out / "select-on-target.json").exists()
    for s in (0, 1):
        assert recipe_on(rule, prior, s)[0] == base


def test_config_checks_for_the_new_options():
    with pytest.raises(ValueError, match="needs annotate.calibrate_llm=prior"):
        SimDAJob(annotate={"calibrate_llm": "median", "calibrate_prior": "em"})
    with pytest.raises(ValueError, match="is not used by"):
        SimDAJob(annotate={"calibrate_llm": "median", "calibrate_prior": [0.7, 0.3]})
    with pytest.raises(ValueError, match="choose one"):
        SimDAJob(annotate={"select_on_source": True, "select_on_target": True})
    cfg = SimDAJob(annotate={"select_on_target": True, "calibrate_prior": "em"})
    assert {"annotate.lam", "annotate.calibrate_prior"} <= set(cfg.chosen_at_run_time())
