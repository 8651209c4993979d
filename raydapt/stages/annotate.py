"""SimDA annotation maths (NumPy) and prompt building. No Ray import: stages call these.

Shapes: N rows, k neighbours, C classes.

- :func:`knn_distribution`: p_kNN(y) ∝ Σ_{i∈N_k, y_i=y} exp(−d_i/τ), distances optionally divided by
  each row's median neighbour distance first (scale-free across models and layers).
- :func:`calibrate_domain_mean`: divide p_LLM by its mean over the target rows and renormalise —
  a label-prior correction that uses no labels (the LLM's preference for one label word is
  domain-wide, so it cancels).
- :func:`mix`: p_T = λ·p_kNN + (1−λ)·p_LLM.
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


def mix(p_knn: np.ndarray, p_llm: np.ndarray, lam: float) -> np.ndarray:
    """p_T = lam * p_kNN + (1 - lam) * p_LLM. [N, C], [N, C] -> [N, C]."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    return (lam * np.asarray(p_knn) + (1.0 - lam) * np.asarray(p_llm)).astype(np.float32)


def build_prompt(
    template: str, text: str, *, demos: list[tuple[str, str]] = (),
    demo_template: str = "",
) -> str:
    """Demonstrations (text, label word) rendered with ``demo_template``, then the query prompt."""
    head = "".join(demo_template.format(text=t, label=lab) for t, lab in demos)
    return head + template.format(text=text)
