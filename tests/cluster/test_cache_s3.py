"""The stage cache on an object store (issue 24 item 3), against the S3-compatible server on
127.0.0.1 (tests/cluster/conftest.py): the same keys and layout as on a local path, a plain
stage committed by ``_SUCCESS`` written after its files, a sharded pass killed after some shards
resumed by writing only the missing ones, and a finished entry read on a machine with an empty
scratch mirror."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from s3_objects import list_objects  # tests/cluster/s3_objects.py

from raydapt.core.cache import StageCache
from raydapt.core.tracking import Tracker
from raydapt.data.readers import TextRows, open_source
from raydapt.stages.sharded import Step, identity, sharded_pass, stream_pass

pytestmark = pytest.mark.timeout(600)

VERSIONS = {"embed": 1, "teacher": 1, "model": 2}
BUCKET = "rdtest"


def setup_module(module) -> None:
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(module)


def _tracker() -> Tracker:
    return Tracker(enabled=False, uri="sqlite:///unused.db", experiment="x", artifact_location="")


def _objects(s3, prefix: str) -> dict[str, tuple[str, object]]:
    return list_objects(s3, BUCKET, prefix)


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """This test's own scratch mirror root (``RAYDAPT_SCRATCH``); ``scratch("b")`` switches to
    another one, as a second machine that shares only the object store would have."""
    def use(name: str = "a"):
        monkeypatch.setenv("RAYDAPT_SCRATCH", str(tmp_path / f"scratch-{name}"))
    use()
    return use


def test_plain_stage_same_keys_and_files_locally_and_on_s3(tmp_path, s3_client, scratch,
                                                           request):
    prefix = f"{request.node.name}/cache"
    parts = {"model": "pkg:all-minilm-l6-v2", "rows": 12, "lr": 1e-3}
    local = StageCache(tmp_path / "cache", versions=VERSIONS)
    remote = StageCache(f"s3://{BUCKET}/{prefix}", versions=VERSIONS)
    assert remote.key("model", parts) == local.key("model", parts)

    def compute(d):  # what a library writes into a directory: nested files, binary
        (d / "weights").mkdir()
        (d / "weights" / "w.bin").write_bytes(bytes(range(256)) * 40)
        (d / "meta.json").write_text('{"acc": 0.5}')

    ld, ldone = local.get("model", parts)
    rd, rdone = remote.get("model", parts)
    assert not ldone and not rdone and ld.name == rd.name
    assert ld.relative_to(local.root) == rd.relative_to(remote.root)
    compute(ld)
    compute(rd)
    # before the commit: the key file is in the store, nothing marks the entry finished
    assert set(_objects(s3_client, prefix)) == {f"model/{rd.name}/_KEY.json"}
    local.commit(ld)
    remote.commit(rd)
    objs = _objects(s3_client, prefix)
    rel = f"model/{rd.name}"
    assert set(objs) == {f"{rel}/{f}" for f in ("_KEY.json", "weights/w.bin", "meta.json",
                                                   "_SUCCESS")}
    # the same layout, the same bytes as the local cache (the marker's content aside)
    for f in ("_KEY.json", "weights/w.bin", "meta.json"):
        body = s3_client.get_object(Bucket=BUCKET, Key=f"{prefix}/{rel}/{f}")["Body"].read()
        assert body == (ld / f).read_bytes(), f
    assert (ld / "_SUCCESS").read_text() == ""  # a local cache is written as before
    assert [e["key"] for e in remote.entries()] == [e["key"] for e in local.entries()]
    assert remote.entries()[0]["path"] == f"s3://{BUCKET}/{prefix}/{rel}"

    # another machine: an empty mirror, the entry is downloaded, the same files come back
    scratch("b")
    other = StageCache(f"s3://{BUCKET}/{prefix}", versions=VERSIONS)
    od, odone = other.get("model", parts)
    assert odone and od != rd and (od / "weights" / "w.bin").read_bytes() == (
        ld / "weights" / "w.bin").read_bytes()
    # a hit on a mirror that holds this commit downloads nothing
    ino = (od / "meta.json").stat().st_ino
    assert other.get("model", parts) == (od, True) and (od / "meta.json").stat().st_ino == ino
    # a new commit of the same entry elsewhere (e.g. recomputed after `cache rm`) is fetched
    remote.uncommit(rd)
    (rd / "meta.json").write_text('{"acc": 0.75}')
    remote.commit(rd)
    od2, _ = other.get("model", parts)
    assert json.loads((od2 / "meta.json").read_text()) == {"acc": 0.75}
    # `raydapt cache rm`: the entry goes from the store (and the mirror)
    other.remove(other.entries()[0]["path"])
    assert other.entries() == [] and _objects(s3_client, prefix) == {} and not od2.exists()
    assert not other.get("model", parts)[1]


def test_an_upload_killed_midway_leaves_no_marker_and_is_redone(tmp_path, s3_client, scratch,
                                                                request):
    """A driver SIGKILLed while committing a plain stage: the files uploaded so far are there,
    the one in flight is absent (an object is absent or complete), no ``_SUCCESS``; the rerun
    does not take the entry for finished, wipes it and recomputes."""
    prefix = f"{request.node.name}/cache"
    uri = f"s3://{BUCKET}/{prefix}"
    child = (
        "import sys, os\n"
        "from raydapt.core.cache import StageCache\n"
        f"c = StageCache({uri!r}, versions={VERSIONS!r})\n"
        "d, _ = c.get('model', {'x': 1})\n"
        "(d / 'a.txt').write_text('a')\n"
        "(d / 'big.bin').write_bytes(os.urandom(96 << 20))\n"
        "print(d.name, flush=True)\n"
        "c.commit(d)\n")
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        name = proc.stdout.readline().strip()
        rel = f"model/{name}"
        t0 = time.time()
        while f"{rel}/a.txt" not in _objects(s3_client, prefix):
            assert proc.poll() is None and time.time() - t0 < 120, "no upload seen"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    objs = set(_objects(s3_client, prefix))
    assert objs == {f"{rel}/_KEY.json", f"{rel}/a.txt"}, objs
    cache = StageCache(uri, versions=VERSIONS)
    d2, done = cache.get("model", {"x": 1})
    assert not done and d2.name == name
    assert set(_objects(s3_client, prefix)) == {f"{rel}/_KEY.json"}
    (d2 / "a.txt").write_text("a2")
    cache.commit(d2)
    assert cache.get("model", {"x": 1})[1]
    assert set(_objects(s3_client, prefix)) == {f"{rel}/{f}" for f in (
        "_KEY.json", "a.txt", "_SUCCESS")}


@pytest.mark.usefixtures("ray_local")
def test_stream_pass_killed_after_3_shards_resumes_on_s3(tmp_path, s3_client, scratch,
                                                         request):
    prefix = f"{request.node.name}/cache"
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"id": f"r{i}", "text": f"row {i}"}) + "\n"
                            for i in range(600)))
    src = open_source(pool, normaliser=TextRows(require_label=False), unit_rows=100)
    n = len(src.units)
    steps = [Step(identity, columns=["text"])]
    cache = StageCache(f"s3://{BUCKET}/{prefix}", versions=VERSIONS)

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
    before = _objects(s3_client, prefix)
    shards = {k: v for k, v in before.items() if "/part-" in k}
    assert len(shards) == 3 and not any(k.endswith("_SUCCESS") for k in before)
    # the rerun, from another machine (an empty scratch): only the missing shards are written
    scratch("b")
    said, stats = [], {}
    out = stream_pass(StageCache(f"s3://{BUCKET}/{prefix}", versions=VERSIONS), _tracker(),
                      "embed", {}, src, steps, said.append, stats=stats)
    assert stats["shards_computed"] == n - 3 and stats["shards_reused"] == 3
    assert any(f"resuming, 3/{n}" in s for s in said), said
    after = _objects(s3_client, prefix)
    assert {k: after[k] for k in shards} == shards  # the same objects: not rewritten
    assert sum("/part-" in k for k in after) == n
    marker = next(k for k in after if k.endswith("_SUCCESS"))
    assert after[marker][1] >= max(v[1] for k, v in after.items() if "/part-" in k)
    df = out.read_all()
    assert df["id"].tolist() == [f"r{i}" for i in range(600)]
    # identical to the same pass on a local cache
    local = stream_pass(StageCache(tmp_path / "c", versions=VERSIONS), _tracker(), "embed", {},
                        src, steps, lambda s: None)
    pd.testing.assert_frame_equal(df, local.read_all())
    assert out.where.startswith(f"s3://{BUCKET}/{prefix}/embed/") and \
        out.where.rsplit("/", 1)[1] == local.d.name
    # a third run: cached, nothing written
    said = []
    stream_pass(StageCache(f"s3://{BUCKET}/{prefix}", versions=VERSIONS), _tracker(), "embed",
                {}, src, steps, said.append)
    assert any(f"cached (s3://{BUCKET}/{prefix}/embed/" in s for s in said), said
    assert _objects(s3_client, prefix) == after


@pytest.mark.usefixtures("ray_local")
def test_frame_sharded_pass_recomputes_a_truncated_shard_on_s3(s3_client, scratch, request):
    import ray

    prefix = f"{request.node.name}/cache"
    rows = pd.DataFrame({"id": [f"r{i}" for i in range(10)], "x": range(10)})

    def make_ds(frames):
        return ray.data.from_pandas(frames).map_batches(
            lambda b: b.assign(y=b["x"] * 2), batch_format="pandas")

    cache = StageCache(f"s3://{BUCKET}/{prefix}", versions=VERSIONS)
    first = sharded_pass(cache, _tracker(), "teacher", {}, rows, 3, make_ds, lambda s: None)
    objs = _objects(s3_client, prefix)
    key = next(k for k in objs if k.endswith("part-00002.parquet"))
    body = s3_client.get_object(Bucket=BUCKET, Key=f"{prefix}/{key}")["Body"].read()
    s3_client.put_object(Bucket=BUCKET, Key=f"{prefix}/{key}", Body=body[: len(body) // 2])
    said = []
    again = sharded_pass(cache, _tracker(), "teacher", {}, rows, 3, make_ds, said.append)
    assert any("shard 2 of a finished output is unreadable" in s for s in said), said
    pd.testing.assert_frame_equal(again, first)
    assert any("resuming, 3/4 shards already done" in s for s in said), said
    after = _objects(s3_client, prefix)  # shard 2 rewritten (the same bytes: deterministic)
    assert {k: v[0] for k, v in after.items() if "/part-" in k} == {
        k: v[0] for k, v in objs.items() if "/part-" in k}
    marker = key.rsplit("/", 1)[0] + "/_SUCCESS"
    assert after[marker][0] != objs[marker][0]  # a new commit, after the recomputed shard
    assert first["y"].tolist() == [2 * i for i in range(10)]


@pytest.mark.usefixtures("ray_local")
def test_training_rows_on_s3_are_read_by_ray_data_tasks_from_the_bucket(s3_client, scratch,
                                                                        request):
    """A fit's rows (issue 25 item 3) on an object-store cache: the shards are objects in the
    bucket, nothing is downloaded into the scratch mirror, and Ray Data's read tasks read them
    from the bucket, one block per shard; a finished output is reused."""
    import numpy as np

    from raydapt.stages.sharded import write_rows

    prefix = f"{request.node.name}/cache"
    rows = pd.DataFrame({"id": [f"r{i}" for i in range(30)],
                         "p_t": [np.array([i / 30, 1 - i / 30]) for i in range(30)]})
    cache = StageCache(f"s3://{BUCKET}/{prefix}", versions={"train-rows": 1})
    out = write_rows(cache, "train-rows", {"ids": "s3"}, lambda: [rows.iloc[:11], rows.iloc[11:]],
                     30, 4, lambda s: None)
    objs = _objects(s3_client, prefix)
    assert sorted(k.rsplit("/", 1)[1] for k in objs) == [
        "_KEY.json", "_SUCCESS", *(f"part-{i:05d}.parquet" for i in range(4))]
    assert not list(out.d.glob("part-*"))  # the shards live in the bucket only
    blocks = [b for b in out.dataset().iter_batches(batch_size=None, batch_format="pandas")]
    assert sorted(len(b) for b in blocks) == [7, 7, 8, 8]  # one block per shard
    back = pd.concat(blocks, ignore_index=True).sort_values(
        "id", key=lambda s: s.str[1:].astype(int))
    assert back["id"].tolist() == rows["id"].tolist()
    np.testing.assert_array_equal(np.stack(back["p_t"]), np.stack(rows["p_t"]))
    called = []
    write_rows(cache, "train-rows", {"ids": "s3"}, lambda: called.append(1) or [rows], 30, 4,
               lambda s: None)
    assert not called and _objects(s3_client, prefix) == objs
