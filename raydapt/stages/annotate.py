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

from typing import Any, Literal

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



# -- label-free, target-aware choice of k / tau / lam (annotate.select_on_target) -----------

TARGET_RULES = ("agreement", "iwcv", "far_source", "reverse", "entropy")


def _binary_margin(acc: float) -> float:
    return 2.0 * acc - 1.0


def estimated_knn_accuracy(agree_t: float, agree_s: float, acc_knn_s: float) -> float:
    """Estimate kNN's target accuracy from how often its argmax agrees with the calibrated
    LLM's on the target rows (``agree_t``) and on the source rows (``agree_s``, leave-one-out
    kNN), and kNN's source accuracy ``acc_knn_s``. Two classes: with the two read-outs' errors
    as dependent on the target as on the source, 2A - 1 = c (2 a_kNN - 1)(2 a_LLM - 1) on both
    domains, so with a_LLM taken equal on both, 2 a_kNN,t - 1 = (2 A_t - 1)(2 a_kNN,s - 1) /
    (2 A_s - 1). Clipped to [0, 1]. For more classes the same formula is a heuristic."""
    den = _binary_margin(agree_s)
    if abs(den) < 1e-9:
        return 0.5
    m = _binary_margin(agree_t) * _binary_margin(acc_knn_s) / den
    return float(np.clip(0.5 + m / 2.0, 0.0, 1.0))


def _logit(a: float) -> float:
    a = float(np.clip(a, 0.5, 1 - 1e-3))
    return float(np.log(a / (1 - a)))


def _standardise(*xs: np.ndarray) -> list[np.ndarray]:
    allx = np.concatenate(xs).astype(np.float64)
    mu, sd = allx.mean(0), allx.std(0) + 1e-6
    return [(x - mu) / sd for x in xs]


def domain_weights(src_keys: np.ndarray, tgt_keys: np.ndarray, *, seed: int = 0,
                   clip_quantile: float = 0.95) -> np.ndarray:
    """Importance weights p_target(x) / p_source(x) of the source rows [N] from a domain
    classifier (logistic regression on the standardised keys, source vs target rows; each
    source row scored by a 5-fold cross-fitted model), clipped at their ``clip_quantile`` and
    normalised to mean 1 (Sugiyama et al. 2007; You et al. 2019, deep embedded validation)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    s, t = _standardise(src_keys, tgt_keys)
    x = np.concatenate([s, t])
    d = np.r_[np.zeros(len(s)), np.ones(len(t))]
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    p = cross_val_predict(LogisticRegression(C=0.01, max_iter=2000), x, d, cv=folds,
                          method="predict_proba")[: len(s), 1]
    p = np.clip(p, 1e-4, 1 - 1e-4)
    w = p / (1 - p) * len(s) / len(t)
    w = np.minimum(w, np.quantile(w, clip_quantile))
    return w / w.mean()


def reverse_validation(pseudo: np.ndarray, tgt_keys: np.ndarray, src_keys: np.ndarray,
                       y_src: np.ndarray, num_classes: int) -> float:
    """Reverse validation (Zhong et al. 2010): fit a logistic-regression probe on the target
    keys with the pseudo-labels ``pseudo`` and return its accuracy on the labelled source rows.
    A single-class labelling scores the source's share of that class."""
    from sklearn.linear_model import LogisticRegression

    if len(np.unique(pseudo)) < 2:
        return float((np.asarray(y_src) == pseudo[0]).mean())
    t, s = _standardise(tgt_keys, src_keys)
    clf = LogisticRegression(C=0.01, max_iter=2000).fit(t, pseudo)
    return float((clf.predict(s) == np.asarray(y_src)).mean())


def _row_distance(d: np.ndarray) -> np.ndarray:
    """A row's typical neighbour distance: the median over its neighbours."""
    return np.median(np.asarray(d, dtype=np.float64), axis=1)


def select_on_target(
    src_dist: np.ndarray, src_labels: np.ndarray, p_src: np.ndarray, y_src: np.ndarray,
    tgt_dist: np.ndarray, tgt_labels: np.ndarray, p_tgt: np.ndarray, *,
    src_keys: np.ndarray, tgt_keys: np.ndarray, rule: str, ks: list[int], taus: list[float],
    lams: list[float], distance_norm: str = "median", seed: int = 0,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Choose k, tau and lam for the TARGET from its unlabelled rows, the labelled source and
    the models (no target label is an argument).

    ``src_dist`` / ``src_labels`` [Ns, >= max(ks)]: the source rows' leave-one-out neighbours
    in the store; ``p_src`` [Ns, C]: their LLM distribution calibrated on themselves; ``y_src``
    their labels. ``tgt_dist`` / ``tgt_labels`` [Nt, >= max(ks)]: the unlabelled target rows'
    neighbours in the store (labels = the neighbours' source labels); ``p_tgt``: their LLM
    distribution calibrated on themselves; ``src_keys`` / ``tgt_keys``: the teacher keys.

    Rules (each scores every (k, tau, lam); the best score wins, first in grid order on ties):

    - ``agreement``: kNN's target accuracy a_t estimated from its agreement with the LLM on
      the target against the same on the source (:func:`estimated_knn_accuracy`); (k, tau)
      with the highest a_t, and the lam nearest the naive-Bayes weight of kNN,
      logit(a_t) / (logit(a_t) + logit(a_LLM,s)) (0 when a_t <= 0.5);
    - ``iwcv``: source leave-one-out accuracy importance-weighted to the target by a domain
      classifier (:func:`domain_weights`);
    - ``far_source``: source leave-one-out accuracy on the source rows whose neighbours are
      as far as the typical target row's (median neighbour distance >= the target rows'
      median; at least a tenth of the source rows, the farthest);
    - ``reverse``: reverse validation (:func:`reverse_validation`) of the target pseudo-labels;
    - ``entropy``: minus the mean entropy of p_T over the target rows.

    Returns the best row and the whole curve; each row holds k, tau, lam, score."""
    if rule not in TARGET_RULES:
        raise ValueError(f"unknown select_on_target rule {rule!r}; one of {TARGET_RULES}")
    y_src = np.asarray(y_src)
    C = p_src.shape[1]
    llm_s = p_src.argmax(1)
    llm_t = p_tgt.argmax(1)
    acc_llm_s = float((llm_s == y_src).mean())
    w = None
    if rule == "iwcv":
        w = domain_weights(src_keys, tgt_keys, seed=seed)
    if rule == "far_source":
        kk = max(ks)
        ds, dt = _row_distance(src_dist[:, :kk]), _row_distance(tgt_dist[:, :kk])
        far = ds >= np.median(dt)
        if far.sum() < max(1, len(ds) // 10):
            far = ds >= np.sort(ds)[::-1][max(1, len(ds) // 10) - 1]
        w = far.astype(np.float64)
    rv_cache: dict[bytes, float] = {}
    curve: list[dict[str, Any]] = []
    for k in ks:
        for tau in taus:
            pk_s = knn_distribution(src_dist[:, :k], src_labels[:, :k], C, tau=tau,
                                    distance_norm=distance_norm)
            pk_t = knn_distribution(tgt_dist[:, :k], tgt_labels[:, :k], C, tau=tau,
                                    distance_norm=distance_norm)
            extra: dict[str, Any] = {}
            if rule == "agreement":
                acc_knn_s = float((pk_s.argmax(1) == y_src).mean())
                a_t = estimated_knn_accuracy(float((pk_t.argmax(1) == llm_t).mean()),
                                             float((pk_s.argmax(1) == llm_s).mean()), acc_knn_s)
                wk, wl = _logit(a_t), _logit(acc_llm_s)
                lam_star = wk / (wk + wl) if wk + wl > 0 else 0.0
                extra = {"knn_acc_source": acc_knn_s, "knn_acc_target_est": a_t,
                         "lam_star": lam_star}
            for lam in lams:
                if rule == "agreement":  # lam's own score: how near it is to lam_star
                    score = -abs(lam - extra["lam_star"])
                elif rule in ("iwcv", "far_source"):
                    hit = (mix(pk_s, p_src, lam).argmax(1) == y_src).astype(np.float64)
                    score = float((hit * w).sum() / w.sum())
                elif rule == "reverse":
                    pseudo = mix(pk_t, p_tgt, lam).argmax(1)
                    key = pseudo.astype(np.int8).tobytes()
                    if key not in rv_cache:
                        rv_cache[key] = reverse_validation(pseudo, tgt_keys, src_keys, y_src, C)
                    score = rv_cache[key]
                else:  # entropy
                    pt = np.clip(mix(pk_t, p_tgt, lam).astype(np.float64), 1e-12, 1)
                    score = float((pt * np.log(pt)).sum(1).mean())
                curve.append({"k": k, "tau": tau, "lam": lam, "score": float(score), **extra})
    if rule == "agreement":  # (k, tau) by the estimated kNN accuracy, then lam nearest lam_star
        best = max(curve, key=lambda r: (r["knn_acc_target_est"], r["score"]))
    else:
        best = max(curve, key=lambda r: r["score"])
    return best, curve


# -- the target's class prior without labels (annotate.calibrate_prior: em / bbse) ------------

PRIOR_ESTIMATES = ("em", "bbse")


def _fit_posterior(p_src: np.ndarray, y_src: np.ndarray):
    """Multinomial logistic regression on the source rows' LLM log-probabilities: a map from
    p_LLM to posteriors calibrated on the labelled source (bias-corrected calibration,
    Alexandari et al. 2020). Returns a function [M, C] -> [M, C]."""
    from sklearn.linear_model import LogisticRegression

    def feats(p):
        return np.log(np.clip(np.asarray(p, dtype=np.float64), 1e-30, None))

    clf = LogisticRegression(C=1.0, max_iter=2000).fit(feats(p_src), y_src)
    C = p_src.shape[1]

    def post(p):
        q = np.zeros((len(p), C))
        q[:, clf.classes_] = clf.predict_proba(feats(p))
        return q
    return post


def estimate_prior(p_src: np.ndarray, y_src: np.ndarray, p_tgt: np.ndarray, *,
                   method: str = "em", iters: int = 1000, tol: float = 1e-8) -> np.ndarray:
    """The target's class prior [C] from its unlabelled rows' LLM distributions ``p_tgt``
    [N, C] and the labelled source rows' (``p_src``, ``y_src``); no target label.

    - ``em`` (Saerens et al. 2002): posteriors calibrated on the source
      (:func:`_fit_posterior`, under the source prior pi_s), then EM on the target rows:
      pi <- mean_i normalise(pi / pi_s * post_i) until it stops moving;
    - ``bbse`` (black-box shift estimation, Lipton et al. 2018): the hard classifier
      argmax(post) has source confusion matrix M[i, j] = P_s(yhat = i, y = j); its target
      prediction rates mu solve M w = mu, and pi = w * pi_s (clipped at 0, renormalised).

    Both assume label shift (p(x | y) the same on both domains)."""
    y_src = np.asarray(y_src)
    C = p_src.shape[1]
    pi_s = np.bincount(y_src, minlength=C).astype(np.float64)
    pi_s = np.clip(pi_s / pi_s.sum(), 1e-6, None)
    post = _fit_posterior(p_src, y_src)
    q = post(p_tgt)
    if method == "em":
        pi = pi_s.copy()
        for _ in range(iters):
            r = q * (pi / pi_s)
            r /= r.sum(1, keepdims=True)
            new = r.mean(0)
            if np.abs(new - pi).max() < tol:
                pi = new
                break
            pi = new
    elif method == "bbse":
        yhat_s = post(p_src).argmax(1)
        M = np.zeros((C, C))
        np.add.at(M, (yhat_s, y_src), 1.0)
        M /= len(y_src)
        mu = np.bincount(q.argmax(1), minlength=C) / len(q)
        w = np.linalg.lstsq(M, mu, rcond=None)[0]
        pi = np.clip(w, 0, None) * pi_s
    else:
        raise ValueError(f"unknown prior estimate {method!r}; one of {PRIOR_ESTIMATES}")
    pi = np.clip(pi, 0, None)
    return pi / pi.sum()
