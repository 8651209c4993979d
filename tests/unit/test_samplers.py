"""ClassCycleSampler: label coverage per batch, random share, determinism, epochs, ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from raydapt.train.samplers import ClassCycleSampler


def _observed(n: int = 40, n_labels: int = 5, seed: int = 0, p: float = 0.15) -> np.ndarray:
    obs = (np.random.default_rng(seed).random((n, n_labels)) < p).astype(np.int8)
    obs[0, :] = 1  # every label has at least one positive
    return obs


def _assert_covers(obs: np.ndarray, batch: list[int]) -> None:
    active = np.flatnonzero(obs.any(0))
    covered = obs[batch][:, active].any(0)
    assert covered.all(), f"labels without a positive in batch: {active[~covered]}"


@settings(max_examples=60, deadline=None)
@given(
    obs=arrays(
        np.int8, st.tuples(st.integers(1, 25), st.integers(1, 6)), elements=st.integers(0, 1)
    ),
    extra=st.integers(0, 6),
    random_share=st.floats(0.0, 0.6),
    seed=st.integers(0, 2**31),
)
def test_every_batch_holds_a_positive_per_label(obs, extra, random_share, seed):
    n_active = int(obs.any(0).sum())
    if n_active == 0:
        with pytest.raises(ValueError, match="no label"):
            ClassCycleSampler(obs, 4, seed=seed)
        return
    # smallest valid batch: n_active + round(share·B) ≤ B  ⇔  B ≥ n_active / (1 − share)
    batch_size = int(np.ceil(n_active / (1 - random_share) + 1e-9)) + extra
    sampler = ClassCycleSampler(obs, batch_size, random_share=random_share, seed=seed,
                                num_batches=5)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 5
    for batch in batches:
        assert len(batch) == batch_size
        assert all(0 <= i < obs.shape[0] for i in batch)
        _assert_covers(obs, batch)
        assert all(isinstance(i, int) for i in batch)
        # the cycle part holds observed positives only
        n_cycle = batch_size - sampler.n_random
        assert obs[batch[:n_cycle]].any(1).all()


def test_random_share_brings_in_rows_without_positives():
    obs = np.zeros((30, 3), dtype=np.int8)
    obs[:6, 0] = 1
    obs[6:9, 1] = 1
    obs[9:12, 2] = 1  # rows 12..29 have no observed positive
    sampler = ClassCycleSampler(obs, 8, random_share=0.25, seed=0, num_batches=50)
    assert sampler.n_random == 2 and sampler.n_cycle == 6
    seen = {i for b in sampler for i in b}
    assert seen & set(range(12, 30)), "unlabeled-only rows never sampled"
    for b in sampler:
        assert np.all(np.asarray(b[:6]) < 12)  # cycle part: positives
    no_random = ClassCycleSampler(obs, 6, random_share=0.0, seed=0, num_batches=50)
    assert max(i for b in no_random for i in b) < 12
    # cycle balance: each of the 3 labels gets 2 of the 6 cycle draws in every batch
    for b in no_random:
        assert sorted(int(np.flatnonzero(obs[i])[0]) for i in b) == [0, 0, 1, 1, 2, 2]


def test_labels_without_positives_are_skipped():
    obs = np.array([[1, 0, 0], [0, 0, 1], [0, 0, 0], [1, 0, 1]])
    sampler = ClassCycleSampler(obs, 3, random_share=0.0, seed=1, num_batches=4)
    assert sampler.active_labels.tolist() == [0, 2]
    for b in sampler:
        _assert_covers(obs, b)


def test_deterministic_and_epochs_differ():
    obs = _observed()
    a = ClassCycleSampler(obs, 10, seed=3)
    b = ClassCycleSampler(obs, 10, seed=3)
    assert list(a) == list(b)
    assert list(a) == list(a)  # re-iterating the same epoch repeats it
    assert len(a) == 4  # ceil(40 / 10)
    epoch0 = list(a)
    a.set_epoch(1)
    epoch1 = list(a)
    assert epoch1 != epoch0
    b.set_epoch(1)
    assert list(b) == epoch1
    assert list(ClassCycleSampler(obs, 10, seed=4)) != epoch0


def test_ranks_get_different_streams():
    obs = _observed()
    shards = [ClassCycleSampler(obs, 10, seed=3, num_batches=9, rank=r, world_size=3)
              for r in range(3)]
    streams = [list(s) for s in shards]
    assert [len(s) for s in shards] == [3, 3, 3]  # ceil(9 / 3), equal on every rank
    flat = [tuple(b) for s in streams for b in s]
    assert len(set(flat)) == len(flat), "a batch repeats across ranks"
    # seeding is (seed, epoch, rank), not seed + rank: seed 4 rank 0 ≠ seed 3 rank 1
    other = list(ClassCycleSampler(obs, 10, seed=4, num_batches=9, rank=0, world_size=3))
    assert other != streams[1]
    for s in streams:
        for b in s:
            _assert_covers(obs, b)


def test_batch_too_small_raises_clear_error():
    obs = np.eye(6, dtype=np.int8)
    with pytest.raises(ValueError, match=r"batch_size=7 is too small.*6 labels.*n_random=2"):
        ClassCycleSampler(obs, 7, random_share=0.25)
    ClassCycleSampler(obs, 8, random_share=0.25)  # 6 + round(2.0) = 8 fits
    with pytest.raises(ValueError, match="rank"):
        ClassCycleSampler(obs, 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="random_share"):
        ClassCycleSampler(obs, 8, random_share=1.5)


def test_works_as_dataloader_batch_sampler():
    obs = _observed(n=20, n_labels=3)
    ds = torch.utils.data.TensorDataset(torch.arange(20), torch.as_tensor(obs))
    sampler = ClassCycleSampler(obs, 6, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler)
    batches = list(loader)
    assert len(batches) == 4
    for (idx, y), expected in zip(batches, sampler, strict=True):
        assert idx.tolist() == expected
        assert bool(y.any(0).all())
