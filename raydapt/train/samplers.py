"""Batch samplers (plain PyTorch / NumPy, no Ray import).

:class:`ClassCycleSampler` is DALLMi's label-balanced cycle sampler: every batch holds at least
one observed positive for every label that has one, plus a share of uniformly random rows so that
rows without any observed positive still reach training as unlabeled examples.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

__all__ = ["ClassCycleSampler"]


def _round_half_up(x: float) -> int:
    """Round to the nearest int, halves up (2.5 -> 3), unlike Python's banker's ``round``.

    ``x`` is first rounded to 9 decimals so float noise (0.1 * 25 = 2.4999999999999996) does not
    flip a half case.
    """
    return int(math.floor(round(x, 9) + 0.5))


class ClassCycleSampler(Sampler[list[int]]):
    """Label-balanced batches of row indices, for ``DataLoader(batch_sampler=...)``.

    Each batch is built as follows:

    1. ``n_cycle = batch_size − n_random`` draws that cycle over the *active* labels (labels with
       ≥1 observed positive; labels with none are skipped: there is no positive to draw). Each
       draw takes one uniformly random row among the label's observed positives. The cycle
       position carries over from batch to batch (and starts at a random label per stream), so
       the labels that get an extra draw rotate.
    2. ``n_random = _round_half_up(random_share · batch_size)`` rows drawn uniformly from all N
       rows (so rows without observed positives are trained on as unlabeled).

    Draws are with replacement: a row may appear twice in a batch (e.g. a label with a single
    positive, or a row positive for several labels). Since ``n_cycle ≥`` the number of active
    labels, every batch holds ≥1 observed positive per active label.

    Sharding: with ``rank`` / ``world_size`` each rank draws its own independent stream seeded
    by ``SeedSequence([seed, epoch, rank])`` (not ``seed + rank``, which would collide across
    seeds), so ranks get different batches; rows may still recur across ranks (draws are with
    replacement anyway). ``num_batches`` is the total per epoch over all ranks; each rank yields
    ``ceil(num_batches / world_size)`` batches, the same count on every rank as DDP requires.

    Args:
        observed: [N, L] observed labels, nonzero = observed positive.
        batch_size: rows per batch; must be ≥ (number of active labels) + n_random.
        random_share: share of each batch drawn uniformly at random, in [0, 1].
        num_batches: batches per epoch over all ranks; default ``ceil(N / batch_size)``.
        seed: non-negative base seed.
        rank, world_size: this worker's rank and the number of workers.

    Raises:
        ValueError: bad shapes or arguments, no label with an observed positive, or a batch too
            small to hold one positive per active label plus the random rows.
    """

    def __init__(
        self,
        observed: np.ndarray,
        batch_size: int,
        *,
        random_share: float = 0.25,
        num_batches: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        obs = np.asarray(observed)
        if obs.ndim != 2:
            raise ValueError(f"observed must be [N, L], got shape {obs.shape}")
        n_rows, _ = obs.shape
        if n_rows == 0:
            raise ValueError("observed has no rows")
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        if not 0.0 <= random_share <= 1.0:
            raise ValueError(f"random_share must be in [0, 1], got {random_share}")
        if seed < 0:
            raise ValueError(f"seed must be ≥ 0, got {seed}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need 0 ≤ rank < world_size, got rank={rank}, world_size={world_size}"
            )
        pos = obs != 0
        active = np.flatnonzero(pos.any(0))
        if active.size == 0:
            raise ValueError("no label has an observed positive: nothing to cycle over")
        n_random = _round_half_up(random_share * batch_size)
        if batch_size < active.size + n_random:
            raise ValueError(
                f"batch_size={batch_size} is too small: it must hold one observed positive for "
                f"each of the {active.size} labels that have one plus n_random={n_random} random "
                f"rows (random_share={random_share}); need batch_size ≥ {active.size + n_random}"
            )
        # Positives of active label k are pos_rows[offsets[k] : offsets[k] + counts[k]].
        label_of, rows = np.nonzero(pos[:, active].T)
        self.counts = np.bincount(label_of, minlength=active.size).astype(np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        self.pos_rows = rows.astype(np.int64)
        self.active_labels = active
        self.n_rows = n_rows
        self.batch_size = batch_size
        self.n_random = n_random
        self.n_cycle = batch_size - n_random
        self.num_batches = math.ceil(n_rows / batch_size) if num_batches is None else num_batches
        if self.num_batches < 0:
            raise ValueError(f"num_batches must be ≥ 0, got {num_batches}")
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's stream (deterministic in ``(seed, epoch, rank)``)."""
        if epoch < 0:
            raise ValueError(f"epoch must be ≥ 0, got {epoch}")
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches yielded by this rank per epoch."""
        return math.ceil(self.num_batches / self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, self.rank]))
        n_active = self.active_labels.size
        cursor = int(rng.integers(n_active))
        steps = np.arange(self.n_cycle)
        for _ in range(len(self)):
            labels = (cursor + steps) % n_active  # [n_cycle] active-label positions
            cursor = (cursor + self.n_cycle) % n_active
            picks = self.offsets[labels] + rng.integers(0, self.counts[labels])
            random_rows = rng.integers(0, self.n_rows, size=self.n_random)
            yield np.concatenate([self.pos_rows[picks], random_rows]).tolist()
