"""Stage-1 kNN votes of NTK-Selector over a large pool: each domain sample votes for its ``k``
nearest pool samples by cosine; a pool sample's votes are how many domain samples chose it.

Two ways, both reading the pool's embeddings block by block (e.g. one stage-output shard at a
time, :meth:`~raydapt.core.cache.ShardedOutput.iter_tables`):

- ``index="flat"`` (exact, the default; what :func:`raydapt.select.selectors.knn_votes` computes
  with a FAISS flat index): the *domain* is the small side, so the running top-k of every domain
  sample is updated with each pool block (an ``Nd × block`` product). Memory: ``Nd·k`` plus one
  block, whatever the pool's size.
- ``index="ivf"`` / ``"hnsw"`` (approximate, what a user at millions of rows would build): a
  FAISS ``IndexIVFFlat`` (``nlist`` lists, trained on the first blocks, ``nprobe`` searched) or
  ``IndexHNSWFlat`` (``hnsw_m`` links) over the pool's vectors, added block by block, then
  searched with the domain. Memory: the index (every pool vector, 4·H bytes each).

Positions are global row positions in stream order; the result names pool rows by id.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import numpy as np
import pandas as pd

IndexKind = Literal["flat", "ivf", "hnsw"]


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def _blocks(blocks: Iterable) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """(ids, [B, H] float32) per block from (ids, emb) pairs or tables with id / emb (rows with
    an ``_error`` / ``_reject`` or a null embedding are left out)."""
    for b in blocks:
        if isinstance(b, tuple):
            ids, emb = b
            yield np.asarray(ids, dtype=object), np.asarray(emb, dtype=np.float32)
            continue
        df = b if isinstance(b, pd.DataFrame) else b.to_pandas()
        ok = np.ones(len(df), dtype=bool)
        for c in ("_error", "_reject"):
            if c in df:
                ok &= df[c].fillna("").to_numpy() == ""
        if "emb" in df:
            ok &= df["emb"].map(lambda v: v is not None).to_numpy()
        df = df[ok]
        if len(df):
            yield df["id"].to_numpy(dtype=object), np.stack(df["emb"].to_numpy()).astype(
                np.float32)


def knn_votes_streaming(domain_emb: np.ndarray, pool_blocks: Iterable, *, k: int,
                        index: IndexKind = "flat", nlist: int | None = None, nprobe: int = 16,
                        hnsw_m: int = 32, train_rows: int = 50_000) -> pd.DataFrame:
    """Votes of the domain for the pool, the pool read block by block.

    Args:
        domain_emb: [Nd, H] domain embeddings.
        pool_blocks: blocks of the pool: ``(ids, [B, H])`` pairs or frames / Arrow tables with
            ``id`` and ``emb``.
        k: neighbours per domain sample.
        index: ``flat`` (exact, streaming), ``ivf`` or ``hnsw`` (FAISS, approximate).
        nlist: IVF lists (default ~4·√N of the training rows); nprobe: lists searched.
        train_rows: pool rows the IVF quantiser is trained on (the first ones).

    Returns:
        ``id``, ``votes`` (int64), ``vote_sim`` (summed cosine) of the pool rows with at least
        one vote, in stream order.
    """
    d = _unit(domain_emb)
    if index == "flat":
        best_s = np.full((len(d), 0), -np.inf, dtype=np.float32)
        best_p = np.zeros((len(d), 0), dtype=np.int64)
        ids_of: dict[int, object] = {}
        seen = 0
        for ids, emb in _blocks(pool_blocks):
            c = _unit(emb)
            sims = d @ c.T  # [Nd, B]
            kk = min(k, sims.shape[1])
            part = np.argpartition(-sims, kk - 1, axis=1)[:, :kk] if kk < sims.shape[1] else \
                np.tile(np.arange(sims.shape[1]), (len(d), 1))
            s = np.take_along_axis(sims, part, axis=1)
            p = part.astype(np.int64) + seen
            all_s = np.concatenate([best_s, s], axis=1)
            all_p = np.concatenate([best_p, p], axis=1)
            order = np.lexsort((all_p, -all_s), axis=1)[:, :k] if all_s.shape[1] else all_p
            best_s = np.take_along_axis(all_s, order, axis=1)
            best_p = np.take_along_axis(all_p, order, axis=1)
            for j in np.unique(p):
                ids_of[int(j)] = ids[int(j) - seen]
            keep = set(np.unique(best_p).tolist())
            ids_of = {j: v for j, v in ids_of.items() if j in keep}
            seen += len(ids)
        pos, sim = best_p.ravel(), best_s.ravel().astype(np.float64)
    else:
        pos, sim, ids_of = _indexed(d, pool_blocks, k=k, kind=index, nlist=nlist,
                                    nprobe=nprobe, hnsw_m=hnsw_m, train_rows=train_rows)
    if len(pos) == 0:
        return pd.DataFrame({"id": pd.Series([], dtype=object), "votes": np.array([], np.int64),
                             "vote_sim": np.array([], np.float64)})
    u, inv = np.unique(pos, return_inverse=True)
    votes = np.bincount(inv, minlength=len(u)).astype(np.int64)
    vsim = np.bincount(inv, weights=sim, minlength=len(u))
    return pd.DataFrame({"id": [ids_of[int(j)] for j in u], "votes": votes, "vote_sim": vsim})


def _indexed(d: np.ndarray, pool_blocks: Iterable, *, k: int, kind: str, nlist: int | None,
             nprobe: int, hnsw_m: int, train_rows: int):
    """FAISS IVF / HNSW over the pool (added block by block), searched with the domain.
    Returns (positions, sims, {position: id} of the positions found)."""
    import faiss

    h = d.shape[1]
    index = None
    pending: list[np.ndarray] = []
    ids_all: list[np.ndarray] = []  # ids per block: kept as arrays until the search is done
    n_pending = 0
    quantizers: list = []

    def make(train: np.ndarray):
        if kind == "hnsw":
            ix = faiss.IndexHNSWFlat(h, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            ix.hnsw.efSearch = max(64, 2 * k)
            return ix
        nl = nlist or max(1, min(int(4 * np.sqrt(len(train))), len(train) // 39 or 1))
        q = faiss.IndexFlatIP(h)
        ix = faiss.IndexIVFFlat(q, h, nl, faiss.METRIC_INNER_PRODUCT)
        ix.train(train)
        ix.nprobe = min(nprobe, nl)
        quantizers.append(q)  # keep the quantiser alive as long as the index
        return ix

    for ids, emb in _blocks(pool_blocks):
        c = _unit(emb)
        ids_all.append(ids)
        if index is None:
            pending.append(c)
            n_pending += len(c)
            if n_pending < train_rows:
                continue
            train = np.concatenate(pending)
            index = make(train)
            index.add(train)
            pending = []
            continue
        index.add(c)
    if index is None:
        if not pending:
            return np.array([], np.int64), np.array([], np.float64), {}
        train = np.concatenate(pending)
        index = make(train)
        index.add(train)
    sims, idx = index.search(d, min(k, index.ntotal))
    ok = idx >= 0
    pos, sim = idx[ok].astype(np.int64), sims[ok].astype(np.float64)
    want = set(np.unique(pos).tolist())
    ids_of, seen = {}, 0
    for ids in ids_all:
        for j in range(len(ids)):
            if seen + j in want:
                ids_of[seen + j] = ids[j]
        seen += len(ids)
    return pos, sim, ids_of
