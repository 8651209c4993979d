"""Selectors behind one interface: which pool samples S (|S| = N) join the domain set D.

Each selector reads what the recipe's stages computed (:class:`SelectionInputs`) and returns the
selected ids with their rank and score (:meth:`Selector.select`)::

    inputs = SelectionInputs(pool_ids=..., votes=..., vote_sim=..., scores={"ntk": ..., "less": ...})
    sel = SELECTORS["ntk"](seed=0).select(inputs, n=9000)   # DataFrame id, rank, score

- ``random``    N pool ids in a seeded order (a hash of seed and id: independent of row order).
- ``embedding`` stage 1 alone: the N pool samples with the most kNN votes from the domain
  (ties broken by the summed cosine similarity of the votes, then by id order).
- ``ntk``       stage 2: the N highest NTK scores s_j = ⟨ḡ_D, g(c_j)⟩ among the stage-1 candidates.
- ``less``      the N highest LESS scores (max cosine of the Adam-preconditioned loss gradient to
  the domain's loss gradients) among the same candidates.

Trivial baselines (no model; they read the rendered text, ``SelectionInputs.pool_text`` /
``domain_text``: (prompt, response) pairs as :func:`raydapt.data.qa.render` writes them, before
the chat template). A model-based selector is worth its cost only where it beats these:

- ``format``    a regex layout rule fitted on D: per row, the number of option lines, whether the
  answer is a single (bracketed) letter, whether the response is the answer alone (no
  rationale), the number of ``=`` signs in the response and the share of digits in the prompt;
  score = minus the L1 distance, in pool-std units, to D's mean of those features.
- ``length``    a diagonal Gaussian on D's log prompt and log response word counts; score = its
  log-density.
- ``tfidf``     lexical similarity: TF-IDF (scikit-learn, word 1-2-grams, sublinear tf) of
  prompt + response fitted on D ∪ pool; score = cosine to the mean of D's normalised vectors.

The vote counting itself (FAISS kNN on mean-pooled hidden states) is :func:`knn_votes`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pandas as pd

from raydapt.data.readers import unit_hash


@dataclass
class SelectionInputs:
    """Stage outputs the selectors read.

    Attributes:
        pool_ids: [Nc] ids of the (subsampled) pool.
        votes: [Nc] kNN votes from the domain samples (stage 1), or None.
        vote_sim: [Nc] summed cosine similarity of those votes (tie-break), or None.
        scores: {selector: Series id → score} for the stage-2 candidates (ntk, less).
        pool_text: [Nc] (prompt, response) per pool id (the trivial selectors), or None.
        domain_text: [Nd] (prompt, response) of D (the trivial selectors fit on them), or None.
    """

    pool_ids: np.ndarray
    votes: np.ndarray | None = None
    vote_sim: np.ndarray | None = None
    scores: dict[str, pd.Series] = field(default_factory=dict)
    pool_text: list[tuple[str, str]] | None = None
    domain_text: list[tuple[str, str]] | None = None


def _frame(ids: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"id": ids, "rank": np.arange(len(ids), dtype=np.int64),
                         "score": np.asarray(scores, dtype=np.float64)})


class Selector:
    """Base: ``select(inputs, n)`` → DataFrame ``id``, ``rank`` (0 = best), ``score``."""

    name: ClassVar[str] = ""

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = seed

    def select(self, inputs: SelectionInputs, n: int) -> pd.DataFrame:  # pragma: no cover
        raise NotImplementedError


class RandomSelector(Selector):
    name = "random"

    def select(self, inputs: SelectionInputs, n: int) -> pd.DataFrame:
        u = unit_hash(list(inputs.pool_ids), seed=self.seed, salt="random-select")
        order = np.argsort(u, kind="stable")[:n]
        return _frame(np.asarray(inputs.pool_ids)[order], u[order])


class EmbeddingSelector(Selector):
    name = "embedding"

    def select(self, inputs: SelectionInputs, n: int) -> pd.DataFrame:
        if inputs.votes is None:
            raise ValueError("the embedding selector needs stage-1 votes")
        sim = inputs.vote_sim if inputs.vote_sim is not None else np.zeros(len(inputs.votes))
        order = np.lexsort((np.arange(len(sim)), -sim, -inputs.votes))[:n]
        return _frame(np.asarray(inputs.pool_ids)[order], inputs.votes[order])


class ScoreSelector(Selector):
    """Top N by a stage-2 score (higher = better; ties → first in candidate order)."""

    def select(self, inputs: SelectionInputs, n: int) -> pd.DataFrame:
        s = inputs.scores.get(self.name)
        if s is None:
            raise ValueError(f"the {self.name} selector needs its stage-2 scores")
        s = s[np.isfinite(s.to_numpy())]
        order = np.argsort(-s.to_numpy(), kind="stable")[:n]
        return _frame(s.index.to_numpy()[order], s.to_numpy()[order])


class NTKSelector(ScoreSelector):
    name = "ntk"


class LESSSelector(ScoreSelector):
    name = "less"


_OPTION_LINE = re.compile(r"^\s*(?:-\s*)?(?:\([A-J]\)|[A-J][.):])\s|^\s*-\s+\S", re.M)
_LETTER_ANSWER = re.compile(r"answer is \(?[A-J]\)?\.?\s*$")
_ANSWER_ONLY = re.compile(r"^\s*The answer is [^\n]*$")


def layout_features(text: list[tuple[str, str]]) -> np.ndarray:
    """[n, 5] regex layout features of rendered (prompt, response) pairs: option lines in the
    prompt, single-letter answer, response = the answer sentence alone, ``=`` signs in the
    response, share of digits among the prompt's characters."""
    out = np.zeros((len(text), 5))
    for i, (p, r) in enumerate(text):
        out[i] = (len(_OPTION_LINE.findall(p)), bool(_LETTER_ANSWER.search(r.strip())),
                  bool(_ANSWER_ONLY.match(r.strip())), r.count("="),
                  sum(c.isdigit() for c in p) / max(len(p), 1))
    return out


def length_features(text: list[tuple[str, str]]) -> np.ndarray:
    """[n, 2] log(1 + words) of prompt and response."""
    return np.log1p(np.array([[len(p.split()), len(r.split())] for p, r in text], dtype=float))


class TextSelector(Selector):
    """Top N of a score over the whole pool computed from the rendered text alone."""

    def pool_scores(self, inputs: SelectionInputs) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def select(self, inputs: SelectionInputs, n: int) -> pd.DataFrame:
        if inputs.pool_text is None or inputs.domain_text is None:
            raise ValueError(f"the {self.name} selector needs pool_text and domain_text")
        if len(inputs.pool_text) != len(inputs.pool_ids):
            raise ValueError("pool_text must align with pool_ids")
        sc = self.pool_scores(inputs)
        order = np.argsort(-sc, kind="stable")[:n]
        return _frame(np.asarray(inputs.pool_ids)[order], sc[order])


class FormatSelector(TextSelector):
    name = "format"

    def pool_scores(self, inputs: SelectionInputs) -> np.ndarray:
        d, c = layout_features(inputs.domain_text), layout_features(inputs.pool_text)
        sd = c.std(axis=0)
        sd[sd == 0] = 1.0
        return -np.abs((c - d.mean(axis=0)) / sd).sum(axis=1)


class LengthSelector(TextSelector):
    name = "length"

    def pool_scores(self, inputs: SelectionInputs) -> np.ndarray:
        d, c = length_features(inputs.domain_text), length_features(inputs.pool_text)
        sd = np.maximum(d.std(axis=0), 1e-3)
        return -(((c - d.mean(axis=0)) / sd) ** 2).sum(axis=1)


class TfidfSelector(TextSelector):
    name = "tfidf"

    def pool_scores(self, inputs: SelectionInputs) -> np.ndarray:
        from sklearn.feature_extraction.text import TfidfVectorizer

        docs = [f"{p}\n{r}" for p, r in (*inputs.domain_text, *inputs.pool_text)]
        x = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit_transform(docs)
        nd = len(inputs.domain_text)
        centroid = np.asarray(x[:nd].mean(axis=0)).ravel()  # rows are L2-normalised
        centroid /= max(np.linalg.norm(centroid), 1e-12)
        return np.asarray(x[nd:] @ centroid).ravel()


SELECTORS: dict[str, type[Selector]] = {
    c.name: c for c in (RandomSelector, EmbeddingSelector, NTKSelector, LESSSelector,
                        FormatSelector, LengthSelector, TfidfSelector)}
#: the selectors that need no model (benchmarks/ntk_needles.py reports them beside the others)
TRIVIAL = ("format", "length", "tfidf")


def knn_votes(domain_emb: np.ndarray, pool_emb: np.ndarray, *, k: int, index: str = "flat",
              **index_opts) -> tuple[np.ndarray, np.ndarray]:
    """Each domain sample votes for its k nearest pool samples by cosine (FAISS inner product on
    L2-normalised vectors).

    Args:
        domain_emb: [Nd, H] domain embeddings.
        pool_emb: [Nc, H] pool embeddings.
        k: neighbours per domain sample (capped at Nc).
        index: ``flat`` (exact, FAISS IndexFlatIP) or ``ivf`` / ``hnsw`` (approximate FAISS
            indexes for large pools; ``index_opts``: nlist, nprobe, hnsw_m, train_rows — see
            :func:`raydapt.select.votes.knn_votes_streaming`).

    Returns:
        votes [Nc] int64 (how many domain samples have c among their k nearest) and vote_sim
        [Nc] float64 (the sum of those cosine similarities).
    """
    import faiss

    if index != "flat":
        from raydapt.select.votes import knn_votes_streaming

        pos = np.arange(len(pool_emb))
        v = knn_votes_streaming(domain_emb, [(pos, pool_emb)], k=k, index=index,
                                **index_opts)  # type: ignore[arg-type]
        votes = np.zeros(len(pool_emb), dtype=np.int64)
        vote_sim = np.zeros(len(pool_emb), dtype=np.float64)
        at = v["id"].to_numpy(dtype=np.int64)
        votes[at], vote_sim[at] = v["votes"].to_numpy(), v["vote_sim"].to_numpy()
        return votes, vote_sim
    d = np.ascontiguousarray(domain_emb, dtype=np.float32).copy()
    c = np.ascontiguousarray(pool_emb, dtype=np.float32).copy()
    if d.ndim != 2 or c.ndim != 2 or d.shape[1] != c.shape[1]:
        raise ValueError(f"shape mismatch: domain {d.shape}, pool {c.shape}")
    faiss.normalize_L2(d)
    faiss.normalize_L2(c)
    index = faiss.IndexFlatIP(c.shape[1])
    index.add(c)
    sims, idx = index.search(d, min(k, len(c)))
    votes = np.bincount(idx.ravel(), minlength=len(c)).astype(np.int64)
    vote_sim = np.bincount(idx.ravel(), weights=sims.ravel().astype(np.float64), minlength=len(c))
    return votes, vote_sim
