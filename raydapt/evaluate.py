"""Evaluation metrics: accuracy and confusion matrix (single-label), mAP and F1 (multi-label).

All functions take NumPy arrays and return plain floats / arrays. Shapes:

- single-label: ``y_true`` [N] int class ids, ``y_pred`` [N] int class ids.
- multi-label: ``y_true`` [N, L] in {0, 1}, ``scores`` [N, L] real (probabilities or logits).
"""

from __future__ import annotations

import numpy as np


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Share of rows whose prediction equals the label. [N], [N] -> float."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"shape mismatch: y_true {y_true.shape} vs y_pred {y_pred.shape}")
    if y_true.size == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float((y_true == y_pred).mean())


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """[C, C] counts; row = true class, column = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    return cm


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Average precision of one label: mean precision at the rank of each positive.

    [N] {0,1}, [N] -> float; NaN when there is no positive. Ties are broken by a stable sort
    on descending score (the same convention as scikit-learn's step-wise AP up to ties).
    """
    y = np.asarray(y_true).astype(bool)
    if not y.any():
        return float("nan")
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="stable")
    y_sorted = y[order]
    # Group tied scores so a tie counts as one threshold (as sklearn does).
    s_sorted = s[order]
    distinct = np.r_[np.nonzero(np.diff(s_sorted))[0], y_sorted.size - 1]
    tp = np.cumsum(y_sorted)[distinct]
    fp = (distinct + 1) - tp
    precision = tp / (tp + fp)
    recall_gain = np.diff(np.r_[0, tp]) / y.sum()
    return float((precision * recall_gain).sum())


def mean_average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Macro mAP over labels with at least one positive. [N, L], [N, L] -> float."""
    y_true, scores = np.asarray(y_true), np.asarray(scores)
    aps = [average_precision(y_true[:, j], scores[:, j]) for j in range(y_true.shape[1])]
    aps = [a for a in aps if not np.isnan(a)]
    if not aps:
        raise ValueError("no label has a positive: mAP is undefined")
    return float(np.mean(aps))


def binarised_map(y_true: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> float:
    """mAP computed on 0/1 predictions (prob >= threshold): the DALLMi reference code's variant."""
    return mean_average_precision(y_true, (np.asarray(probs) >= threshold).astype(np.float64))


def f1_scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Micro and macro F1 of multi-label 0/1 predictions. [N, L], [N, L] -> {micro_f1, macro_f1}.

    A label with no positive and no predicted positive has F1 = 0 in the macro mean only if it
    has positives; labels absent from both are skipped (as they carry no information).
    """
    y, p = np.asarray(y_true).astype(bool), np.asarray(y_pred).astype(bool)
    tp = (y & p).sum(0).astype(float)
    fp = (~y & p).sum(0).astype(float)
    fn = (y & ~p).sum(0).astype(float)
    denom_micro = 2 * tp.sum() + fp.sum() + fn.sum()
    micro = 0.0 if denom_micro == 0 else 2 * tp.sum() / denom_micro
    per = []
    for j in range(y.shape[1]):
        d = 2 * tp[j] + fp[j] + fn[j]
        if d > 0:
            per.append(2 * tp[j] / d)
    macro = float(np.mean(per)) if per else 0.0
    return {"micro_f1": float(micro), "macro_f1": macro}
