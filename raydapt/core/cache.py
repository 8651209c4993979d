"""Content-addressed stage outputs: a stage's output directory is named by the hash of
everything that determines it (stage config, model fingerprint, code version, input fingerprints).

A finished output carries a ``_SUCCESS`` marker written last, so a half-written directory (a run
killed mid-stage) is never taken for a finished one. A plain stage's partial directory is wiped and
recomputed; a sharded stage (:class:`ShardedOutput`) keeps the shards that were finished — each
shard file appears atomically (written to a temporary name, then renamed) — and computes only the
missing ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd


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
    error; listing and removing entries needs no versions."""

    def __init__(self, root: str | Path, *, versions: Mapping[str, int] | None = None,
                 enabled: bool = True) -> None:
        self.root = Path(root)
        self.versions = dict(versions or {})
        self.enabled = enabled

    def key(self, stage: str, parts: dict[str, Any]) -> str:
        if stage not in self.versions:
            raise KeyError(f"stage {stage!r} has no code version: add it to the STAGE_VERSIONS "
                           "of the recipe that owns it")
        return stage_key(stage, self.versions[stage], parts)

    def get(self, stage: str, parts: dict[str, Any], *, keep_partial: bool = False
            ) -> tuple[Path, bool]:
        """The stage's directory and whether it is finished. An unfinished directory is wiped,
        unless ``keep_partial`` (sharded stages), where only temporary files are removed."""
        d = self.root / stage / self.key(stage, parts)
        if self.enabled and (d / "_SUCCESS").exists():
            return d, True
        if d.exists():
            if keep_partial and self.enabled:
                for tmp in d.glob(".*.tmp"):
                    tmp.unlink()
            else:
                shutil.rmtree(d)  # partial output of an interrupted run
        d.mkdir(parents=True, exist_ok=True)
        (d / "_KEY.json").write_text(json.dumps({"stage": stage, **parts}, indent=1, default=str))
        return d, False

    @staticmethod
    def commit(d: Path) -> None:
        (d / "_SUCCESS").write_text("")

    @staticmethod
    def uncommit(d: Path) -> None:
        """Take back a finished marker (a shard of the output turned out to be bad)."""
        (d / "_SUCCESS").unlink(missing_ok=True)

    def siblings(self, stage: str, parts: dict[str, Any], *, differing: str) -> list[
            tuple[Path, Any, bool]]:
        """Other directories of ``stage`` whose key parts equal ``parts`` except ``differing``
        (e.g. ``shard_rows``): (directory, their value of it, finished?)."""
        want = json.loads(json.dumps({"stage": stage, **parts}, default=str))
        want.pop(differing, None)
        mine = self.root / stage / self.key(stage, parts)
        out = []
        for kf in sorted((self.root / stage).glob("*/_KEY.json")):
            if kf.parent == mine:
                continue
            try:
                key = json.loads(kf.read_text())
            except (OSError, ValueError):
                continue
            value = key.pop(differing, None)
            if key == want:
                out.append((kf.parent, value, (kf.parent / "_SUCCESS").exists()))
        return out

    def entries(self, *, unfinished: bool = True) -> list[dict[str, Any]]:
        """Every stage output: finished ones, and (``unfinished``) directories an interrupted
        run left (``done`` False; their key is shown with ``(unfinished, N shards)``)."""
        out = []
        for kf in sorted(self.root.glob("*/*/_KEY.json")):
            d = kf.parent
            done = (d / "_SUCCESS").exists()
            if not done and not unfinished:
                continue
            size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
            key = d.name if done else (
                f"{d.name} (unfinished, {len(list(d.glob('part-*.parquet')))} shards)")
            out.append({"stage": d.parent.name, "key": key, "bytes": size, "path": str(d),
                        "done": done})
        return out


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
    """

    def __init__(self, d: Path, n_rows: int, shard_rows: int, *, n_shards: int | None = None
                 ) -> None:
        if shard_rows < 1:
            raise ValueError("shard_rows must be >= 1")
        self.d, self.n_rows, self.shard_rows = Path(d), n_rows, shard_rows
        self.by_range = n_shards is None
        self.n_shards = max(1, -(-n_rows // shard_rows)) if n_shards is None else n_shards

    def path(self, i: int) -> Path:
        return self.d / f"part-{i:05d}.parquet"

    def rows(self, i: int) -> slice:
        """Input row positions of shard ``i`` (a row-range output)."""
        return slice(i * self.shard_rows, min(self.n_rows, (i + 1) * self.shard_rows))

    def expected_rows(self, i: int) -> int | None:
        if not self.by_range:
            return None
        r = self.rows(i)
        return max(0, r.stop - r.start)

    def check(self, i: int) -> str | None:
        """None if shard ``i`` is done and sound, else why not (missing, unreadable, short)."""
        import pyarrow.parquet as pq

        p = self.path(i)
        if not p.exists():
            return "missing"
        try:
            md = pq.read_metadata(p)
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
        out = {}
        for i in range(self.n_shards):
            if self.path(i).exists():
                why = self.check(i)
                if why is not None:
                    out[i] = why
        return out

    def missing(self) -> list[int]:
        """Shards still to compute: absent or failing :meth:`check`."""
        return [i for i in range(self.n_shards) if self.check(i) is not None]

    def write(self, i: int, df: pd.DataFrame) -> None:
        import pyarrow as pa

        self.write_table(i, pa.Table.from_pandas(df, preserve_index=False))

    def write_table(self, i: int, table: Any) -> None:
        """Write shard ``i`` (a pyarrow Table) atomically, its row count in the footer."""
        import pyarrow.parquet as pq

        meta = dict(table.schema.metadata or {})
        meta[ROWS_META] = str(table.num_rows).encode()
        tmp = self.d / f".part-{i:05d}.parquet.tmp"
        pq.write_table(table.replace_schema_metadata(meta), tmp)
        os.replace(tmp, self.path(i))

    def verify(self) -> dict[int, str]:
        """Every shard that is not done and sound → why (empty: the output is complete)."""
        return {i: why for i in range(self.n_shards) if (why := self.check(i)) is not None}

    def read_all(self, columns: list[str] | None = None) -> pd.DataFrame:
        bad = self.verify()
        if bad:
            i, why = next(iter(bad.items()))
            raise RuntimeError(f"{self.d}: {len(bad)} shard(s) not done, e.g. {i}: {why}")
        frames = [pd.read_parquet(self.path(i), columns=columns) for i in range(self.n_shards)]
        return pd.concat(frames, ignore_index=True)

    def iter_tables(self, columns: list[str] | None = None):
        """Shards one at a time as pyarrow Tables (``columns`` a shard lacks are skipped)."""
        import pyarrow.parquet as pq

        for i in range(self.n_shards):
            p = self.path(i)
            names = set(pq.read_schema(p).names)
            yield pq.read_table(p, columns=None if columns is None else [
                c for c in columns if c in names])
