"""Content-addressed stage outputs: a stage's output directory is named by the hash of
everything that determines it (stage config, model fingerprint, code version, input fingerprints).

A finished output carries a ``_SUCCESS`` marker written last, so a half-written directory (a run
killed mid-stage) is never taken for a finished one: it is wiped and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

# Bump a stage's version when its code changes what it writes.
STAGE_VERSIONS: dict[str, int] = {"read": 1, "teacher": 2, "store": 1, "knn": 1, "prompted": 2}


def stage_key(stage: str, parts: dict[str, Any]) -> str:
    blob = json.dumps({"stage": stage, "v": STAGE_VERSIONS.get(stage, 1), **parts},
                      sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class StageCache:
    """``get(stage, parts)`` -> (directory, done?). Write into the directory, then ``commit``."""

    def __init__(self, root: str | Path, *, enabled: bool = True) -> None:
        self.root = Path(root)
        self.enabled = enabled

    def get(self, stage: str, parts: dict[str, Any]) -> tuple[Path, bool]:
        d = self.root / stage / stage_key(stage, parts)
        if self.enabled and (d / "_SUCCESS").exists():
            return d, True
        if d.exists():
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
