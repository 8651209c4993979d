"""Multi-label helpers: label vocabulary, multi-hot encoding and seeded label hiding (NumPy only).

Label hiding simulates DALLMi's partially labeled target domain: a hidden positive becomes 0 in
the *observed* matrix, exactly like a negative. Paper ratios are stated as *hidden* shares
(50 / 70 / 90 %); here the argument is the *kept* share, ``keep_ratio = 1 − hidden_ratio``, and
rounding applies to the kept count (``round_half_up(keep_ratio · #pos)``, ≥1 when #pos ≥ 1). The
test split keeps its full labels: call :func:`hide_labels` on training rows only.

Randomness: each (row, label) cell gets a 64-bit priority from a SplitMix64 hash of
``(seed, row key, label)``; kept positives are those with the smallest priorities. With
``row_keys`` (stable sample ids) the result is independent of row order (permuting rows permutes
the output); without them the row key is the row position, so the result depends on row order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import numpy as np

__all__ = ["build_vocab", "decode_multi_hot", "hide_labels", "kept_count", "multi_hot"]

HideStrategy = Literal["per_label", "per_sample"]

_MAX_REPORTED_ROWS = 5  # rows quoted in an unknown-label error message

# SplitMix64 constants (Steele, Lea, Flood 2014), part of the hash's definition.
_SM_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_SM_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_SM_MUL2 = np.uint64(0x94D049BB133111EB)


def build_vocab(labels_lists: Iterable[Iterable[str]]) -> list[str]:
    """Sorted unique labels of ``labels_lists`` (one iterable of label names per row)."""
    return sorted({str(label) for row in labels_lists for label in row})


def multi_hot(
    labels_lists: Sequence[Iterable[str]],
    vocab: Sequence[str] | Mapping[str, int],
    *,
    dtype: type | np.dtype = np.float32,
) -> np.ndarray:
    """Encode per-row label lists as a multi-hot matrix.

    Args:
        labels_lists: N rows, each an iterable of label names (duplicates within a row are
            harmless; an empty row is all zeros).
        vocab: the L label names in column order, or a mapping name -> column.
        dtype: output dtype.

    Returns:
        [N, L] array of 0/1.

    Raises:
        ValueError: some row holds a label outside ``vocab``; the message gives the number of
            offending rows and lists up to 5 of them as ``row <position>: [unknown labels]``.
    """
    index = dict(vocab) if isinstance(vocab, Mapping) else {v: i for i, v in enumerate(vocab)}
    if not isinstance(vocab, Mapping) and len(index) != len(vocab):
        raise ValueError("vocab has duplicate labels")
    n_labels = (max(index.values()) + 1) if index else 0
    out = np.zeros((len(labels_lists), n_labels), dtype=dtype)
    bad: list[tuple[int, list[str]]] = []
    for i, row in enumerate(labels_lists):
        unknown = [label for label in row if label not in index]
        if unknown:
            bad.append((i, unknown))
            continue
        for label in row:
            out[i, index[label]] = 1
    if bad:
        shown = "; ".join(f"row {i}: {u}" for i, u in bad[:_MAX_REPORTED_ROWS])
        extra = len(bad) - _MAX_REPORTED_ROWS
        more = f" (and {extra} more rows)" if extra > 0 else ""
        raise ValueError(f"{len(bad)} rows hold labels not in the vocabulary: {shown}{more}")
    return out


def decode_multi_hot(y: np.ndarray, vocab: Sequence[str]) -> list[list[str]]:
    """Inverse of :func:`multi_hot`: [N, L] -> N lists of label names (vocab order)."""
    y = np.asarray(y)
    if y.ndim != 2 or y.shape[1] != len(vocab):
        raise ValueError(f"y must be [N, {len(vocab)}], got shape {y.shape}")
    return [[vocab[j] for j in np.flatnonzero(row)] for row in y]


def kept_count(n_pos: np.ndarray | int, keep_ratio: float) -> np.ndarray:
    """Positives kept out of ``n_pos``: round_half_up(keep_ratio · n_pos), at least 1 if n_pos ≥ 1.

    The product is rounded to 9 decimals first so float noise cannot flip a half case
    ((1 − 0.9) · 25 = 2.4999999999999996 -> 3). Returns an int64 array shaped like ``n_pos``.
    """
    n = np.asarray(n_pos, dtype=np.int64)
    k = np.floor(np.round(keep_ratio * n, 9) + 0.5).astype(np.int64)
    return np.where(n > 0, np.clip(k, 1, n), 0)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + _SM_GAMMA
        z = (z ^ (z >> np.uint64(30))) * _SM_MUL1
        z = (z ^ (z >> np.uint64(27))) * _SM_MUL2
        return z ^ (z >> np.uint64(31))


def _row_keys(n_rows: int, row_keys: Sequence[object] | None) -> np.ndarray:
    """uint64 [N] keys: row positions, or 8-byte BLAKE2b digests of ``str(key)``."""
    if row_keys is None:
        return np.arange(n_rows, dtype=np.uint64)
    if len(row_keys) != n_rows:
        raise ValueError(f"row_keys has {len(row_keys)} entries for {n_rows} rows")
    as_str = [str(k) for k in row_keys]
    if len(set(as_str)) != n_rows:
        raise ValueError("row_keys must be unique (compared as strings)")
    digests = [hashlib.blake2b(s.encode(), digest_size=8).digest() for s in as_str]
    return np.frombuffer(b"".join(digests), dtype="<u8").astype(np.uint64)


def _priorities(
    n_rows: int, n_labels: int, seed: int, row_keys: Sequence[object] | None
) -> np.ndarray:
    """uint64 [N, L] pseudo-random priorities, a pure function of (seed, row key, label)."""
    seed_mix = _splitmix64(np.array([seed], dtype=np.uint64))
    base = _splitmix64(_row_keys(n_rows, row_keys) ^ seed_mix)  # [N]
    with np.errstate(over="ignore"):
        label_mix = (np.arange(1, n_labels + 1, dtype=np.uint64) * _SM_GAMMA)[None, :]
        return _splitmix64(base[:, None] ^ label_mix)


def _ranks(y: np.ndarray, prio: np.ndarray, axis: int) -> np.ndarray:
    """Rank [N, L] of each cell along ``axis``: positives first by ascending priority."""
    order = np.lexsort((prio, ~y), axis=axis)  # primary key: ~y (positives first)
    ranks = np.empty_like(order)
    idx = np.arange(y.shape[axis])
    idx = idx[:, None] if axis == 0 else idx[None, :]
    np.put_along_axis(ranks, order, np.broadcast_to(idx, order.shape), axis=axis)
    return ranks


def hide_labels(
    y: np.ndarray,
    *,
    keep_ratio: float,
    strategy: HideStrategy = "per_label",
    seed: int,
    row_keys: Sequence[object] | None = None,
) -> np.ndarray:
    """Seeded label hiding: the observed matrix of a partially labeled domain.

    Args:
        y: [N, L] full labels in {0, 1}.
        keep_ratio: share r of positives kept, in [0, 1] (= 1 − the paper's hidden ratio).
        strategy:
            ``per_label``: for each label with #pos ≥ 1 keep exactly :func:`kept_count` (#pos, r)
            positives (≥1), hide the rest.
            ``per_sample``: for each row with m ≥ 1 positives keep :func:`kept_count` (m, r) (≥1).
            Then every label that has a positive somewhere but lost all of them is rescued: its
            lowest-priority positive is restored. A rescued cell adds to its row's count, so a
            row can keep more than kept_count(m, r) (one extra per label rescued on that row);
            no row keeps fewer.
        seed: non-negative int; the output is a deterministic function of (y, r, strategy,
            seed, row_keys).
        row_keys: optional unique per-row ids (e.g. sample ids). With them the choice of kept
            positives is independent of row order; without them it depends on row positions.

    Returns:
        [N, L] observed labels, same dtype as ``y``, a subset of y's positives.
    """
    arr = np.asarray(y)
    if arr.ndim != 2:
        raise ValueError(f"y must be [N, L], got shape {arr.shape}")
    if not np.isin(arr, (0, 1)).all():
        raise ValueError("y must hold only 0 and 1")
    if not 0.0 <= keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in [0, 1], got {keep_ratio}")
    if seed < 0:
        raise ValueError(f"seed must be ≥ 0, got {seed}")
    pos = arr == 1
    prio = _priorities(arr.shape[0], arr.shape[1], seed, row_keys)
    col_rank = _ranks(pos, prio, axis=0)
    if strategy == "per_label":
        keep = pos & (col_rank < kept_count(pos.sum(0), keep_ratio)[None, :])
    elif strategy == "per_sample":
        row_rank = _ranks(pos, prio, axis=1)
        keep = pos & (row_rank < kept_count(pos.sum(1), keep_ratio)[:, None])
        lost = pos.any(0) & ~keep.any(0)  # [L]
        keep |= pos & lost[None, :] & (col_rank == 0)
    else:
        raise ValueError(f"strategy must be 'per_label' or 'per_sample', got {strategy!r}")
    return keep.astype(arr.dtype)
