"""Evaluation metrics: accuracy and confusion matrix (single-label), mAP and F1 (multi-label),
multiple-choice QA views (majority-letter floor, batch-calibrated accuracy), the confusion plot.

All functions take NumPy arrays and return plain floats / arrays. Shapes:

- single-label: ``y_true`` [N] int class ids, ``y_pred`` [N] int class ids.
- multi-label: ``y_true`` [N, L] in {0, 1}, ``scores`` [N, L] real (probabilities or logits).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


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


# multiple-choice QA (NTK-Selector)


def majority_letter_accuracy(domain: pd.DataFrame, tests: dict[str, pd.DataFrame]
                             ) -> dict[str, float]:
    """Accuracy of always answering the option letter most frequent among D's answers to the
    same task (all of D for a task without domain rows): the letter prior a model can learn
    from D alone, the floor a selection has to beat to show domain knowledge."""
    acc = {}
    for name, t in tests.items():
        d = domain.loc[domain["task"] == name, "answer"]
        d = d if len(d) else domain["answer"]
        if not len(d) or not len(t):
            acc[name] = float("nan")
            continue
        letter = d.value_counts().sort_index().idxmax()  # ties → the earliest letter
        acc[name] = float((t["answer"] == letter).mean())
    acc["mean"] = float(np.mean(list(acc.values())))
    return acc


def calibrated_mc_metrics(m: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Prior-free views of one variant's multiple-choice scores, per task (and their mean).

    Args:
        m: one row per test item: ``task``, ``gold`` (letter index) and ``letter_logp`` (the
            item's option-letter log-probs [n_options], or None where scoring failed).

    Returns:
        ``calibrated``: accuracy after batch calibration — the option log-probs (normalised over
        the options) minus their mean over the task's items, then argmax — so a model that
        prefers one letter for every item gains nothing from it (Zhou et al. 2023, "Batch
        Calibration"; label-free); ``gold_logprob``: mean log-prob of the gold option among the
        options (continuous, less noisy than accuracy on small test sets). A failed item counts
        as wrong and is left out of the mean log-prob.
    """
    cal, gold_lp = {}, {}
    for task, g in m.groupby("task", sort=False):
        ok = g[g["letter_logp"].map(lambda x: x is not None and len(x) > 0)]
        if len(ok) == 0:
            cal[task], gold_lp[task] = 0.0, float("nan")
            continue
        lp = np.stack([np.asarray(x, dtype=np.float64) for x in ok["letter_logp"]])  # [n, C]
        lp = lp - np.logaddexp.reduce(lp, axis=1, keepdims=True)  # log-softmax over options
        gold = ok["gold"].to_numpy().astype(int)
        pred = np.argmax(lp - lp.mean(axis=0, keepdims=True), axis=1)
        cal[task] = float((pred == gold).sum() / len(g))
        gold_lp[task] = float(lp[np.arange(len(ok)), gold].mean())
    for d in (cal, gold_lp):
        d["mean"] = float(np.mean(list(d.values())))
    return {"calibrated": cal, "gold_logprob": gold_lp}


def confusion_title(name: str) -> str:
    """``teacher:teacher`` -> ``teacher``; other ``family:variant`` names stay."""
    fam, _, var = name.partition(":")
    return fam if var == fam else name


def plot_confusions(cms: dict[str, np.ndarray], labels: list[str], path: Path,
                    ncols: int = 4) -> dict[str, Any]:
    """One confusion-matrix panel per predictor in a grid (at most ``ncols`` wide); each title
    says its accuracy and how many rows it was evaluated on; cell counts are white on dark
    cells, black on light ones. Returns the figure size in pixels and each panel's title
    and (count, text colour) per cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(cms))
    cols = min(ncols, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.7 * cols, 2.9 * rows), squeeze=False)
    cmap = plt.get_cmap("Blues")
    titles, text_colours = [], []
    for ax, (name, cm) in zip(axes.flat, cms.items()):
        cm = np.asarray(cm)
        vmax = max(1, int(cm.max()))
        ax.imshow(cm, cmap=cmap, vmin=0, vmax=vmax)
        for (i, j), v in np.ndenumerate(cm):
            r, g, b, _ = cmap(v / vmax)
            lum = 0.2126 * r + 0.7152 * g + 0.0722 * b
            text_colours.append((int(v), "white" if lum < 0.5 else "black"))
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                    color=text_colours[-1][1])
        total = int(cm.sum())
        titles.append(f"{confusion_title(name)}\nacc {np.trace(cm) / max(1, total):.3f}, "
                      f"{total} rows")
        ax.set_title(titles[-1], fontsize=8)
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("predicted", fontsize=7)
        ax.set_ylabel("true", fontsize=7)
    for ax in list(axes.flat)[len(cms):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    size = tuple(int(round(x * 110)) for x in fig.get_size_inches())  # as saved
    plt.close(fig)
    return {"size": size, "titles": titles, "grid": (rows, cols), "text_colours": text_colours}
