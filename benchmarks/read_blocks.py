"""Ray Data's block split of small reads: ``read_rows`` with and without the reader's size hint.

    python benchmarks/read_blocks.py   # -> benchmarks/results/read-blocks-cpu.json

Without a size estimate Ray Data splits a read into ``read_op_min_num_blocks`` (200) blocks, so
the 2,000-row Amazon kitchen file becomes 200 ten-row blocks and every operation after the read
(``read_rows`` filters and collects it three times) runs 200 tasks. With the hint
(``RowSource.dataset(size_hint=True)``, what ``read_rows`` uses) Ray Data keeps ~1 MiB blocks.
Measured on one local Ray node (2 CPUs), after one warm-up read (worker start-up), 3 repeats
each, alternating. The stage-1 rows/s in ``stream_pass_stage1_10k`` are two runs of
``pool_scale.py run --size 10000 --layout files --passes stage1 --no-record`` made back to back
with the hint forced on and off (typed from their console lines); they are why streamed passes
keep the default split.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "read-blocks-cpu.json"
DATA = Path(os.environ.get("RAYDAPT_DATA", ROOT.parent / "shared" / "data"))


def main() -> None:
    from raydapt.core.runtime import init_ray
    from raydapt.data import readers

    path = DATA / "amazon" / "kitchen.jsonl"
    init_ray(num_cpus=2, progress=False)
    readers.read_rows(path)  # warm-up: Ray's workers start and import the reader
    times: dict[str, list[float]] = {"size_hint": [], "no_hint": []}
    blocks = {}
    original = readers.RowSource.dataset
    for _ in range(3):
        for mode in ("no_hint", "size_hint"):
            hint = mode == "size_hint"
            readers.RowSource.dataset = (  # type: ignore[method-assign]
                lambda self, units=None, *, size_hint=False, _h=hint: original(
                    self, units, size_hint=_h))
            t0 = time.time()
            rows, _ = readers.read_rows(path)
            times[mode].append(round(time.time() - t0, 2))
            blocks[mode] = rows.num_blocks()
    readers.RowSource.dataset = original  # type: ignore[method-assign]
    res = {
        "command": "python benchmarks/read_blocks.py",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": describe(),
        "file": "amazon/kitchen.jsonl (2,000 rows)",
        "read_rows_seconds": times,
        "read_rows_median_seconds": {k: statistics.median(v) for k, v in times.items()},
        "blocks_of_the_rows": blocks,
        "stream_pass_stage1_10k": {
            "command": "python benchmarks/pool_scale.py run --size 10000 --layout files "
                       "--passes stage1 --no-record --cache /tmp/ab-cache",
            "rows_per_s": {"size_hint": 154.6, "no_hint": 170.6},
            "wall_s": {"size_hint": 64.77, "no_hint": 58.75},
            "date": "2026-12-07 01:44-01:47 UTC, back to back, nothing else running",
        },
    }
    OUT.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res["read_rows_median_seconds"]), blocks)


if __name__ == "__main__":
    main()
