"""An S3-compatible server on 127.0.0.1 (moto's server mode: a real HTTP S3 API) for the
storage tests, started once per session and torn down (its process group killed) after."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from raydapt.ops.local_cluster import free_ports

S3_ENV = ("RAYDAPT_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
          "AWS_DEFAULT_REGION")


@pytest.fixture(scope="session")
def s3_endpoint():
    """The endpoint URL; ``RAYDAPT_S3_ENDPOINT`` and test credentials are set in this process
    (and so in the Ray workers and `raydapt run` subprocesses it starts) while it lives. The
    bucket ``rdtest`` exists."""
    pytest.importorskip("moto", reason="moto[server] (dev extra) is not installed")
    port = free_ports(1)[0]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    old = {k: os.environ.get(k) for k in S3_ENV}
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


@pytest.fixture
def s3_client(s3_endpoint):
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint)
