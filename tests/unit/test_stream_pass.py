"""The streaming stage pass (files to files, issue 25) and shard verification (issue 28 items 1
and 11): the driver never collects the pool, a killed or corrupted run recomputes only the shards
that are not done and sound, and the result is the same whichever run wrote which shard."""

from __future__ import annotations

import json
import tracemalloc

import pandas as pd
import pytest

from raydapt.core.cache import StageCache
from raydapt.core.tracking import Tracker
from raydapt.data.readers import TextRows, open_source
from raydapt.stages.sharded import Step, identity, output_rejects, sharded_pass, stream_pass

pytestmark = pytest.mark.usefixtures("ray_local")

# the stages these tests run (a recipe declares its own: Recipe.STAGE_VERSIONS)
VERSIONS = {"embed": 1, "teacher": 1}


def setup_module(module) -> None:
    """Ship this module's step functions to Ray workers by value (workers of a cluster started
    elsewhere cannot import a test module)."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(module)


def _tracker() -> Tracker:
    return Tracker(enabled=False, uri="sqlite:///unused.db", experiment="x", artifact_location="")


def _pool(path, n: int, bad_every: int = 0, width: int = 40):
    with open(path, "w") as f:
        for i in range(n):
            if bad_every and i % bad_every == bad_every - 1:
                f.write("not json\n")
            else:
                f.write(json.dumps({"id": f"r{i}", "text": f"row {i} " + "x" * width}) + "\n")
    return path


def _shout(batch: pd.DataFrame) -> pd.DataFrame:
    """A step that computes something per row (and fails on one row)."""
    if (batch["text"] == "row 7 " + "x" * 40).any() and len(batch) > 1:
        raise ValueError("batch with row 7")
    if (batch["text"] == "row 7 " + "x" * 40).any():
        raise ValueError("row 7 is bad")
    return pd.DataFrame({"id": batch["id"], "n": batch["text"].str.len() + 1})


class _Len:
    """The same as a callable class (runs on an actor pool)."""

    def __init__(self, add: int) -> None:
        self.add = add

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from raydapt.stages.common import run_isolating_failures

        return run_isolating_failures(batch, _shout, stage="len")


@pytest.mark.timeout(1800)
def test_driver_does_not_collect_the_pool(tmp_path):
    """50K rows (~22 MB) through read -> step -> write: the driver's peak traced allocation stays
    far under the pool's in-memory size (a pass that gathers rows or outputs in the driver
    fails; the second half of the test shows that collecting the output does)."""
    n = 50_000
    p = _pool(tmp_path / "pool.jsonl", n, width=400)
    src = open_source(p, normaliser=TextRows(require_label=False), unit_rows=2_000)
    cache = StageCache(tmp_path / "cache", versions=VERSIONS)
    # a small pass first: what the first pass of a process imports (pyarrow.dataset, Ray Data's
    # operators, ...) is a one-off cost of several MB, not memory that grows with the pool
    warm = open_source(_pool(tmp_path / "warm.jsonl", 500), unit_rows=100,
                       normaliser=TextRows(require_label=False))
    stream_pass(cache, _tracker(), "embed", {"t": "warm"}, warm,
                [Step(identity, columns=["text"])], lambda s: None)
    tracemalloc.start()
    st: dict = {}
    try:
        out = stream_pass(cache, _tracker(), "embed", {"t": "mem"}, src,
                          [Step(identity, columns=["text"])], lambda s: None, stats=st)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    pool_bytes = p.stat().st_size  # the pool's size as Arrow strings, about
    assert pool_bytes > 10_000_000
    assert peak < pool_bytes / 5, (peak, pool_bytes)
    # what the driver held while it waited for units' last rows: some rows, never the pool
    assert 0 < st["peak_held_rows"] < n / 5 and st["peak_held_units"] >= 1, st
    # the check can fail: collecting the output's rows in the driver is over the bound
    tracemalloc.start()
    try:
        whole = [r for t in out.iter_tables(["id", "text"]) for r in t.to_pylist()]
        _, peak_collect = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_collect > pool_bytes / 5, (peak_collect, pool_bytes)
    pool = pd.read_json(p, lines=True)
    assert [r["text"] for r in whole] == pool["text"].tolist()
    # and every row arrived, in file order
    ids = [i for t in out.iter_tables(["id"]) for i in t.column("id").to_pylist()]
    assert ids == pool["id"].tolist()


def test_an_object_store_budget_below_one_block_holds_reads_back_and_keeps_every_row(tmp_path):
    """ray.data_object_store_mb reaches Ray Data's executor, and a budget smaller than one
    block (1 MiB against ~1.4 MB units) throttles the reads without losing, reordering or
    deadlocking a row: the output equals the unbudgeted pass's."""
    import ray.data

    from raydapt.core.runtime import init_ray

    p = _pool(tmp_path / "pool.jsonl", 6_000, width=400)
    steps = [Step(_Len, {"add": 1}, pool={"batch_size": 64}, columns=["text"])]
    ref = stream_pass(StageCache(tmp_path / "ref", versions=VERSIONS), _tracker(), "embed", {},
                      open_source(p, normaliser=TextRows(require_label=False), unit_rows=3_000),
                      steps, lambda s: None).read_all()
    ctx = ray.data.DataContext.get_current()
    before = ctx.execution_options.resource_limits
    try:
        init_ray(num_cpus=2, progress=False, data_object_store_mb=1)  # Ray is up: limit only
        assert ctx.execution_options.resource_limits.object_store_memory == 2**20
        assert before.object_store_memory != 2**20
        out = stream_pass(StageCache(tmp_path / "budget", versions=VERSIONS), _tracker(),
                          "embed", {}, open_source(p, normaliser=TextRows(require_label=False),
                                                   unit_rows=3_000),
                          steps, lambda s: None).read_all()
    finally:
        ctx.execution_options.resource_limits = before
    assert len(ref) == 6_000
    pd.testing.assert_frame_equal(out.reset_index(drop=True), ref.reset_index(drop=True))


def test_rows_in_equal_rows_out_plus_rejects_and_step_failures(tmp_path):
    p = _pool(tmp_path / "pool.jsonl", 300, bad_every=50)
    src = open_source(p, normaliser=TextRows(require_label=False), unit_rows=40)
    out = stream_pass(StageCache(tmp_path / "c", versions=VERSIONS), _tracker(), "embed", {}, src,
                      [Step(_Len, {"add": 1}, pool={"batch_size": 16}, columns=["text"])],
                      lambda s: None)
    df = out.read_all()
    rej = output_rejects(out, "len")
    assert len(df) == 300
    good = df[(df["_reject"] == "") & (df["_error"] == "")]
    assert len(good) + len(rej) == 300 and len(rej) == 6 + 1
    assert (good["n"] == 45 + good["id"].str.len()).all()  # len("row {i} " + 40 x) + 1
    assert rej["reason"].str.contains("row 7 is bad").sum() == 1
    assert rej["reason"].str.startswith("not a JSON object").sum() == 6


def test_resume_after_a_kill_and_corrupt_shards_recompute_only_those(tmp_path):
    p = _pool(tmp_path / "pool.jsonl", 1_200)
    src = open_source(p, normaliser=TextRows(require_label=False), unit_rows=100)
    cache, steps = StageCache(tmp_path / "c", versions=VERSIONS), [Step(identity, columns=["text"])]
    n_units = len(src.units)
    assert n_units >= 10

    class Killed(Exception):
        pass

    written = []

    def on_shard(i, tbl):
        written.append(i)
        if len(written) == 3:
            raise Killed

    with pytest.raises(Killed):
        stream_pass(cache, _tracker(), "embed", {}, src, steps, lambda s: None,
                    on_shard=on_shard)
    d = next((cache.root / "embed").iterdir())
    assert not (d / "_SUCCESS").exists() and len(list(d.glob("part-*.parquet"))) == 3
    said, stats = [], {}
    out = stream_pass(cache, _tracker(), "embed", {}, src, steps, said.append, stats=stats)
    assert stats["shards_computed"] == n_units - 3 and stats["shards_reused"] == 3
    assert any("resuming, 3/" in s for s in said)
    first = out.read_all()

    # a finished output: truncate one shard, delete another -> each is recomputed (the
    # truncated one named); _SUCCESS only once all verify
    parts = sorted(d.glob("part-*.parquet"))
    parts[1].write_bytes(parts[1].read_bytes()[:100])
    parts[4].unlink()
    said, stats = [], {}
    again = stream_pass(cache, _tracker(), "embed", {}, src, steps, said.append, stats=stats)
    assert stats["shards_computed"] == 2 and (d / "_SUCCESS").exists()
    assert any("shard 1 of a finished output is unreadable" in s for s in said), said
    pd.testing.assert_frame_equal(again.read_all(), first)


def test_a_shard_with_the_wrong_row_count_is_not_done(tmp_path):
    import pyarrow.parquet as pq

    p = _pool(tmp_path / "pool.jsonl", 500)
    src = open_source(p, normaliser=TextRows(require_label=False), unit_rows=100)
    cache, steps = StageCache(tmp_path / "c", versions=VERSIONS), [Step(identity, columns=["text"])]
    out = stream_pass(cache, _tracker(), "embed", {}, src, steps, lambda s: None)
    first = out.read_all()
    t = pq.read_table(out.path(2))  # same footer row count, fewer rows (e.g. a bad copy)
    pq.write_table(t.slice(0, 10).replace_schema_metadata(t.schema.metadata), out.path(2))
    said, stats = [], {}
    again = stream_pass(cache, _tracker(), "embed", {}, src, steps, said.append, stats=stats)
    assert stats["shards_computed"] == 1
    assert any("shard 2 of a finished output is 10 rows, expected" in s for s in said), said
    pd.testing.assert_frame_equal(again.read_all(), first)


def test_changed_shard_size_says_it_recomputes_and_cache_ls_lists_unfinished(tmp_path):
    p = _pool(tmp_path / "pool.jsonl", 600)
    cache, steps = StageCache(tmp_path / "c", versions=VERSIONS), [Step(identity, columns=["text"])]
    src = open_source(p, normaliser=TextRows(require_label=False), unit_rows=100)
    out = stream_pass(cache, _tracker(), "embed", {}, src, steps, lambda s: None)
    (out.d / "_SUCCESS").unlink()  # as if killed before the end
    out.path(0).unlink()
    unfinished = [e for e in cache.entries() if not e["done"]]
    assert len(unfinished) == 1 and "unfinished" in unfinished[0]["key"]
    src2 = open_source(p, normaliser=TextRows(require_label=False), unit_rows=250)
    said = []
    stream_pass(cache, _tracker(), "embed", {}, src2, steps, said.append)
    assert any("shard_rows is 250 now, 100 in an unfinished earlier run" in s for s in said), said


def test_frame_sharded_pass_verifies_shards(tmp_path):
    """The recipes' frame API: a truncated shard of a finished output is recomputed (it used to
    say 'cached' and crash on 'Parquet magic bytes not found')."""
    import ray

    rows = pd.DataFrame({"id": [f"r{i}" for i in range(10)], "x": range(10)})

    def make_ds(frames):
        return ray.data.from_pandas(frames).map_batches(
            lambda b: b.assign(y=b["x"] * 2), batch_format="pandas")

    cache = StageCache(tmp_path / "c", versions=VERSIONS)
    first = sharded_pass(cache, _tracker(), "teacher", {}, rows, 3, make_ds, lambda s: None)
    d = next((cache.root / "teacher").iterdir())
    shard = d / "part-00002.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    said = []
    again = sharded_pass(cache, _tracker(), "teacher", {}, rows, 3, make_ds, said.append)
    assert any("shard 2 of a finished output is unreadable" in s for s in said), said
    pd.testing.assert_frame_equal(again, first)
    assert (d / "_SUCCESS").exists() and first["y"].tolist() == [2 * i for i in range(10)]


class _DiesOnce:
    """An actor step whose process exits (as with its node lost) at row ``at`` the first time:
    Ray then has no actor to run the rest of the pass on (restarts 0)."""

    def __init__(self, flag: str, at: str) -> None:
        self.flag, self.at = flag, at

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        import os
        from pathlib import Path

        if (batch["id"] == self.at).any() and not Path(self.flag).exists():
            Path(self.flag).write_text("died")
            os._exit(1)
        return batch


@pytest.mark.timeout(600)
def test_work_lost_with_an_actor_is_retried_over_the_unfinished_shards_only(tmp_path):
    """An actor process dies mid-pass (a node lost looks the same to the driver: RayActorError):
    the pass restarts over the shards not yet written, says so, never rewrites a finished shard,
    and its output equals an undisturbed pass. A step's own exception is not retried."""
    import ray

    p = _pool(tmp_path / "pool.jsonl", 800)
    src = open_source(p, normaliser=TextRows(require_label=False), unit_rows=100)
    cache = StageCache(tmp_path / "c", versions=VERSIONS)
    no_restart = {"batch_size": 20, "max_restarts": 0, "max_task_retries": 0,
                  "compute": ray.data.ActorPoolStrategy(size=1)}
    steps = [Step(_DiesOnce, {"flag": str(tmp_path / "died"), "at": "r450"}, pool=no_restart,
                  columns=["text"])]
    written, said, stats = [], [], {}
    out = stream_pass(cache, _tracker(), "embed", {}, src, steps, said.append, stats=stats,
                      on_shard=lambda i, t: written.append(i), retries=1)
    assert (tmp_path / "died").exists()
    lost = [s for s in said if "work lost mid-pass" in s]
    assert len(lost) == 1 and "restarting the pass over them (retry 1/1)" in lost[0], said
    assert sorted(written) == list(range(len(src.units))), written  # each shard written once
    assert stats["rows"] == 800
    ref = stream_pass(StageCache(tmp_path / "ref", versions=VERSIONS), _tracker(), "embed", {},
                      src, [Step(identity, columns=["text"])], lambda s: None)
    pd.testing.assert_frame_equal(out.read_all(), ref.read_all())

    # the frame API the recipes use: the same retry
    rows = pd.DataFrame({"id": [f"r{i}" for i in range(40)], "x": range(40)})

    def make_ds(frames):
        return ray.data.from_pandas(frames).map_batches(
            _DiesOnce, fn_constructor_args=(str(tmp_path / "died2"), "r25"), batch_format="pandas",
            batch_size=5, compute=ray.data.ActorPoolStrategy(size=1), max_restarts=0,
            max_task_retries=0)

    said = []
    got = sharded_pass(StageCache(tmp_path / "c2", versions=VERSIONS), _tracker(), "teacher", {},
                       rows, 10, make_ds, said.append, retries=1)
    assert any("work lost mid-pass" in s for s in said), said
    assert got["id"].tolist() == rows["id"].tolist() and got["x"].tolist() == list(range(40))

    # a step's own error is not work lost: no retry, the error as it was
    def broken(frames):
        return ray.data.from_pandas(frames).map_batches(_shout_all, batch_format="pandas")

    said = []
    with pytest.raises(Exception, match="every row is bad"):
        sharded_pass(StageCache(tmp_path / "c3", versions=VERSIONS), _tracker(), "teacher", {},
                     rows, 10, broken, said.append, retries=2)
    assert not any("work lost" in s for s in said), said


def _shout_all(batch: pd.DataFrame) -> pd.DataFrame:
    raise ValueError("every row is bad")
