"""A fit's training rows as a stage output (issue 25 item 3): rows arriving in chunks are
written in near-equal shards (numpy's array_split boundaries), a finished output is reused
without producing its rows again, a wrong row count is an error, and Ray Data reads the shards
back in order, one block per shard, from the files themselves."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from raydapt.core.cache import StageCache
from raydapt.stages.sharded import shard_sizes, write_rows

VERSIONS = {"train-rows": 1}


@pytest.fixture
def ordered():
    """Ray Data keeps the order of the blocks, as the fits' DataConfig asks (set before a
    dataset is made: a dataset keeps the context it was made in)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    before = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    yield
    ctx.execution_options.preserve_order = before


def test_shard_sizes_follow_array_split():
    assert shard_sizes(10, 3) == [4, 3, 3]  # by hand
    assert shard_sizes(5, 8) == [1, 1, 1, 1, 1]  # never an empty shard
    for n, k in [(1, 1), (97, 4), (1000, 64), (33, 2)]:
        assert shard_sizes(n, k) == [len(a) for a in np.array_split(np.arange(n), min(k, n))]


def _rows(n: int) -> pd.DataFrame:
    return pd.DataFrame({"id": [f"r{i}" for i in range(n)],
                         "input_ids": [list(range(i % 5 + 1)) for i in range(n)],
                         "p_t": [np.array([i / n, 1 - i / n]) for i in range(n)]})


def test_chunks_become_shards_of_array_split_sizes_and_are_reused(tmp_path):
    rows = _rows(10)
    cache = StageCache(tmp_path / "cache", versions=VERSIONS)
    calls = []

    def chunks():  # chunk sizes unrelated to the shard sizes
        calls.append(1)
        yield rows.iloc[:1]
        yield rows.iloc[1:7]
        yield rows.iloc[7:]

    said = []
    out = write_rows(cache, "train-rows", {"ids": "x"}, chunks, 10, 3, said.append)
    got = [pd.read_parquet(out.path(i)) for i in range(out.n_shards)]
    assert [len(g) for g in got] == [4, 3, 3]
    back = pd.concat(got, ignore_index=True)
    assert back["id"].tolist() == rows["id"].tolist()
    assert [list(v) for v in back["input_ids"]] == rows["input_ids"].tolist()
    np.testing.assert_array_equal(np.stack(back["p_t"]), np.stack(rows["p_t"]))
    assert (out.d / "_SUCCESS").exists() and said == [
        f"train-rows: 10 rows in 3 shard(s) ({out.d})"]
    # finished: reused, its rows not produced again
    again = write_rows(cache, "train-rows", {"ids": "x"}, chunks, 10, 3, said.append)
    assert again.d == out.d and len(calls) == 1 and len(said) == 1


def test_a_row_count_other_than_announced_is_an_error(tmp_path):
    cache = StageCache(tmp_path / "cache", versions=VERSIONS)
    with pytest.raises(RuntimeError, match="9 rows arrived, 10 announced"):
        write_rows(cache, "train-rows", {"ids": "a"}, lambda: [_rows(9)], 10, 2, print)
    with pytest.raises(RuntimeError, match="more than the 10 rows announced"):
        write_rows(cache, "train-rows", {"ids": "b"}, lambda: [_rows(11)], 10, 2, print)
    with pytest.raises(ValueError, match="no rows to write"):
        write_rows(cache, "train-rows", {"ids": "c"}, lambda: [], 0, 2, print)
    # nothing of a failed write counts as finished
    assert not list((tmp_path / "cache").rglob("_SUCCESS"))


@pytest.mark.usefixtures("ray_local", "ordered")
def test_ray_data_reads_the_shards_in_order_one_block_each(tmp_path):
    rows = _rows(100)
    cache = StageCache(tmp_path / "cache", versions=VERSIONS)
    out = write_rows(cache, "train-rows", {"ids": "y"}, lambda: [rows], 100, 7, print)
    ds = out.dataset(["id", "p_t"])
    sizes = [len(b["id"]) for b in ds.iter_batches(batch_size=None, batch_format="numpy")]
    back = ds.to_pandas()
    assert sizes == shard_sizes(100, 7)  # one block per shard
    assert back["id"].tolist() == rows["id"].tolist() and list(back.columns) == ["id", "p_t"]
    np.testing.assert_array_equal(np.stack(back["p_t"]), np.stack(rows["p_t"]))
    (out.d / "part-00003.parquet").write_bytes(b"not parquet")  # a damaged shard: no dataset
    with pytest.raises(RuntimeError, match=r"1 shard\(s\) not done, e.g. 3: unreadable"):
        out.dataset()


@pytest.mark.usefixtures("ray_local", "ordered")
def test_fits_see_the_same_rows_and_batches_as_from_the_driver_frame(tmp_path):
    """What changed under the fits is where the rows come from, not what they see: a LoRA fit's
    batches (local shuffle buffer, seed) over the shards equal those over the driver frame's
    blocks (NTK's old ``_dataset``), and the student loop's arrays (every row in order) hold
    the same values."""
    import math

    import ray

    from raydapt.recipes.ntk_select import _dataset

    rng = np.random.default_rng(0)
    cache = StageCache(tmp_path / "cache", versions=VERSIONS)
    m = 200
    rows = pd.DataFrame({"id": [f"r{i}" for i in range(m)],
                         "input_ids": [rng.integers(0, 100, rng.integers(3, 9)).tolist()
                                       for _ in range(m)]})
    rows["response_mask"] = [[1] * len(x) for x in rows["input_ids"]]
    new = write_rows(cache, "train-rows", {"d": 1}, lambda: [rows.iloc[:50], rows.iloc[50:]],
                     m, min(64, math.ceil(m / 32)), print).dataset(["input_ids", "response_mask"])

    def lora_batches(ds):  # as LoRAFit.batches
        return [[list(map(int, a)) for a in b["input_ids"]] for b in ds.iter_batches(
            batch_size=4, batch_format="numpy", drop_last=True, local_shuffle_buffer_size=64,
            local_shuffle_seed=3)]

    old_b, new_b = lora_batches(_dataset(rows)), lora_batches(new)
    assert len(new_b) == 50 and new_b == old_b

    n = 150
    distill = pd.DataFrame({"text": [f"t{i} " * (i % 7) for i in range(n)],
                            "p_t": list(rng.dirichlet([1, 1], n)),
                            "h_t": list(rng.standard_normal((n, 16)).astype(np.float32))},
                           index=np.arange(n) * 3)  # a filtered frame's index
    cols = ["text", "p_t", "h_t"]

    def student_arrays(ds):  # as student_loop: every row, in order
        parts = {c: [] for c in cols}
        for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for c in cols:
                parts[c].append(b[c])
        return {c: np.concatenate(v) for c, v in parts.items()}

    old_a = student_arrays(ray.data.from_pandas(distill))
    new_a = student_arrays(write_rows(cache, "train-rows", {"d": 2}, lambda: [distill], n, 3,
                                      print).dataset())
    assert new_a["text"].tolist() == old_a["text"].tolist()
    for c in ("p_t", "h_t"):  # the loop stacks a batch's cells: same values, same dtype
        a, b = np.stack(old_a[c]), np.stack(new_a[c])
        assert a.dtype == b.dtype and np.array_equal(a, b), c


@pytest.mark.usefixtures("ray_local")
@pytest.mark.timeout(120)
def test_the_rows_are_read_while_training_workers_hold_every_cpu(tmp_path):
    """A fit's workers hold the cluster's CPUs while they read their rows (a 2-worker student
    with 1 CPU each on a 2-CPU machine): the shards' read tasks must not wait for a CPU."""
    import ray

    @ray.remote(num_cpus=1)
    class Hold:
        def read(self, ds) -> int:
            return sum(len(b["id"]) for b in ds.iter_batches(batch_size=None))

    cache = StageCache(tmp_path / "cache", versions=VERSIONS)
    out = write_rows(cache, "train-rows", {"d": "cpu"}, lambda: [_rows(20)], 20, 2, print)
    cpus = int(ray.cluster_resources().get("CPU", 2))
    holders = [Hold.remote() for _ in range(cpus)]
    try:
        assert ray.get(holders[0].read.remote(out.dataset()), timeout=90) == 20
    finally:
        for h in holders:
            ray.kill(h)
