"""SimDA annotation maths (NumPy) and prompt building. No Ray import: stages call these.

Shapes: N rows, k neighbours, C classes.

- :func:`knn_distribution`: p_kNN(y) ∝ Σ_{i∈N_k, y_i=y} exp(−d_i/τ), distances optionally divided by
  each row's median neighbour distance first (scale-free across models and layers).
- :func:`calibrate_domain_mean`: divide p_LLM by its mean over the target rows and renormalise —
  a label-prior correction that uses no labels (the LLM's preference for one label word is
  domain-wide, so it cancels).
- :func:`rank_calibration_bias` / :func:`apply_log_bias`: label-free calibration by rank — a
  per-class log-bias chosen so that the argmax over the target rows matches a class prior
  (uniform by default; for two classes this is a threshold at the median margin).
- :func:`mix`: p_T = λ·p_kNN + (1−λ)·p_LLM.
- :func:`build_prompt` / :func:`fit_demos`: demonstrations + query, fitted into a token budget.
"""

from __future__ import annotations

from typing import Literal

import numpy as np


def knn_distribution(
    distances: np.ndarray, neighbour_labels: np.ndarray, num_classes: int, *,
    tau: float = 1.0, distance_norm: Literal["median", "none"] = "median",
) -> np.ndarray:
    """[N, k] distances (L2, >= 0), [N, k] int labels -> p_kNN [N, C].

    A row whose neighbours all have +inf / NaN distance (no neighbours) gets the uniform
    distribution.
    """
    d = np.asarray(distances, dtype=np.float64)
    lab = np.asarray(neighbour_labels, dtype=np.int64)
    if d.shape != lab.shape or d.ndim != 2:
        raise ValueError(f"distances {d.shape} and labels {lab.shape} must both be [N, k]")
    valid = np.isfinite(d) & (lab >= 0)
    d = np.where(valid, d, np.nan)
    if distance_norm == "median":
        med = np.nanmedian(np.where(valid, d, np.nan), axis=1, keepdims=True) if valid.any() else 1
        med = np.where(np.isfinite(med) & (med > 0), med, 1.0)
        d = d / med
    # subtract the row minimum for numerical stability (cancels in the normalisation)
    dmin = np.nanmin(np.where(valid, d, np.inf), axis=1, keepdims=True)
    dmin = np.where(np.isfinite(dmin), dmin, 0.0)
    w = np.where(valid, np.exp(-(np.nan_to_num(d, nan=0.0) - dmin) / tau), 0.0)
    p = np.zeros((d.shape[0], num_classes), dtype=np.float64)
    rows = np.repeat(np.arange(d.shape[0]), d.shape[1])
    np.add.at(p, (rows, np.clip(lab, 0, num_classes - 1).ravel()), w.ravel())
    total = p.sum(axis=1, keepdims=True)
    p = np.where(total > 0, p / np.where(total > 0, total, 1), 1.0 / num_classes)
    return p.astype(np.float32)


def calibrate_domain_mean(p_llm: np.ndarray, mean: np.ndarray | None = None) -> np.ndarray:
    """[N, C] -> [N, C]: p / mean_over_rows(p), renormalised per row. ``mean`` [C] may be given
    (e.g. the target-train mean applied to the test split)."""
    p = np.asarray(p_llm, dtype=np.float64)
    m = p.mean(axis=0) if mean is None else np.asarray(mean, dtype=np.float64)
    q = p / np.clip(m, 1e-12, None)
    return (q / q.sum(axis=1, keepdims=True)).astype(np.float32)


def _target_counts(prior: np.ndarray, n: int) -> np.ndarray:
    """Integer class counts summing to ``n`` closest to ``prior * n`` (largest remainder)."""
    raw = prior / prior.sum() * n
    cnt = np.floor(raw).astype(np.int64)
    for c in np.argsort(-(raw - cnt), kind="stable")[: n - cnt.sum()]:
        cnt[c] += 1
    return cnt


def rank_calibration_bias(p: np.ndarray, prior: np.ndarray | None = None, *,
                          sweeps: int = 100) -> np.ndarray:
    """Per-class log-biases b [C] such that argmax_c(log p_ic + b_c) over the rows [N, C] gives
    each class c about ``prior[c] * N`` rows (uniform prior by default). Uses no labels: it
    thresholds by rank. For two classes, b_1 - b_0 = -median(log p_1 - log p_0) (the midpoint
    of the two middle margins for even N): half the rows on each side. For C classes,
    coordinate updates (each b_c set to the midpoint between the n_c-th and (n_c+1)-th largest
    margin of class c over the best other class) until the counts match; the resulting argmax
    assignment maximises sum_i log p_i,y_i among assignments with those counts.

    Apply with :func:`apply_log_bias` (to these rows or to others, e.g. a test split)."""
    logp = np.log(np.clip(np.asarray(p, dtype=np.float64), 1e-30, None))
    n, C = logp.shape
    want = _target_counts(np.ones(C) if prior is None else np.asarray(prior, float), n)
    b = np.zeros(C)
    for _ in range(sweeps):
        for c in range(C):
            others = np.delete(logp + b, c, axis=1).max(axis=1)
            g = np.sort(logp[:, c] - others)[::-1]  # margin of class c, largest first
            k = want[c]
            hi = g[k - 1] if k > 0 else g[0] + 1.0
            lo = g[k] if k < n else g[-1] - 1.0
            b[c] = -(hi + lo) / 2.0
        if (np.bincount((logp + b).argmax(1), minlength=C) == want).all():
            break
    return b - b.mean()


def apply_log_bias(p: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """[N, C] distribution, [C] log-bias -> softmax(log p + bias) [N, C]."""
    z = np.log(np.clip(np.asarray(p, dtype=np.float64), 1e-30, None)) + np.asarray(bias)
    z -= z.max(axis=1, keepdims=True)
    q = np.exp(z)
    return (q / q.sum(axis=1, keepdims=True)).astype(np.float32)


def calibrator(kind: str, ref: np.ndarray, prior: list[float] | None = None):
    """A label-free calibration fitted on the reference rows ``ref`` [N, C] (the target rows
    being annotated) -> a function [M, C] -> [M, C]. ``none``; ``domain_mean`` (divide by the
    mean of ``ref``); ``median`` (2 classes: threshold at the median margin of ``ref``);
    ``prior`` (per-class biases so the argmax over ``ref`` matches ``prior``, uniform if None)."""
    if kind == "none":
        return lambda q: np.asarray(q, dtype=np.float32)
    if kind == "domain_mean":
        m = np.asarray(ref, dtype=np.float64).mean(axis=0)
        return lambda q: calibrate_domain_mean(q, m)
    if kind in ("median", "prior"):
        if kind == "median" and np.asarray(ref).shape[1] != 2:
            raise ValueError("calibration 'median' needs two classes; use 'prior'")
        b = rank_calibration_bias(ref, None if kind == "median" else
                                  (None if prior is None else np.asarray(prior, float)))
        return lambda q: apply_log_bias(q, b)
    raise ValueError(f"unknown calibration {kind!r}")


def mix(p_knn: np.ndarray, p_llm: np.ndarray, lam: float) -> np.ndarray:
    """p_T = lam * p_kNN + (1 - lam) * p_LLM. [N, C], [N, C] -> [N, C]."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    return (lam * np.asarray(p_knn) + (1.0 - lam) * np.asarray(p_llm)).astype(np.float32)


def build_prompt(
    template: str, text: str, *, demos: list[tuple[str, str]] = (),
    demo_template: str = "",
) -> str:
    """Demonstrations (text, label word) rendered with ``demo_template`` in the given order, then
    the query prompt."""
    head = "".join(demo_template.format(text=t, label=lab) for t, lab in demos)
    return head + template.format(text=text)


def fit_demos(query_tokens: int, demo_tokens: list[int], max_length: int) -> list[int]:
    """Which demonstrations fit, and in what order. ``demo_tokens`` lists each (already
    truncated, rendered) demonstration's tokens, nearest first; the query (instruction + text +
    answer cue) takes ``query_tokens`` and is never cut. Keeps the longest nearest-first prefix
    that fits in ``max_length`` (whole demonstrations are dropped, farthest first) and returns
    its indices farthest first, so the nearest demonstration sits next to the query."""
    room, kept = max_length - query_tokens, []
    for i, t in enumerate(demo_tokens):
        if t > room:
            break
        kept.append(i)
        room -= t
    return kept[::-1]


def select_on_source(
    nbr_dist: np.ndarray, nbr_labels: np.ndarray, p_llm: np.ndarray, y: np.ndarray, *,
    ks: list[int], taus: list[float], lams: list[float], distance_norm: str = "median",
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Choose k, tau and lam on labelled SOURCE rows (target labels never used).

    ``nbr_dist`` / ``nbr_labels`` [N, >= max(ks)]: each source row's leave-one-out neighbours in
    the source store (itself excluded), nearest first; ``p_llm`` [N, C] its (calibrated) LLM
    distribution; ``y`` [N] its gold label. Every (k, tau, lam) is scored by the accuracy of
    argmax(lam * p_kNN + (1 - lam) * p_LLM); returns the best (first in grid order on ties) and
    the whole curve. Source accuracy flatters kNN (same-domain neighbours), so the chosen lam is
    an upper end for the target."""
    curve = []
    y = np.asarray(y)
    C = p_llm.shape[1]
    for k in ks:
        for tau in taus:
            pk = knn_distribution(nbr_dist[:, :k], nbr_labels[:, :k], C, tau=tau,
                                  distance_norm=distance_norm)
            for lam in lams:
                acc = float((mix(pk, p_llm, lam).argmax(1) == y).mean())
                curve.append({"k": k, "tau": tau, "lam": lam, "accuracy": acc})
    best = max(curve, key=lambda r: r["accuracy"])  # max keeps the first of equal values
    return best, curve

