"""The installed stack carries its bytecode (scripts/setup.sh: `uv pip install --compile-bytecode`).

uv, unlike pip, installs packages as source only. Where PYTHONDONTWRITEBYTECODE is set (this
workplace and its CI) Python then never writes a .pyc, and every process -- the driver, each Ray
worker, Ray Train worker and vLLM engine process -- recompiles torch, transformers, DeepSpeed, Ray
and MLflow at import. That doubled the suite once without a failing test (docs/testing.md); this
test makes it fail.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

HEAVY = ("torch", "transformers", "deepspeed", "ray", "mlflow")


@pytest.mark.parametrize("name", HEAVY)
def test_heavy_packages_are_installed_with_their_bytecode(name):
    # located, not imported: the check needs the files only (DeepSpeed's import alone is ~5 s)
    init = Path(importlib.util.find_spec(name).origin)
    cached = Path(importlib.util.cache_from_source(str(init)))
    # a sample of the package's own modules, not only its __init__
    sample = sorted(init.parent.rglob("*.py"))[:200]
    missing = [p for p in sample
               if not Path(importlib.util.cache_from_source(str(p))).exists()]
    assert cached.exists(), f"{name}: no {cached.name}; reinstall with bash scripts/setup.sh"
    assert len(missing) <= len(sample) // 20, (
        f"{name}: {len(missing)} of {len(sample)} modules have no .pyc (e.g. {missing[:3]}); "
        "the venv was installed without bytecode: bash scripts/setup.sh")
