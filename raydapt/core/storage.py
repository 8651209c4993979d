"""Run storage on a local path or an object store (``s3://bucket/prefix``), through
``pyarrow.fs``: what the stage cache, the sharded pass, outputs and checkpoints need when the
nodes of a cluster share no disk.

    store = Store("s3://bucket/raydapt/cache")        # or "/shared/cache", "gs://..."
    store.check()                                     # unreachable: one-line StorageError
    store.write_json("a/b.json", {...}); store.read_json("a/b.json"); store.ls("a")
    store.commit("a"); store.committed("a")           # the _SUCCESS marker, written last

The stage cache (:class:`raydapt.core.cache.StageCache`, :class:`~raydapt.core.cache.ShardedOutput`)
keeps its entries and shards in a ``Store``.

Atomicity: on a local path every object is written to a temporary name and renamed
(``os.replace``); on S3 an object becomes visible only when its upload completes (pyarrow
uploads it as a multipart upload completed at close), so a process killed mid-upload leaves
no object at all. A finished directory is marked by a ``_SUCCESS`` object written after every
other: a reader that sees ``_SUCCESS`` sees every file. One case leaves a short object: an
error raised *inside* an upload (pyarrow completes the upload when the stream is closed);
shards are therefore verified (footer, row count) before they count, and a plain entry
without its marker is recomputed.

S3 endpoint: AWS's defaults (env / ``~/.aws``), or an S3-compatible server through
``RAYDAPT_S3_ENDPOINT`` (``http://127.0.0.1:9000``) or ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import uuid
from pathlib import Path
from typing import Any

from raydapt import RaydaptError

MARKER = "_SUCCESS"


class StorageError(RaydaptError):
    """An unreachable or unusable storage location (one line, before any stage starts)."""


def is_uri(path: str | Path) -> bool:
    s = str(path)
    return "://" in s and not s.startswith("file://")


def _s3(endpoint: str | None):
    import pyarrow.fs as pafs

    kw: dict[str, Any] = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                          "connect_timeout": 5, "request_timeout": 20,
                          "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=2)}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kw.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    return pafs.S3FileSystem(**kw)


def filesystem(root: str | Path):
    """(pyarrow filesystem, base path) of a local path or a URI."""
    import pyarrow.fs as pafs

    s = str(root)
    if not is_uri(s):
        p = s[len("file://"):] if s.startswith("file://") else s
        return pafs.LocalFileSystem(), str(Path(p).expanduser().resolve())
    if s.startswith("s3://"):
        endpoint = os.environ.get("RAYDAPT_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
        return _s3(endpoint), s[len("s3://"):].rstrip("/")
    try:
        return pafs.FileSystem.from_uri(s)
    except Exception as exc:
        raise StorageError(f"cannot use storage {s}: {str(exc).splitlines()[0]}") from None


def scratch_dir(uri: str, kind: str) -> Path:
    """This machine's local stand-in for the URI location ``uri`` (``kind``: "cache",
    "output"): ``$RAYDAPT_SCRATCH`` (default ``<tmp>/raydapt-scratch-<uid>``)
    ``/<kind>/<hash of the URI>``. Files that must be local to be computed or read (models,
    indexes, a job's output files) live here and are copied to / from the URI."""
    import hashlib
    import tempfile

    root = os.environ.get("RAYDAPT_SCRATCH") or os.path.join(
        tempfile.gettempdir(), f"raydapt-scratch-{os.getuid()}")
    return Path(root) / kind / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]


_MIRRORS: dict[str, str] = {}  # local scratch directory -> the URI it stands for


def register_mirror(local: str | Path, uri: str) -> None:
    """Declare ``local`` the scratch stand-in of ``uri`` (see :func:`remote_of`)."""
    _MIRRORS[str(Path(local).resolve())] = uri.rstrip("/")


def remote_of(path: str | Path) -> str | None:
    """The URI a path under a registered scratch directory stands for (None: a plain local
    path). E.g. Ray Train's storage under a job's local output mirror goes to the object store
    itself, so its checkpoints survive the driver's machine."""
    if is_uri(path):
        return str(path)
    p = str(Path(path).resolve())
    for local, uri in _MIRRORS.items():
        if p == local or p.startswith(local + os.sep):
            return uri + p[len(local):].replace(os.sep, "/")
    return None


class Store:
    """A root directory (path or URI) and the objects under it, by relative path."""

    def __init__(self, root: str | Path) -> None:
        self.root = str(root)
        self.fs, self.base = filesystem(root)
        self.local = not is_uri(root)

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    def path(self, rel: str = "") -> str:
        return posixpath.join(self.base, rel) if rel else self.base

    def uri(self, rel: str = "") -> str:
        return self.root.rstrip("/") + ("/" + rel if rel else "")

    def check(self) -> None:
        """Write, read and delete a probe object: a location that cannot be used fails here,
        in one line, before any stage runs."""
        probe = f".raydapt-probe-{uuid.uuid4().hex[:8]}"
        try:
            self.write_bytes(probe, b"ok")
            ok = self.read_bytes(probe) == b"ok"
            self.delete(probe)
        except Exception as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StorageError(f"storage {self.root} is not usable: {msg[:300]}") from None
        if not ok:
            raise StorageError(f"storage {self.root}: a probe object read back differently")

    # objects -------------------------------------------------------------------------------

    def exists(self, rel: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write one object atomically (local: temp name + rename; S3: one upload, visible
        when complete)."""
        target = self.path(rel)
        parent = posixpath.dirname(target)
        if self.local:
            os.makedirs(parent, exist_ok=True)
            tmp = posixpath.join(parent, f".{posixpath.basename(target)}.{uuid.uuid4().hex[:8]}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
            return
        with self.fs.open_output_stream(target) as f:  # S3: completed at close
            f.write(data)

    def delete(self, rel: str) -> None:
        self.fs.delete_file(self.path(rel))

    def delete_dir(self, rel: str) -> None:
        import pyarrow.fs as pafs

        if self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound:
            self.fs.delete_dir(self.path(rel))

    def ls(self, rel: str = "") -> list[str]:
        """Names directly under ``rel`` (objects and prefixes), sorted; [] when absent."""
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(self.path(rel), allow_not_found=True, recursive=False)
        return sorted(posixpath.basename(i.path.rstrip("/")) for i in self.fs.get_file_info(sel))

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True).encode())

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def write_parquet(self, rel: str, df) -> None:
        buf = io.BytesIO()
        df.to_parquet(buf, index=True)
        self.write_bytes(rel, buf.getvalue())

    def read_parquet(self, rel: str):
        import pandas as pd

        return pd.read_parquet(io.BytesIO(self.read_bytes(rel)))

    def files(self, rel: str = "") -> dict[str, int]:
        """Every object under ``rel`` (recursive): its path relative to ``rel`` → size in
        bytes; {} when absent."""
        return {k: v[0] for k, v in self.infos(rel).items()}

    def infos(self, rel: str = "") -> dict[str, tuple[int, int]]:
        """Every object under ``rel`` (recursive) → (size, mtime in ns; 0 if unknown)."""
        import pyarrow.fs as pafs

        base = self.path(rel).rstrip("/")
        sel = pafs.FileSelector(base, allow_not_found=True, recursive=True)
        return {i.path[len(base) + 1:]: (i.size, i.mtime_ns or 0)
                for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File}

    def upload(self, local: str | Path, rel: str) -> None:
        """Copy one local file to the object ``rel`` (streamed, not read into memory; on S3 the
        object appears only once complete)."""
        import pyarrow.fs as pafs

        if self.local:
            os.makedirs(posixpath.dirname(self.path(rel)), exist_ok=True)
        pafs.copy_files(str(local), self.path(rel), source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)

    def download(self, rel: str, local: str | Path) -> None:
        """Copy the object ``rel`` to a local file (written to a temporary name, then renamed)."""
        import pyarrow.fs as pafs

        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.parent / f".{local.name}.{uuid.uuid4().hex[:8]}.tmp"
        pafs.copy_files(self.path(rel), str(tmp), source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        os.replace(tmp, local)

    # directories committed by a marker ------------------------------------------------------

    def commit(self, rel_dir: str, meta: dict[str, Any] | None = None) -> None:
        """Mark ``rel_dir`` complete: the marker object, written after everything in it."""
        self.write_json(posixpath.join(rel_dir, MARKER), meta or {})

    def committed(self, rel_dir: str) -> bool:
        return self.exists(posixpath.join(rel_dir, MARKER))


class OutputDir:
    """A job's output directory ``<run.output_dir>/<run.name>``. On a local path: that
    directory. On a URI: a local scratch mirror (:attr:`local`, where the job writes its files:
    ``results.json``, ``config.yaml``, plots, rejects) that :meth:`sync` uploads — the job
    syncs after writing its config and its results, and once more when it ends (also on
    failure). Ray Train runs under the mirror (``<local>/train``) get the URI itself as their
    storage (:func:`remote_of`), so their checkpoints never depend on this machine."""

    SKIP_DIRS = ("scratch",)  # per-worker checkpoint staging of the fits (raydapt.train)

    def __init__(self, output_dir: str | Path, name: str) -> None:
        self.remote = is_uri(output_dir)
        if self.remote:
            self.uri: str | None = str(output_dir).rstrip("/") + "/" + name
            self.local = scratch_dir(self.uri, "output")
            register_mirror(self.local, self.uri)
            self.store: Store | None = Store(self.uri)
        else:
            self.uri, self.store = None, None
            self.local = Path(output_dir) / name
        self.local.mkdir(parents=True, exist_ok=True)

    def where(self, rel: str = "") -> str:
        """A file's location for messages: its URI on an object store, else its path."""
        if self.store is not None:
            return self.store.uri(rel)
        return str(self.local / rel) if rel else str(self.local)

    def sync(self) -> int:
        """Upload every file of the mirror that the store lacks or holds older or of another
        size (hidden files: locks, temporaries, and the fits' ``scratch/`` are skipped);
        returns how many. A no-op on a local path."""
        if self.store is None:
            return 0
        have = self.store.infos()
        n = 0
        for f in sorted(p for p in self.local.rglob("*") if p.is_file()):
            rel = f.relative_to(self.local)
            if any(part.startswith(".") or part in self.SKIP_DIRS for part in rel.parts):
                continue
            st = f.stat()
            size, mtime = have.get(rel.as_posix(), (-1, 0))
            if size == st.st_size and mtime >= st.st_mtime_ns:
                continue
            self.store.upload(f, rel.as_posix())
            n += 1
        return n


def s3_env_for_mlflow(artifact_location: str) -> None:
    """MLflow's S3 artifact store reads its endpoint from ``MLFLOW_S3_ENDPOINT_URL``: an
    ``s3://`` artifact location with ``RAYDAPT_S3_ENDPOINT`` set (and that unset) gets it, so
    artifacts go to the same S3-compatible server as the cache and outputs."""
    ep = os.environ.get("RAYDAPT_S3_ENDPOINT")
    if str(artifact_location).startswith("s3://") and ep:
        os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", ep)
