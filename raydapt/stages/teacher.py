"""Ray Data stages that run the teacher LLM and the FAISS data store.

Each stage is a callable class for ``Dataset.map_batches(..., compute=ActorPoolStrategy(...))``:
the model / index is loaded once per actor in ``__init__``. Input and output batches are pandas
DataFrames that always carry ``id``; rows that fail come back with an ``_error`` reason (see
:func:`raydapt.stages.common.run_isolating_failures`) and the recipe routes them to rejects.

- :class:`TeacherScore`: prompt T(x) (optionally with demonstrations) -> ``hidden`` [H] (the key
  / teacher representation) and ``llm_logp`` [C] (verbalizer log-probs), ``prompt_tokens``.
- :class:`KnnSearch`: ``hidden`` -> ``nbr_ids`` [k], ``nbr_dist`` [k], ``p_knn`` [C].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raydapt.engines.factory import make_engine
from raydapt.stages.annotate import build_prompt, fit_demos, knn_distribution
from raydapt.stages.common import ERROR_COLUMN, Stage


class TeacherScore(Stage):
    """Score prompts with the teacher LLM.

    Args:
        engine: engine kwargs (``backend``, ``model``, ``max_length``, ``dtype``, ``chat``...).
        label_words: verbalizer words in label order.
        template: query prompt with ``{text}``.
        text_max_tokens: tokens of the query text kept.
        text_truncation: which tokens of a long text (query or demonstration) are kept:
            ``head``, ``tail`` or ``head_tail``.
        demo_template / demo_max_tokens / demo_texts / demo_labels: when the batch has a
            ``demo_ids`` column (nearest first), each row's demonstrations are looked up in
            ``demo_texts`` (id -> text) and ``demo_labels`` (id -> label word), each truncated
            to ``demo_max_tokens`` and fitted before the query (see :meth:`prompts`).
        keep_hidden: return the ``hidden`` column (the key / teacher representation).
        micro_batch: score a batch in engine calls of this many prompts, shortest first (the
            output keeps the batch's row order), so a large batch in file order pads as little
            as one sorted by length; None: the whole batch in one call.
        stage: name used in reject reasons and metrics.
        telemetry: extra metric tags, ``{"method": ..., "run": ...}`` (see raydapt.core.telemetry).
    """

    def __init__(
        self, *, engine: dict[str, Any], label_words: list[str], template: str,
        text_max_tokens: int, demo_template: str = "", demo_max_tokens: int = 64,
        text_truncation: str = "head",
        demo_texts: dict[str, str] | None = None, demo_labels: dict[str, str] | None = None,
        keep_hidden: bool = True, micro_batch: int | None = None, stage: str = "teacher",
        telemetry: dict[str, str] | None = None,
    ) -> None:
        super().__init__(stage, telemetry)
        self.engine = make_engine(engine, label_words)
        self.template = template
        self.text_max_tokens = text_max_tokens
        self.text_truncation = text_truncation
        self.demo_template = demo_template
        self.demo_max_tokens = demo_max_tokens
        self.demo_texts = demo_texts or {}
        self.demo_labels = demo_labels or {}
        self._demo_cache: dict[str, tuple[str, int]] = {}
        self.keep_hidden = keep_hidden
        self.micro_batch = micro_batch

    def _demo(self, did: str) -> tuple[str, int]:
        """One demonstration, its text truncated on its own, rendered; and its token count."""
        if did not in self._demo_cache:
            text = self.engine.truncate(self.demo_texts[did], self.demo_max_tokens,
                                        self.text_truncation)
            d = build_prompt("", "", demos=[(text, self.demo_labels[did])],
                             demo_template=self.demo_template)
            self._demo_cache[did] = (d, self.engine.count_tokens([d])[0])
        return self._demo_cache[did]

    def prompts(self, batch: pd.DataFrame) -> list[str]:
        """The prompt of each row. With demonstrations (``demo_ids``, nearest first) the query
        (instruction + truncated text + answer cue) is never cut: demonstrations are added
        nearest first while they fit in the engine's ``max_length`` and rendered farthest first,
        so the nearest sits next to the query (:func:`~raydapt.stages.annotate.fit_demos`)."""
        out = []
        has_demos = "demo_ids" in batch.columns
        for i, text in enumerate(batch["text"].tolist()):
            query = build_prompt(self.template, self.engine.truncate(
                text, self.text_max_tokens, self.text_truncation))
            if has_demos:
                demos = [self._demo(str(d)) for d in batch["demo_ids"].iloc[i]]
                keep = fit_demos(self.engine.prompt_tokens(query), [t for _, t in demos],
                                 self.engine.max_length)
                query = "".join(demos[j][0] for j in keep) + query
            out.append(query)
        return out

    def _score(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(label log-probs, prompt tokens, hidden or None) of ``prompts``, in their order:
        one engine call, or micro-batches of the prompts sorted by length."""
        mb = self.micro_batch
        if not mb or len(prompts) <= mb:
            res = self.engine.score(prompts)
            return res.label_logprobs, res.prompt_tokens, res.hidden
        order = np.argsort([len(p) for p in prompts], kind="stable")
        parts = [self.engine.score([prompts[i] for i in order[j:j + mb]])
                 for j in range(0, len(prompts), mb)]
        back = np.argsort(order)  # sorted position of each original row
        hidden = None if any(r.hidden is None for r in parts) else \
            np.concatenate([r.hidden for r in parts])[back]
        return (np.concatenate([r.label_logprobs for r in parts])[back],
                np.concatenate([r.prompt_tokens for r in parts])[back], hidden)

    def process(self, batch: pd.DataFrame) -> pd.DataFrame:
        logp, tokens, hidden = self._score(self.prompts(batch))
        out = {"id": batch["id"].tolist(), "llm_logp": list(logp.astype(np.float32)),
               "prompt_tokens": tokens.astype(np.int64)}
        if self.keep_hidden:
            if hidden is None:
                raise RuntimeError("this engine gives no hidden states; use backend hf for keys")
            out["hidden"] = list(hidden.astype(np.float32))
        return pd.DataFrame(out)

    def counts(self, out: pd.DataFrame, good: int) -> dict[str, int]:
        # a batch whose every row failed has no prompt_tokens column
        if "prompt_tokens" not in out:
            return {"tokens": 0}
        return {"tokens": int(pd.to_numeric(out["prompt_tokens"], errors="coerce")
                              .fillna(0).sum())}

    def _columns_of_failed_batch(self, out: pd.DataFrame) -> pd.DataFrame:
        """A batch whose every row failed has only ``id`` and ``_error``: give it the columns of
        a scored batch (NaN arrays of the right width, 0 tokens), so its block has the schema
        of the others and its rows reach the recipe as reject records. The widths come from
        one short probe prompt, scored once per actor."""
        if "llm_logp" in out.columns or not len(out):
            return out
        if not hasattr(self, "_widths"):
            probe = self.engine.score(["probe"])
            self._widths = (probe.label_logprobs.shape[1],
                            None if probe.hidden is None else probe.hidden.shape[1])
        n_labels, width = self._widths
        cols = {"id": out["id"].tolist(),
                "llm_logp": [np.full(n_labels, np.nan, np.float32) for _ in range(len(out))],
                "prompt_tokens": np.zeros(len(out), np.int64)}
        if self.keep_hidden and width is not None:
            cols["hidden"] = [np.full(width, np.nan, np.float32) for _ in range(len(out))]
        return pd.DataFrame({**cols, ERROR_COLUMN: out[ERROR_COLUMN].tolist()})

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        out = super().__call__(batch)
        if len(out) and (out[ERROR_COLUMN] != "").all():
            try:
                out = self._columns_of_failed_batch(out)
            except Exception:  # the engine cannot score at all: the rows stay rejects
                pass
        return out


# --------------------------------------------------------------------------------------------
# FAISS data store
# --------------------------------------------------------------------------------------------


def build_index(keys: np.ndarray, *, kind: str = "flat", nlist: int | None = None):
    """A FAISS L2 index over keys [N, H] float32. ``flat`` (exact) up to ~1M keys; ``ivf`` /
    ``hnsw`` above (approximate)."""
    import faiss

    keys = np.ascontiguousarray(keys, dtype=np.float32)
    n, dim = keys.shape
    if kind == "flat":
        index = faiss.IndexFlatL2(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32)
    elif kind == "ivf":
        nlist = nlist or max(1, int(4 * np.sqrt(n)))
        quant = faiss.IndexFlatL2(dim)
        index = faiss.IndexIVFFlat(quant, dim, nlist)
        index.train(keys)
        index.nprobe = min(nlist, 16)
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    index.add(keys)
    return index


def save_store(path: Path, index, ids: list[str], labels: np.ndarray) -> None:
    """Write the data store: ``index.faiss`` + ``values.parquet`` (row -> id, y)."""
    import faiss

    path.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(path / "index.faiss"))
    pd.DataFrame({"id": ids, "y": np.asarray(labels, dtype=np.int64)}).to_parquet(
        path / "values.parquet")


def store_neighbours(keys: np.ndarray, queries: np.ndarray, k: int, *, kind: str = "flat"
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Search a store of ``keys`` [N, H] for ``queries`` [M, H] (rows of another domain) as
    :class:`KnnSearch` does: distances [M, k] (float32, as the store reports them, squared L2)
    and row indices [M, k], nearest first."""
    index = build_index(keys, kind=kind)
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(keys)))


def loo_neighbours(keys: np.ndarray, k: int, *, kind: str = "flat"
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out search of a store with its own keys [N, H]: each row's k nearest OTHER rows.
    Returns distances [N, k] (float32, as the store reports them) and row indices [N, k]."""
    index = build_index(keys, kind=kind)
    k = min(k, len(keys) - 1)
    d, idx = index.search(np.ascontiguousarray(keys, dtype=np.float32), k + 1)
    keep = idx != np.arange(len(keys))[:, None]
    keep[keep.sum(1) > k, -1] = False  # self not found among k + 1 (duplicates): drop the last
    return (np.stack([r[m][:k] for r, m in zip(d, keep)]),
            np.stack([r[m][:k] for r, m in zip(idx, keep)]))


class KnnSearch(Stage):
    """Retrieve k nearest source keys for each row's ``hidden`` and form p_kNN."""

    def __init__(self, *, store: str, k: int, num_classes: int, tau: float,
                 distance_norm: str, exclude_self: bool = False, stage: str = "knn",
                 telemetry: dict[str, str] | None = None) -> None:
        import faiss

        super().__init__(stage, telemetry)
        self.index = faiss.read_index(str(Path(store) / "index.faiss"))
        vals = pd.read_parquet(Path(store) / "values.parquet")
        self.ids = vals["id"].to_numpy()
        self.y = vals["y"].to_numpy()
        self.k, self.C, self.tau, self.norm = k, num_classes, tau, distance_norm
        self.exclude_self = exclude_self

    def process(self, batch: pd.DataFrame) -> pd.DataFrame:
        q = np.stack(batch["hidden"].to_numpy()).astype(np.float32)
        kk = self.k + 1 if self.exclude_self else self.k
        d, idx = self.index.search(q, min(kk, self.index.ntotal))
        if self.exclude_self:  # drop the row itself when searching the store with its own keys
            keep = self.ids[np.clip(idx, 0, None)] != batch["id"].to_numpy()[:, None]
            d = np.stack([r[m][: self.k] for r, m in zip(d, keep)])
            idx = np.stack([r[m][: self.k] for r, m in zip(idx, keep)])
        labels = np.where(idx >= 0, self.y[np.clip(idx, 0, None)], -1)
        p = knn_distribution(d, labels, self.C, tau=self.tau, distance_norm=self.norm)
        return pd.DataFrame({
            "id": batch["id"].tolist(),
            "nbr_ids": [list(self.ids[np.clip(r, 0, None)]) for r in idx],
            "nbr_dist": list(d.astype(np.float32)),
            "p_knn": list(p),
        })
