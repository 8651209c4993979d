"""``ray.driver_returns_freed_memory``: a driver that frees memory gives it back to the kernel.

Each case runs in a fresh interpreter (an allocator's state is per process): it raises glibc's
dynamic mmap threshold the way a large temporary array does, then allocates and frees 100 MiB in
1 MiB blocks with a small block allocated after them (so the heap's top cannot be trimmed), and
reports how much of the 100 MiB the process still holds.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CHILD = r"""
import json, sys
import numpy as np

if sys.argv[1] == "return":
    from raydapt.core.runtime import return_freed_memory
    done = return_freed_memory()
else:
    done = {}
import pyarrow as pa

def anon():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) / 1024 for l in f if l.startswith("RssAnon:"))

big = np.ones(16 << 20, np.uint8)  # mmapped; its free raises the default threshold to 16 MiB
del big
before = anon()
blocks = [np.ones(1 << 20, np.uint8) for _ in range(100)]
pin = bytearray(64 << 10)  # above the blocks on the heap, when they are on the heap
held = anon() - before
del blocks
print(json.dumps({"held_mb": held, "kept_mb": anon() - before, "done": done,
                  "arrow_pool": pa.default_memory_pool().backend_name}))
"""


def _run(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; glibc's mallopt")
def test_freed_memory_goes_back_to_the_kernel_only_with_the_setting():
    keep, ret = _run("keep"), _run("return")
    # both really held the 100 MiB, so what they keep after freeing it is comparable
    assert keep["held_mb"] > 90 and ret["held_mb"] > 90, (keep, ret)
    assert keep["kept_mb"] > 80, keep  # the allocators' defaults keep the freed blocks
    assert ret["kept_mb"] < 10, ret  # the setting gives them back
    assert ret["done"] == {"arrow_system_pool": True, "glibc_mmap_threshold": True}
    assert ret["arrow_pool"] == "system" and keep["arrow_pool"] != "system"


def test_the_setting_is_on_by_default_and_reaches_init_ray():
    import inspect

    from raydapt.config import RaySection
    from raydapt.core.runtime import init_ray

    assert RaySection().driver_returns_freed_memory is True
    assert inspect.signature(init_ray).parameters["driver_returns_freed_memory"].default is True
