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

    def entries(self) -> list[dict[str, Any]]:
        out = []
        for marker in sorted(self.root.glob("*/*/_SUCCESS")):
            d = marker.parent
            size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
            out.append({"stage": d.parent.name, "key": d.name, "bytes": size, "path": str(d)})
        return out


class ShardedOutput:
    """A stage output of ``n_rows`` rows stored as shards ``part-00000.parquet``, ... of
    ``shard_rows`` input rows each (shard i holds input rows [i*shard_rows, (i+1)*shard_rows)).

    A shard file is written to a temporary name and renamed, so it exists only when complete: a
    killed run leaves finished shards plus at most some ``.tmp`` files, and a rerun computes only
    :meth:`missing` shards. :meth:`read_all` concatenates shards in order, so the result does not
    depend on which run wrote which shard.
    """

    def __init__(self, d: Path, n_rows: int, shard_rows: int) -> None:
        if shard_rows < 1:
            raise ValueError("shard_rows must be >= 1")
        self.d, self.n_rows, self.shard_rows = Path(d), n_rows, shard_rows
        self.n_shards = max(1, -(-n_rows // shard_rows))

    def path(self, i: int) -> Path:
        return self.d / f"part-{i:05d}.parquet"

    def rows(self, i: int) -> slice:
        """Input row positions of shard ``i``."""
        return slice(i * self.shard_rows, min(self.n_rows, (i + 1) * self.shard_rows))

    def missing(self) -> list[int]:
        return [i for i in range(self.n_shards) if not self.path(i).exists()]

    def write(self, i: int, df: pd.DataFrame) -> None:
        tmp = self.d / f".part-{i:05d}.parquet.tmp"
        df.to_parquet(tmp)
        os.replace(tmp, self.path(i))

    def read_all(self) -> pd.DataFrame:
        missing = self.missing()
        if missing:
            raise RuntimeError(f"{self.d}: shards {missing[:5]} missing")
        return pd.concat([pd.read_parquet(self.path(i)) for i in range(self.n_shards)],
                         ignore_index=True)
