"""raydapt.core.storage on a local path and on an S3-compatible server on 127.0.0.1 (moto's
server mode, a real HTTP S3 API): atomic objects, sharded resume, the commit marker written
last, and an unreachable store failing in one line."""

from __future__ import annotations

import socket

import pandas as pd
import pytest

from raydapt.core.storage import MARKER, StorageError, Store

pytestmark = pytest.mark.timeout(300)


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return Store(tmp_path / "cache")
    request.getfixturevalue("s3_endpoint")
    return Store(f"s3://rdtest/{request.node.name.replace('[', '-').rstrip(']')}/cache")


def test_objects_round_trip(store):
    assert not store.exists("a/b.json") and store.ls("a") == []
    store.write_json("a/b.json", {"x": 1})
    store.write_bytes("a/c.bin", b"\x00\x01")
    assert store.read_json("a/b.json") == {"x": 1} and store.read_bytes("a/c.bin") == b"\x00\x01"
    assert store.ls("a") == ["b.json", "c.bin"]
    df = pd.DataFrame({"p": [0.25, 0.75]}, index=pd.Index(["r1", "r2"], name="id"))
    store.write_parquet("a/d.parquet", df)
    pd.testing.assert_frame_equal(store.read_parquet("a/d.parquet"), df)
    store.delete("a/c.bin")
    assert store.ls("a") == ["b.json", "d.parquet"]
    store.check()


def test_sharded_resume_and_commit_marker_last(store):
    """ShardedOutput on a Store: a fresh view after a run that died after one shard sees what
    is done; the marker appears only with the commit."""
    from raydapt.core.cache import StageCache

    cache = StageCache(store.root, versions={"teacher": 1})
    rows = pd.DataFrame({"id": [f"r{i}" for i in range(10)], "y": range(10)})
    d, done = cache.get("teacher", {"k": 123}, keep_partial=True)
    sh = cache.sharded(d, n_rows=10, shard_rows=4)
    assert not done and sh.n_shards == 3 and sh.missing() == [0, 1, 2]
    sh.write(0, rows.iloc[sh.rows(0)])              # a run that dies after one shard
    d, done = cache.get("teacher", {"k": 123}, keep_partial=True)
    again = cache.sharded(d, n_rows=10, shard_rows=4)
    assert not done and again.missing() == [1, 2]
    for i in again.missing():
        again.write(i, rows.iloc[again.rows(i)])
    rel = cache.rel(d)
    assert MARKER not in store.ls(rel)  # nothing marks it done before commit
    cache.commit(d)
    assert MARKER in store.ls(rel) and cache.get("teacher", {"k": 123}, keep_partial=True)[1]
    pd.testing.assert_frame_equal(again.read_all(), rows)
    # a different key (content addressing) is a different directory
    d2, _ = cache.get("teacher", {"k": 456}, keep_partial=True)
    assert cache.sharded(d2, 10, 4).missing() == [0, 1, 2]


def test_an_unreachable_object_store_is_one_line(monkeypatch):
    monkeypatch.setenv("RAYDAPT_S3_ENDPOINT", f"http://127.0.0.1:{_free_port()}")  # nobody
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    with pytest.raises(StorageError) as e:
        Store("s3://nobucket/prefix").check()
    msg = str(e.value)
    assert msg.startswith("storage s3://nobucket/prefix is not usable: ") and "\n" not in msg


def test_a_missing_bucket_is_one_line(s3_endpoint):
    with pytest.raises(StorageError, match="storage s3://no-such-bucket/x is not usable"):
        Store("s3://no-such-bucket/x").check()
