"""Top-N selection over a stream of scored blocks, in O(N) memory.

:class:`StreamingTopN` keeps the best ``n`` (score, position, id) seen so far: each block is cut
to its own best ``n`` (a sort of the block only), then merged with the running best. The result
equals a full sort of every score — higher first, ties to the earlier row in stream order, NaN /
inf scores left out — i.e. :class:`raydapt.select.selectors.ScoreSelector` on the concatenated
scores, without ever holding them::

    top = StreamingTopN(9000)
    for tbl in out.iter_tables(["id", "score", "_error", "_reject"]):   # one shard at a time
        top.update_table(tbl)
    sel = top.result()   # DataFrame id, rank, score
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd


class StreamingTopN:
    """The ``n`` highest scores of a stream (ties: earlier first), in O(n + block) memory."""

    def __init__(self, n: int) -> None:
        if n < 0:
            raise ValueError("n must be >= 0")
        self.n = n
        self.seen = 0
        self._ids = np.empty(0, dtype=object)
        self._scores = np.empty(0, dtype=np.float64)
        self._pos = np.empty(0, dtype=np.int64)
        self._tie = np.empty(0, dtype=np.float64)

    def update(self, ids: Iterable, scores: Iterable[float],
               tiebreak: Iterable[float] | None = None) -> None:
        """Add one block (ids and scores in stream order). ``tiebreak``: a second score that
        orders equal scores (higher first) before the stream order, e.g. the summed
        similarity of equal vote counts (the embedding selector's order)."""
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=object)
        s = np.asarray(scores, dtype=np.float64)
        if len(ids) != len(s):
            raise ValueError(f"{len(ids)} ids, {len(s)} scores")
        t = np.zeros(len(s)) if tiebreak is None else np.asarray(tiebreak, dtype=np.float64)
        if len(t) != len(s):
            raise ValueError(f"{len(s)} scores, {len(t)} tie-break values")
        pos = self.seen + np.arange(len(s), dtype=np.int64)
        self.seen += len(s)
        ok = np.isfinite(s)
        ids, s, pos, t = ids[ok], s[ok], pos[ok], t[ok]
        if len(s) > self.n:  # the block's own best n (ties by tie-break, then position)
            keep = np.lexsort((pos, -t, -s))[: self.n]
            ids, s, pos, t = ids[keep], s[keep], pos[keep], t[keep]
        ids = np.concatenate([self._ids, ids])
        s = np.concatenate([self._scores, s])
        pos = np.concatenate([self._pos, pos])
        t = np.concatenate([self._tie, t])
        keep = np.lexsort((pos, -t, -s))[: self.n]
        self._ids, self._scores, self._pos, self._tie = ids[keep], s[keep], pos[keep], t[keep]

    def update_table(self, tbl, *, column: str = "score") -> None:
        """Add a stage output block (pyarrow Table or DataFrame): rows with an ``_error`` or a
        ``_reject`` count for the stream order but are never selected."""
        df = tbl if isinstance(tbl, pd.DataFrame) else tbl.to_pandas()
        s = df[column].to_numpy(dtype=np.float64, na_value=np.nan) if column in df else \
            np.full(len(df), np.nan)
        for c in ("_error", "_reject"):
            if c in df:
                s = np.where(df[c].fillna("").to_numpy() != "", np.nan, s)
        self.update(df["id"].to_numpy(dtype=object), s)

    def result(self) -> pd.DataFrame:
        """``id``, ``rank`` (0 = best), ``score``: the selectors' frame."""
        return pd.DataFrame({"id": self._ids, "rank": np.arange(len(self._ids), dtype=np.int64),
                             "score": self._scores})


def top_n_of_tables(tables: Iterable, n: int, *, column: str = "score") -> pd.DataFrame:
    """:class:`StreamingTopN` over an iterable of blocks (e.g. ``ShardedOutput.iter_tables``)."""
    top = StreamingTopN(n)
    for t in tables:
        top.update_table(t, column=column)
    return top.result()
