"""Label vocabulary, multi-hot encoding and seeded label hiding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from raydapt.data.labels import build_vocab, decode_multi_hot, hide_labels, kept_count, multi_hot

Y_STRATEGY = arrays(np.int8, st.tuples(st.integers(1, 30), st.integers(1, 6)),
                    elements=st.integers(0, 1))


def _y(n: int = 200, n_labels: int = 8, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, n_labels)) < 0.3).astype(np.int8)


# --------------------------------------------------------------------------- vocab / multi-hot


def test_multi_hot_roundtrip():
    rows = [["b", "a"], [], ["c", "c"], ["a"]]
    vocab = build_vocab(rows)
    assert vocab == ["a", "b", "c"]
    y = multi_hot(rows, vocab)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, [[1, 1, 0], [0, 0, 0], [0, 0, 1], [1, 0, 0]])
    assert decode_multi_hot(y, vocab) == [["a", "b"], [], ["c"], ["a"]]
    y_map = multi_hot(rows, {"c": 0, "b": 1, "a": 2}, dtype=np.int8)
    np.testing.assert_array_equal(y_map[0], [0, 1, 1])


def test_multi_hot_unknown_labels_error_lists_rows():
    rows = [["a"], ["x"], ["a", "y"], ["z"], ["q"], ["r"], ["s"], ["a"]]
    with pytest.raises(ValueError) as err:
        multi_hot(rows, ["a"])
    msg = str(err.value)
    assert msg.startswith("6 rows hold labels not in the vocabulary")
    assert "row 1: ['x']" in msg and "row 2: ['y']" in msg and "row 5: ['r']" in msg
    assert "row 6" not in msg and "(and 1 more rows)" in msg


# --------------------------------------------------------------------------- kept counts


def test_kept_count_rounding():
    assert kept_count(np.array([0, 1, 2, 3, 5, 10, 25]), 0.5).tolist() == [0, 1, 1, 2, 3, 5, 13]
    assert kept_count(np.array([1, 4, 10]), 0.1).tolist() == [1, 1, 1]  # ≥1 when any positive
    assert int(kept_count(25, 1 - 0.9)) == 3  # 2.4999999999999996 is treated as 2.5 -> 3
    assert int(kept_count(10, 1 - 0.7)) == 3
    assert int(kept_count(7, 1.0)) == 7 and int(kept_count(7, 0.0)) == 1


# --------------------------------------------------------------------------- per-label hiding


@pytest.mark.parametrize("keep_ratio", [0.5, 0.3, 0.1])
def test_per_label_counts(keep_ratio):
    y = _y()
    obs = hide_labels(y, keep_ratio=keep_ratio, strategy="per_label", seed=0)
    assert obs.dtype == y.dtype and obs.shape == y.shape
    assert np.all(obs <= y)  # only positives are kept
    n_pos = y.sum(0)
    expected = [max(1, int(np.floor(keep_ratio * n + 0.5))) if n else 0 for n in n_pos]
    assert obs.sum(0).tolist() == expected


@settings(max_examples=80, deadline=None)
@given(y=Y_STRATEGY, keep_ratio=st.floats(0.0, 1.0), seed=st.integers(0, 2**32))
def test_per_label_invariants(y, keep_ratio, seed):
    obs = hide_labels(y, keep_ratio=keep_ratio, strategy="per_label", seed=seed)
    assert np.all(obs <= y)
    assert obs.sum(0).tolist() == kept_count(y.sum(0), keep_ratio).tolist()
    assert np.all(obs.any(0) == y.any(0))


def test_deterministic_and_seed_dependent():
    y = _y()
    for strategy in ("per_label", "per_sample"):
        a = hide_labels(y, keep_ratio=0.3, strategy=strategy, seed=7)
        b = hide_labels(y, keep_ratio=0.3, strategy=strategy, seed=7)
        c = hide_labels(y, keep_ratio=0.3, strategy=strategy, seed=8)
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)


def test_kept_positives_are_spread_not_first_rows():
    y = np.ones((100, 1), dtype=np.int8)
    obs = hide_labels(y, keep_ratio=0.5, seed=0)
    kept = np.flatnonzero(obs[:, 0])
    assert kept.size == 50
    assert 10 < kept.min() or kept.max() > 60  # not simply the first 50 rows
    assert not np.array_equal(kept, np.arange(50))


def test_row_order_independence_with_row_keys():
    y = _y(n=60)
    keys = [f"doc-{i}" for i in range(60)]
    perm = np.random.default_rng(1).permutation(60)
    for strategy in ("per_label", "per_sample"):
        base = hide_labels(y, keep_ratio=0.3, strategy=strategy, seed=2, row_keys=keys)
        shuffled = hide_labels(y[perm], keep_ratio=0.3, strategy=strategy, seed=2,
                               row_keys=[keys[i] for i in perm])
        np.testing.assert_array_equal(shuffled, base[perm])
    # without keys the choice follows row positions, so a permutation changes it
    base = hide_labels(y, keep_ratio=0.3, seed=2)
    assert not np.array_equal(hide_labels(y[perm], keep_ratio=0.3, seed=2), base[perm])
    with pytest.raises(ValueError, match="unique"):
        hide_labels(y, keep_ratio=0.3, seed=2, row_keys=["a"] * 60)


# --------------------------------------------------------------------------- per-sample hiding


@settings(max_examples=80, deadline=None)
@given(y=Y_STRATEGY, keep_ratio=st.floats(0.0, 1.0), seed=st.integers(0, 2**32))
def test_per_sample_invariants(y, keep_ratio, seed):
    obs = hide_labels(y, keep_ratio=keep_ratio, strategy="per_sample", seed=seed)
    assert np.all(obs <= y)
    row_k = kept_count(y.sum(1), keep_ratio)
    kept = obs.sum(1)
    assert np.all(kept >= row_k)  # every row keeps at least its quota (≥1 if it has any)
    assert np.all(kept[y.sum(1) == 0] == 0)
    assert np.all(obs.any(0) == y.any(0))  # every label with a positive keeps ≥1
    # extra cells beyond a row's quota are rescues: at most one per label, only for labels
    # whose positives would otherwise all be hidden
    assert int((kept - row_k).sum()) <= int(y.any(0).sum())


def test_per_sample_exact_counts_and_rescue():
    # Row quotas at keep 0.5: rows with 4 positives keep 2, rows with 1 keep 1.
    y = np.array([[1, 1, 1, 1], [1, 0, 0, 0], [0, 1, 0, 0]], dtype=np.int8)
    found_rescue = False
    for seed in range(30):
        obs = hide_labels(y, keep_ratio=0.5, strategy="per_sample", seed=seed)
        assert obs[1].tolist() == [1, 0, 0, 0] and obs[2].tolist() == [0, 1, 0, 0]
        # labels 2 and 3 live only on row 0: both must survive, so row 0 keeps them
        assert obs[0, 2] == 1 and obs[0, 3] == 1
        assert obs[0].sum() in (2, 3, 4)
        found_rescue |= bool(obs[0].sum() > 2)
    assert found_rescue  # some seed picks label 0 or 1 on row 0 and needs a rescue


def test_bad_inputs():
    with pytest.raises(ValueError, match="0 and 1"):
        hide_labels(np.array([[2, 0]]), keep_ratio=0.5, seed=0)
    with pytest.raises(ValueError, match="keep_ratio"):
        hide_labels(np.array([[1, 0]]), keep_ratio=1.5, seed=0)
    with pytest.raises(ValueError, match="strategy"):
        hide_labels(np.array([[1, 0]]), keep_ratio=0.5, seed=0, strategy="x")  # type: ignore[arg-type]
