"""Content-addressed stage outputs: a stage's output directory is named by the hash of
everything that determines it (stage config, model fingerprint, code version, input fingerprints).

A finished output carries a ``_SUCCESS`` marker written last, so a half-written directory (a run
killed mid-stage) is never taken for a finished one. A plain stage's partial directory is wiped and
recomputed; a sharded stage (:class:`ShardedOutput`) keeps the shards that were finished — each
shard file appears atomically (written to a temporary name, then renamed) — and computes only the
missing ones.

The cache root is a local path or an object-store URI (``s3://bucket/prefix``, through
:mod:`raydapt.core.storage`). Keys and layout are the same on both (``<stage>/<key>/_KEY.json``,
``part-NNNNN.parquet``, ``_SUCCESS``). On a URI:

- a sharded stage's shards are written straight to the store, each in one upload (an object
  is visible only once complete), so a killed run keeps every finished shard wherever it ran;
- a plain stage (models, FAISS indexes, arrays: files a library writes into a directory) is
  computed into a local scratch mirror of its entry (:func:`~raydapt.core.storage.scratch_dir`),
  then :meth:`StageCache.commit` uploads its files and writes ``_SUCCESS`` last; a hit downloads
  the entry into the mirror (skipped when the mirror holds the same commit) and returns that
  path.

What is atomic: each object (shard, file, marker) on its own, and the entry as a whole through
``_SUCCESS``: a reader that sees the marker sees every file of the entry. What is not: an
upload killed midway leaves some files without a marker (the entry counts as unfinished and a
plain stage is recomputed); two runs computing the same entry at once both upload (same key,
so the same content up to nondeterminism), the later marker wins.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import posixpath
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from raydapt.core.storage import MARKER, Store, is_uri, scratch_dir


def stage_key(stage: str, version: int, parts: dict[str, Any]) -> str:
    """The content address of one stage output: the stage, its code version and everything
    that determines it (``parts``)."""
    blob = json.dumps({"stage": stage, "v": version, **parts},
                      sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class StageCache:
    """``get(stage, parts)`` -> (directory, done?). Write into the directory, then ``commit``.

    ``versions``: the code version of every stage this cache may hold, declared by the recipe
    that owns the stages (its ``STAGE_VERSIONS``): bump a stage's version when its code changes
    what it writes (old entries are then recomputed). Getting a stage missing there is an
    error; listing and removing entries needs no versions.

    ``root`` is a local path or a URI (module docstring): on a URI the directories ``get``
    returns are local mirrors under :attr:`root`, and :attr:`store` holds the entries."""

    def __init__(self, root: str | Path, *, versions: Mapping[str, int] | None = None,
                 enabled: bool = True) -> None:
        self.remote = is_uri(root)
        self.store = Store(root)
        self.uri = str(root).rstrip("/") if self.remote else None
        # local: the cache itself; URI: this machine's mirror of it
        self.root = scratch_dir(str(root), "cache") if self.remote else Path(root)
        self.versions = dict(versions or {})
        self.enabled = enabled

    def key(self, stage: str, parts: dict[str, Any]) -> str:
        if stage not in self.versions:
            raise KeyError(f"stage {stage!r} has no code version: add it to the STAGE_VERSIONS "
                           "of the recipe that owns it")
        return stage_key(stage, self.versions[stage], parts)

    def rel(self, d: Path) -> str:
        """``<stage>/<key>`` of an entry directory ``get`` returned."""
        return Path(d).relative_to(self.root).as_posix()

    def where(self, d: Path) -> str:
        """Where an entry lives, for messages: its directory, or its URI on a URI cache."""
        return self.store.uri(self.rel(d)) if self.remote else str(d)

    def get(self, stage: str, parts: dict[str, Any], *, keep_partial: bool = False
            ) -> tuple[Path, bool]:
        """The stage's directory and whether it is finished. An unfinished directory is wiped,
        unless ``keep_partial`` (sharded stages), where only temporary files are removed.

        On a URI cache: a finished plain entry is downloaded into the local mirror (the
        directory returned); a sharded one (``keep_partial``) is not: its shards are read from
        the store (:meth:`sharded`)."""
        key = self.key(stage, parts)
        d = self.root / stage / key
        if self.remote:
            return self._get_remote(stage, key, parts, d, keep_partial)
        if self.enabled and (d / MARKER).exists():
            return d, True
        if d.exists():
            if keep_partial and self.enabled:
                for tmp in d.glob(".*.tmp"):
                    tmp.unlink()
            else:
                shutil.rmtree(d)  # partial output of an interrupted run
        d.mkdir(parents=True, exist_ok=True)
        (d / "_KEY.json").write_text(_key_text(stage, parts))
        return d, False

    def _get_remote(self, stage: str, key: str, parts: dict[str, Any], d: Path,
                    keep_partial: bool) -> tuple[Path, bool]:
        rel = f"{stage}/{key}"
        if self.enabled and self.store.committed(rel):
            if not keep_partial:
                self._pull(rel, d)
            else:
                d.mkdir(parents=True, exist_ok=True)
            return d, True
        if not (keep_partial and self.enabled):
            self.store.delete_dir(rel)  # partial output of an interrupted run
        if d.exists():
            shutil.rmtree(d)  # the mirror of an unfinished (or another) commit
        d.mkdir(parents=True, exist_ok=True)
        text = _key_text(stage, parts)
        (d / "_KEY.json").write_text(text)
        self.store.write_bytes(f"{rel}/_KEY.json", text.encode())
        return d, False

    def _pull(self, rel: str, d: Path) -> None:
        """Mirror a finished remote entry into ``d``: nothing to do when ``d`` holds the same
        commit (its marker's bytes), else every file is downloaded and the marker copied last."""
        marker = self.store.read_bytes(f"{rel}/{MARKER}")
        if (d / MARKER).exists() and (d / MARKER).read_bytes() == marker:
            return
        if d.exists():
            shutil.rmtree(d)
        for name in sorted(self.store.files(rel)):
            if name != MARKER:
                self.store.download(f"{rel}/{name}", d / name)
        d.mkdir(parents=True, exist_ok=True)
        (d / MARKER).write_bytes(marker)

    def commit(self, d: Path) -> None:
        """Mark the entry finished. On a URI cache, first upload every file of its local
        directory (shards are already in the store), then write the marker: last."""
        d = Path(d)
        if not self.remote:
            (d / MARKER).write_text("")
            return
        rel = self.rel(d)
        n = 0
        for f in sorted(p for p in d.rglob("*") if p.is_file()):
            name = f.relative_to(d).as_posix()
            if name == MARKER or f.name.endswith(".tmp"):
                continue
            self.store.upload(f, f"{rel}/{name}")
            n += 1
        marker = json.dumps({"commit": uuid.uuid4().hex, "uploaded": n}).encode()
        self.store.write_bytes(f"{rel}/{MARKER}", marker)
        (d / MARKER).write_bytes(marker)  # the mirror holds this commit

    def uncommit(self, d: Path) -> None:
        """Take back a finished marker (a shard of the output turned out to be bad)."""
        d = Path(d)
        (d / MARKER).unlink(missing_ok=True)
        if self.remote and self.store.committed(self.rel(d)):
            self.store.delete(f"{self.rel(d)}/{MARKER}")

    def sharded(self, d: Path, n_rows: int, shard_rows: int, *, n_shards: int | None = None
                ) -> ShardedOutput:
        """The :class:`ShardedOutput` of entry ``d`` (on a URI cache: its shards in the
        store)."""
        if not self.remote:
            return ShardedOutput(d, n_rows, shard_rows, n_shards=n_shards)
        return ShardedOutput(d, n_rows, shard_rows, n_shards=n_shards, store=self.store,
                             rel=self.rel(d))

    def shard_count(self, d: Path | str) -> int:
        """How many ``part-*.parquet`` shards an entry (a :meth:`siblings` location) holds."""
        if not self.remote:
            return len(list(Path(d).glob("part-*.parquet")))
        rel = str(d)[len(self.uri) + 1:] if str(d).startswith(self.uri + "/") else self.rel(d)
        return sum(n.startswith("part-") and n.endswith(".parquet") for n in self.store.ls(rel))

    def _keys(self, stage: str | None = None) -> list[tuple[str, dict[str, int], bool]]:
        """(``<stage>/<key>``, its files → size, finished?) of every entry with a ``_KEY.json``."""
        if not self.remote:
            out = []
            for kf in sorted(self.root.glob(f"{stage or '*'}/*/_KEY.json")):
                d = kf.parent
                files = {f.relative_to(d).as_posix(): f.stat().st_size
                         for f in d.rglob("*") if f.is_file()}
                out.append((self.rel(d), files, (d / MARKER).exists()))
            return out
        by: dict[str, dict[str, int]] = {}
        for name, size in self.store.files(stage or "").items():
            parts = ((stage,) if stage else ()) + tuple(name.split("/"))
            if len(parts) >= 3:
                by.setdefault(f"{parts[0]}/{parts[1]}", {})["/".join(parts[2:])] = size
        return [(rel, files, MARKER in files) for rel, files in sorted(by.items())
                if "_KEY.json" in files]

    def siblings(self, stage: str, parts: dict[str, Any], *, differing: str) -> list[
            tuple[Path | str, Any, bool]]:
        """Other entries of ``stage`` whose key parts equal ``parts`` except ``differing``
        (e.g. ``shard_rows``): (directory — its URI on a URI cache —, their value of it,
        finished?)."""
        want = json.loads(json.dumps({"stage": stage, **parts}, default=str))
        want.pop(differing, None)
        mine = f"{stage}/{self.key(stage, parts)}"
        out = []
        for rel, _files, done in self._keys(stage):
            if rel == mine:
                continue
            try:
                key = json.loads(self.store.read_bytes(f"{rel}/_KEY.json"))
            except (OSError, ValueError):
                continue
            value = key.pop(differing, None)
            if key == want:
                out.append((self.store.uri(rel) if self.remote else self.root / rel, value, done))
        return out

    def entries(self, *, unfinished: bool = True) -> list[dict[str, Any]]:
        """Every stage output: finished ones, and (``unfinished``) directories an interrupted
        run left (``done`` False; their key is shown with ``(unfinished, N shards)``)."""
        out = []
        for rel, files, done in self._keys():
            if not done and not unfinished:
                continue
            stage, name = rel.split("/")
            n = sum(f.startswith("part-") and f.endswith(".parquet") for f in files)
            key = name if done else f"{name} (unfinished, {n} shards)"
            out.append({"stage": stage, "key": key, "bytes": sum(files.values()),
                        "path": self.store.uri(rel) if self.remote else str(self.root / rel),
                        "done": done})
        return out

    def remove(self, path: str) -> None:
        """Delete one entry (a ``path`` from :meth:`entries`) and its local mirror."""
        if self.remote:
            rel = path[len(self.uri) + 1:]
            self.store.delete_dir(rel)
            shutil.rmtree(self.root / rel, ignore_errors=True)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _key_text(stage: str, parts: dict[str, Any]) -> str:
    return json.dumps({"stage": stage, **parts}, indent=1, default=str)


ROWS_META = b"raydapt.rows"  # a shard's row count, in its parquet footer


class ShardedOutput:
    """A stage output stored as shards ``part-00000.parquet``, ... Either ``n_rows`` input rows
    in shards of ``shard_rows`` (shard i holds input rows [i*shard_rows, (i+1)*shard_rows)), or
    ``n_shards`` shards given directly (a streaming pass: one shard per read unit).

    A shard file is written to a temporary name and renamed, so it exists only when complete: a
    killed run leaves finished shards plus at most some ``.tmp`` files, and a rerun computes only
    :meth:`missing` shards. A shard counts as done only when it is *verified*: its parquet footer
    reads and its row count is the expected one (the input rows of its range, or the count
    written into its footer); :meth:`bad` names the others with the reason. :meth:`read_all`
    concatenates shards in order, so the result does not depend on which run wrote which shard.

    With ``store`` (a :class:`~raydapt.core.storage.Store` on an object store) the shards are
    the objects under ``rel`` there instead of files in ``d``: each written in one upload
    (visible only once complete), verified and read the same way (:meth:`StageCache.sharded`
    builds it).
    """

    def __init__(self, d: Path, n_rows: int, shard_rows: int, *, n_shards: int | None = None,
                 store: Store | None = None, rel: str = "") -> None:
        if shard_rows < 1:
            raise ValueError("shard_rows must be >= 1")
        self.d, self.n_rows, self.shard_rows = Path(d), n_rows, shard_rows
        self.by_range = n_shards is None
        self.n_shards = max(1, -(-n_rows // shard_rows)) if n_shards is None else n_shards
        self.store, self.rel = store, rel.strip("/")
        self.where = store.uri(self.rel) if store is not None else str(self.d)

    def path(self, i: int) -> Path | str:
        """Shard ``i``'s file (its URI with a ``store``)."""
        if self.store is not None:
            return self.store.uri(self._name(i))
        return self.d / f"part-{i:05d}.parquet"

    def _name(self, i: int) -> str:
        return posixpath.join(self.rel, f"part-{i:05d}.parquet")

    def _src(self, i: int) -> tuple[Any, Any]:
        """(where, filesystem) for pyarrow readers."""
        if self.store is None:
            return self.path(i), None
        return self.store.path(self._name(i)), self.store.fs

    def _present(self) -> set[int] | None:
        """Shard indices present (one listing on a store; None locally: ask per file)."""
        if self.store is None:
            return None
        have = set(self.store.ls(self.rel))
        return {i for i in range(self.n_shards) if f"part-{i:05d}.parquet" in have}

    def _exists(self, i: int, present: set[int] | None) -> bool:
        if present is not None:
            return i in present
        if self.store is not None:
            return self.store.exists(self._name(i))
        return self.path(i).exists()

    def rows(self, i: int) -> slice:
        """Input row positions of shard ``i`` (a row-range output)."""
        return slice(i * self.shard_rows, min(self.n_rows, (i + 1) * self.shard_rows))

    def expected_rows(self, i: int) -> int | None:
        if not self.by_range:
            return None
        r = self.rows(i)
        return max(0, r.stop - r.start)

    def check(self, i: int, present: set[int] | None = None) -> str | None:
        """None if shard ``i`` is done and sound, else why not (missing, unreadable, short)."""
        import pyarrow.parquet as pq

        if not self._exists(i, present):
            return "missing"
        where, fs = self._src(i)
        try:
            md = pq.read_metadata(where, filesystem=fs) if fs is not None else \
                pq.read_metadata(where)
        except Exception as exc:  # noqa: BLE001 - truncated / not parquet: recompute it
            return f"unreadable ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})"
        want = self.expected_rows(i)
        if want is None:
            kv = md.metadata or {}
            if ROWS_META not in kv:
                return "no row count in its footer"
            want = int(kv[ROWS_META])
        if md.num_rows != want:
            return f"{md.num_rows} rows, expected {want}"
        return None

    def bad(self) -> dict[int, str]:
        """Shards that exist but fail :meth:`check` → the reason."""
        present = self._present()
        out = {}
        for i in range(self.n_shards):
            if self._exists(i, present):
                why = self.check(i, present)
                if why is not None:
                    out[i] = why
        return out

    def missing(self) -> list[int]:
        """Shards still to compute: absent or failing :meth:`check`."""
        present = self._present()
        return [i for i in range(self.n_shards) if self.check(i, present) is not None]

    def remove(self, i: int) -> None:
        """Delete shard ``i`` if it is there (a bad shard, before recomputing it)."""
        if self.store is None:
            self.path(i).unlink(missing_ok=True)
        elif self.store.exists(self._name(i)):
            self.store.delete(self._name(i))

    def write(self, i: int, df: pd.DataFrame) -> None:
        import pyarrow as pa

        self.write_table(i, pa.Table.from_pandas(df, preserve_index=False))

    def write_table(self, i: int, table: Any) -> None:
        """Write shard ``i`` (a pyarrow Table) atomically, its row count in the footer."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        meta = dict(table.schema.metadata or {})
        meta[ROWS_META] = str(table.num_rows).encode()
        table = table.replace_schema_metadata(meta)
        if self.store is not None:  # one upload of the whole file
            buf = pa.BufferOutputStream()
            pq.write_table(table, buf)
            self.store.write_bytes(self._name(i), buf.getvalue().to_pybytes())
            return
        tmp = self.d / f".part-{i:05d}.parquet.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, self.path(i))

    def verify(self) -> dict[int, str]:
        """Every shard that is not done and sound → why (empty: the output is complete)."""
        present = self._present()
        return {i: why for i in range(self.n_shards)
                if (why := self.check(i, present)) is not None}

    def _read(self, i: int, columns: list[str] | None = None):
        import pyarrow.parquet as pq

        where, fs = self._src(i)
        return pq.read_table(where, columns=columns, filesystem=fs)

    def _require_done(self) -> None:
        """Raise, naming one, if any shard is not done and sound."""
        bad = self.verify()
        if bad:
            i, why = next(iter(bad.items()))
            raise RuntimeError(f"{self.where}: {len(bad)} shard(s) not done, e.g. {i}: {why}")

    def read_all(self, columns: list[str] | None = None) -> pd.DataFrame:
        self._require_done()
        if self.store is None:
            frames = [pd.read_parquet(self.path(i), columns=columns)
                      for i in range(self.n_shards)]
        else:
            frames = [pd.read_parquet(self.store.path(self._name(i)), columns=columns,
                                      filesystem=self.store.fs) for i in range(self.n_shards)]
        return pd.concat(frames, ignore_index=True)

    def dataset(self, columns: list[str] | None = None):
        """The shards as a Ray Dataset whose read tasks read them themselves (files, or objects
        on a URI cache): one read task and one block per shard, in shard order where the
        consumer preserves order. Nothing passes through the driver, so a training set written
        as a stage output reaches the Ray Train workers from the files, not from a driver
        frame. (``ray.data.read_parquet`` would bundle small shards into one block.)"""
        import ray
        from ray.data import Datasource, ReadTask
        from ray.data.block import BlockMetadata

        self._require_done()
        srcs = [self._src(i) for i in range(self.n_shards)]

        def read(where: Any, fs: Any) -> list[Any]:
            import pyarrow.parquet as pq

            tbl = pq.read_table(where, columns=columns, filesystem=fs)
            return [tbl.replace_schema_metadata(None)]

        class Shards(Datasource):
            def estimate_inmemory_data_size(self) -> int | None:
                return None

            def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                               data_context: Any = None) -> list[Any]:
                return [ReadTask(functools.partial(read, w, fs),
                                 BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None,
                                               input_files=[str(w)]))
                        for w, fs in srcs]

            def get_name(self) -> str:
                return "ReadShards"

        # as many blocks as shards: Ray Data neither splits nor bundles them. The read tasks
        # ask for no CPU: a fit's Ray Train workers may hold every CPU of the cluster while they
        # read (a task waiting for a CPU would wait for ever), and reading a shard is I/O
        return ray.data.read_datasource(Shards(), override_num_blocks=self.n_shards,
                                        ray_remote_args={"num_cpus": 0})

    def iter_tables(self, columns: list[str] | None = None):
        """Shards one at a time as pyarrow Tables (``columns`` a shard lacks are skipped)."""
        import pyarrow.parquet as pq

        for i in range(self.n_shards):
            where, fs = self._src(i)
            names = set(pq.read_schema(where, filesystem=fs).names)
            yield self._read(i, None if columns is None else [
                c for c in columns if c in names])
