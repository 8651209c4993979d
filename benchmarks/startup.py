"""What a process pays before any model work: imports with and without bytecode, `ray.init`, and
an empty Ray Train fit.

    python benchmarks/startup.py [--repeats 3] → benchmarks/results/startup-cpu.json

- imports: `python -c "import X"` in a fresh process, median of --repeats, once with the venv's
  .pyc files and once without any: PYTHONDONTWRITEBYTECODE=1 plus PYTHONPYCACHEPREFIX at an
  empty directory, so Python finds no .pyc and compiles every module from source, which is what
  a venv installed by uv without --compile-bytecode costs where PYTHONDONTWRITEBYTECODE is set
  (this workplace's CI; docs/testing.md);
- `ray.init(num_cpus=2)` of a local instance, its first task, and `ray.shutdown()`;
- a Ray Train TorchTrainer fit of an empty loop on 2 gloo workers, twice in one Ray instance.

Wall times on this machine (benchmarks/machine.py describes it); run it with nothing else running.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe, matmul_peak  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "startup-cpu.json"
MODULES = ("torch", "transformers", "deepspeed", "ray.train.torch", "mlflow",
           "raydapt.recipes.simda")

_RAY = """
import time
t0 = time.time()
import ray
t1 = time.time()
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
t2 = time.time()
ray.get(ray.remote(lambda: 1).remote())
t3 = time.time()
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
fits = []
for i in range(2):
    t = time.time()
    TorchTrainer(lambda cfg: None, torch_config=TorchConfig(backend="gloo"),
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.9}),
                 run_config=RunConfig(name=f"empty{i}", storage_path=STORE)).fit()
    fits.append(round(time.time() - t, 2))
t4 = time.time()
ray.shutdown()
t5 = time.time()
import json
print("RESULT", json.dumps({"import_ray_s": round(t1 - t0, 2), "ray_init_s": round(t2 - t1, 2),
                 "first_task_s": round(t3 - t2, 2), "empty_train_fit_s": fits,
                 "ray_shutdown_s": round(t5 - t4, 2)}))
"""


def _time_import(module: str, env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    base = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    imports: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as empty:
        nopyc = {**base, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPYCACHEPREFIX": empty}
        for m in MODULES:
            _time_import(m, base)  # page cache warm for both
            w = statistics.median(_time_import(m, base) for _ in range(a.repeats))
            wo = statistics.median(_time_import(m, nopyc) for _ in range(a.repeats))
            imports[m] = {"with_pyc_s": round(w, 2), "without_pyc_s": round(wo, 2),
                          "ratio": round(wo / w, 2)}
            print(f"import {m}: {w:.2f} s with .pyc, {wo:.2f} s without", flush=True)
        assert not any(Path(empty).iterdir()), "a .pyc was written under the empty prefix"
    with tempfile.TemporaryDirectory() as store:
        r = subprocess.run([sys.executable, "-c", f"STORE = {store!r}\n" + _RAY], env=base,
                           capture_output=True, text=True, check=True)
    ray_t = json.loads(next(ln for ln in r.stdout.splitlines()
                            if ln.startswith("RESULT"))[7:])
    print("ray:", ray_t)
    doc = {"benchmark": "process start-up: imports with / without bytecode, ray.init, an empty "
                        "Ray Train fit",
           "command": "python benchmarks/startup.py", "machine": describe(),
           "fp32_matmul": matmul_peak("float32", threads=2),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
           "repeats": a.repeats, "imports": imports, "ray": ray_t}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
