"""kNN distribution, calibration, mixing and the FAISS data store (no Ray needed)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from raydapt.stages.annotate import (
    apply_log_bias,
    build_prompt,
    calibrate_domain_mean,
    calibrator,
    fit_demos,
    knn_distribution,
    mix,
    rank_calibration_bias,
)
from raydapt.stages.teacher import KnnSearch, build_index, save_store


def test_knn_distribution_hand_value():
    # d = [1, 2, 3], median 2 -> [0.5, 1, 1.5]; weights e^-0.5 (label 0), e^-1 + e^-1.5 (label 1)
    p = knn_distribution(np.array([[1.0, 2.0, 3.0]]), np.array([[0, 1, 1]]), 2)
    w0, w1 = math.exp(-0.5), math.exp(-1) + math.exp(-1.5)
    assert p[0, 0] == pytest.approx(w0 / (w0 + w1), rel=1e-6)
    # no normalisation and tau = 2: exp(-d/2)
    p = knn_distribution(np.array([[1.0, 2.0, 3.0]]), np.array([[0, 1, 1]]), 2, tau=2.0,
                         distance_norm="none")
    w0, w1 = math.exp(-0.5), math.exp(-1) + math.exp(-1.5)
    assert p[0, 0] == pytest.approx(w0 / (w0 + w1), rel=1e-6)


def test_knn_distribution_edge_cases():
    # a missing neighbour (-1 label, inf distance) is ignored; no neighbours -> uniform
    p = knn_distribution(np.array([[1.0, np.inf], [np.inf, np.inf]]),
                         np.array([[1, -1], [-1, -1]]), 3)
    np.testing.assert_allclose(p[0], [0, 1, 0], atol=1e-7)
    np.testing.assert_allclose(p[1], [1 / 3] * 3, atol=1e-7)
    # all distances equal -> vote shares
    p = knn_distribution(np.zeros((1, 4)), np.array([[0, 0, 0, 1]]), 2)
    np.testing.assert_allclose(p[0], [0.75, 0.25], atol=1e-6)
    with pytest.raises(ValueError):
        knn_distribution(np.zeros((2, 3)), np.zeros((2, 2), int), 2)


def test_calibration_and_mix():
    p = np.array([[0.9, 0.1], [0.7, 0.3]])
    # mean (0.8, 0.2): row 0 -> (1.125, 0.5)/1.625
    q = calibrate_domain_mean(p)
    np.testing.assert_allclose(q[0], [1.125 / 1.625, 0.5 / 1.625], rtol=1e-6)
    np.testing.assert_allclose(q.sum(1), 1.0, rtol=1e-6)
    m = mix(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]), 0.25)
    np.testing.assert_allclose(m, [[0.25, 0.75]])
    with pytest.raises(ValueError):
        mix(p, p, 1.5)


def test_build_prompt_renders_demos_then_query():
    s = build_prompt("Q: {text}", "hello", demos=[("a", "pos"), ("b", "neg")],
                     demo_template="[{text}={label}]")
    assert s == "[a=pos][b=neg]Q: hello"


def _two_class(margins):
    """Rows whose log p_1 - log p_0 equals each margin."""
    m = np.asarray(margins, dtype=np.float64)
    p1 = 1 / (1 + np.exp(-m))
    return np.stack([1 - p1, p1], axis=1)


def test_median_calibration_hand_value():
    # margins 3, 1, -1, 0.5: median 0.75 -> rows 0 and 1 positive, p_1 = sigmoid(margin - 0.75)
    p = _two_class([3.0, 1.0, -1.0, 0.5])
    q = calibrator("median", p)(p)
    assert q.argmax(1).tolist() == [1, 1, 0, 0]
    np.testing.assert_allclose(q[:, 1], 1 / (1 + np.exp(-(np.array([3, 1, -1, 0.5]) - 0.75))),
                               rtol=1e-5)
    # fitted on these rows, applied to others: threshold stays 0.75
    q = calibrator("median", p)(_two_class([0.7, 0.8]))
    assert q.argmax(1).tolist() == [0, 1]
    # uniform prior = median for two classes; a 3:1 prior moves the threshold to (-1 + 0.5) / 2
    b = rank_calibration_bias(p)
    assert b[1] - b[0] == pytest.approx(-0.75)
    b = rank_calibration_bias(p, np.array([0.25, 0.75]))
    assert b[1] - b[0] == pytest.approx(0.25)
    assert apply_log_bias(p, b).argmax(1).tolist() == [1, 1, 0, 1]
    with pytest.raises(ValueError, match="two classes"):
        calibrator("median", np.full((3, 3), 1 / 3))


def test_prior_calibration_three_classes_matches_counts_and_best_assignment():
    # every row prefers class 0; a uniform prior gives each class one row. Of the 6 one-to-one
    # assignments the best total log p is row0->0, row1->2, row2->1 (-1.5; next best -2).
    logp = np.array([[0.0, -1.0, -2.0], [0.0, -2.0, -1.0], [0.0, -0.5, -3.0]])
    p = np.exp(logp) / np.exp(logp).sum(1, keepdims=True)
    q = calibrator("prior", p)(p)
    assert q.argmax(1).tolist() == [0, 2, 1]
    np.testing.assert_allclose(q.sum(1), 1.0, rtol=1e-6)
    # a prior (2, 1, 0) of 3 rows: rows 0 and 2 keep class 0? best with counts (2, 1, 0):
    # {0,1}->0, 2->1: -0.5; {0,2}->0, 1->1: -2; {1,2}->0, 0->1: -1 -> [0, 0, 1]
    q = calibrator("prior", p, [2 / 3, 1 / 3, 0.0])(p)
    assert q.argmax(1).tolist() == [0, 0, 1]
    assert calibrator("none", p)(p).argmax(1).tolist() == [0, 0, 0]


def test_fit_demos_drops_farthest_and_puts_nearest_last():
    # budget 100, query 40: demos (nearest first) 25, 25, 25 -> the first two fit, farthest first
    assert fit_demos(40, [25, 25, 25], 100) == [1, 0]
    assert fit_demos(40, [70, 5], 100) == []  # the nearest does not fit: none is used
    assert fit_demos(40, [10, 10], 100) == [1, 0]


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_store_search_returns_true_neighbours(tmp_path, kind):
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(50, 8)).astype(np.float32)
    ids = [f"s{i}" for i in range(50)]
    y = (keys[:, 0] > 0).astype(int)
    save_store(tmp_path, build_index(keys, kind=kind), ids, y)
    stage = KnnSearch(store=str(tmp_path), k=3, num_classes=2, tau=1.0, distance_norm="median")
    q = keys[:4] + 1e-4
    out = stage(pd.DataFrame({"id": ["t0", "t1", "t2", "t3"], "hidden": list(q)}))
    assert (out["_error"] == "").all()
    brute = np.argsort(((keys[None] - q[:, None]) ** 2).sum(-1), axis=1)[:, :3]
    for r, row in enumerate(out["nbr_ids"]):
        assert list(row) == [ids[j] for j in brute[r]]
    np.testing.assert_allclose(np.stack(out["p_knn"]).sum(1), 1.0, rtol=1e-6)
    # exclude_self drops the query's own key from its neighbours
    stage = KnnSearch(store=str(tmp_path), k=3, num_classes=2, tau=1.0, distance_norm="median",
                      exclude_self=True)
    out = stage(pd.DataFrame({"id": ids[:2], "hidden": list(keys[:2])}))
    assert ids[0] not in list(out["nbr_ids"][0]) and len(out["nbr_ids"][0]) == 3


def test_store_bad_row_becomes_a_reject(tmp_path):
    keys = np.eye(4, dtype=np.float32)
    save_store(tmp_path, build_index(keys), list("abcd"), np.array([0, 1, 0, 1]))
    stage = KnnSearch(store=str(tmp_path), k=2, num_classes=2, tau=1.0, distance_norm="none")
    batch = pd.DataFrame({"id": ["ok", "bad"], "hidden": [keys[0], np.ones(7, np.float32)]})
    out = stage(batch)
    assert list(out["id"]) == ["ok", "bad"]
    assert out.loc[0, "_error"] == "" and "knn" in out.loc[1, "_error"]


def test_store_neighbours_of_another_domain_match_brute_force():
    from raydapt.stages.teacher import store_neighbours

    rng = np.random.default_rng(0)
    keys, queries = rng.normal(size=(50, 8)), rng.normal(size=(7, 8)) + 0.5
    d, idx = store_neighbours(keys, queries, 5)
    sq = ((queries[:, None, :] - keys[None, :, :]) ** 2).sum(-1)  # squared L2, as FAISS
    want = np.argsort(sq, axis=1)[:, :5]
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_allclose(d, np.take_along_axis(sq, want, 1), rtol=1e-4)
    assert store_neighbours(keys[:3], queries, 5)[1].shape == (7, 3)  # k capped at the store

