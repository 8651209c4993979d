"""raydapt.core.storage on a local path and on an S3-compatible server on 127.0.0.1 (moto's
server mode, a real HTTP S3 API): atomic objects, sharded resume, the commit marker written
last, and an unreachable store failing in one line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest

from raydapt.core.storage import MARKER, ShardedStore, StorageError, Store

pytestmark = pytest.mark.timeout(300)


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def s3_endpoint():
    pytest.importorskip("moto", reason="moto[server] (dev extra) is not installed")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    old = {k: os.environ.get(k) for k in ("RAYDAPT_S3_ENDPOINT", "AWS_ACCESS_KEY_ID",
                                          "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update({"RAYDAPT_S3_ENDPOINT": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        import boto3

        t0 = time.time()
        while True:
            try:
                boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="rdtest")
                break
            except Exception:
                if time.time() - t0 > 120 or proc.poll() is not None:
                    raise
                time.sleep(0.5)
        yield endpoint
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


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
    rows = pd.DataFrame({"id": [f"r{i}" for i in range(10)], "y": range(10)}).set_index("id")
    sh = ShardedStore(store, "teacher/key123", n_rows=10, shard_rows=4)
    assert sh.n_shards == 3 and sh.missing() == [0, 1, 2]
    sh.write(0, rows.iloc[sh.rows(0)])              # a run that dies after one shard
    # the rerun: a fresh view of the same directory sees what is done, only the rest is left
    again = ShardedStore(store, "teacher/key123", n_rows=10, shard_rows=4)
    assert again.missing() == [1, 2] and not again.committed()
    with pytest.raises(RuntimeError, match=r"cannot commit, shards \[1, 2\] missing"):
        again.commit()
    for i in again.missing():
        again.write(i, rows.iloc[again.rows(i)])
    assert MARKER not in store.ls("teacher/key123")  # nothing marks it done before commit
    again.commit({"stage": "teacher"})
    assert again.committed() and MARKER in store.ls("teacher/key123")
    pd.testing.assert_frame_equal(again.read_all(), rows)
    assert store.read_json(f"teacher/key123/{MARKER}")["n_rows"] == 10
    # a different key (content addressing lives in the cache) is a different directory
    assert ShardedStore(store, "teacher/key456", 10, 4).missing() == [0, 1, 2]


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
