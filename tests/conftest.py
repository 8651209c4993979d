"""Shared fixtures: one local Ray instance per session, offline hub, data location."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RAYDAPT_DATA", REPO.parent / "shared" / "data"))


# ``--part 1`` / ``--part 2`` / ``--part 3``: the core suite as pytest processes
# (scripts/test.sh). Parts 1 and 2 run side by side: part 1 is the PART_1 files, part 2 every
# test not named here, so that each holds some of the long end-to-end tests and both keep the
# machine's two cores busy (docs/testing.md). Part 3 (PART_3) runs alone afterwards: the kill /
# resume test starts two local Ray instances of its own and restarts them four times, and a Ray
# start next to two busy pytest processes once took over Ray's fixed 30 s to register its node.
PART_1 = ("tests/recipes/test_ntk_select_recipe.py", "tests/recipes/test_dallmi_recipe.py",
          "tests/recipes/test_simda_stream.py", "tests/cluster/test_job_s3.py")
PART_3 = ("tests/recipes/test_resume_and_faults.py",)


def pytest_addoption(parser):
    parser.addoption("--part", choices=("1", "2", "3"), default=None,
                     help="run one part of the suite (PART_1 / the rest / PART_3 in "
                          "tests/conftest.py)")


def pytest_collection_modifyitems(config, items):
    """``--part``: keep one part of the suite; ``ray`` on every test that uses the
    ``ray_local`` fixture; ``gpu`` tests skip without CUDA."""
    import torch

    part = config.getoption("--part")
    if part is not None:
        missing = [f for f in (*PART_1, *PART_3) if not (REPO / f).exists()]
        if missing:
            raise pytest.UsageError(f"tests/conftest.py names missing test files: {missing}")
        named = {str(REPO / f): p for p, files in (("1", PART_1), ("3", PART_3)) for f in files}
        keep = [it for it in items if named.get(str(it.path), "2") == part]
        config.hook.pytest_deselected(items=[it for it in items if it not in keep])
        items[:] = keep

    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
    # File order, not "Ray tests last": Ray reads its auth mode once per process. With the
    # session's local instance started after the submit tests' in-process job client, the
    # driver had no token while the new GCS required one, and every later Ray test errored
    # ("Failed to start GCS"; docs/testing.md).
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    """One line counting the end-to-end tests (marker ``e2e``) by outcome, so a run that
    skipped or failed the pipelines says so beside pytest's own totals."""
    counts: dict[str, int] = {}
    for outcome in ("passed", "failed", "error", "skipped"):
        for rep in terminalreporter.stats.get(outcome, []):
            if "e2e" in getattr(rep, "keywords", {}) and rep.when in ("call", "setup"):
                if outcome == "passed" and rep.when != "call":
                    continue
                counts[outcome] = counts.get(outcome, 0) + 1
    if counts:
        terminalreporter.write_line(
            "end-to-end tests (e2e): " + ", ".join(f"{n} {k}" for k, n in counts.items()))


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance shared by every test that needs one (start-up costs ~7 s)."""
    import ray

    from raydapt.core.runtime import init_ray

    init_ray(num_cpus=2, progress=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA / "amazon" / "books.jsonl").exists():
        msg = f"research data not found at {DATA} (set RAYDAPT_DATA)"
        if os.environ.get("CI", "").lower() in ("1", "true"):
            # CI must run the end-to-end pipelines, never pass by skipping them
            pytest.fail(msg + ": CI runs every end-to-end test", pytrace=False)
        pytest.skip(msg)
    return DATA


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture
def tiny_simda_job(data_dir):
    """Write a tiny SimDA job (books -> kitchen) and its data into a directory; returns the YAML.

    ``make(d, source_rows=24, extra_source=[rows], target_rows=None | n, tag="", name="tiny",
    **sections)``: the source is the first ``source_rows`` books reviews plus ``extra_source``;
    the target is kitchen.jsonl linked whole (``target_rows=None``) or its first n rows copied;
    run / tracking paths live under ``d`` (suffixed ``-tag``); ``sections`` (``teacher={...}``,
    ``tracking={...}``, ``data={...}``, ...) are merged over that base."""
    def make(d: Path, *, source_rows: int = 24, extra_source: list[dict] = (),
             target_rows: int | None = None, tag: str = "", name: str = "tiny",
             **sections) -> Path:
        books = (data_dir / "amazon/books.jsonl").read_text().splitlines()[:source_rows]
        (d / "src.jsonl").write_text(
            "\n".join(books + [json.dumps(r) for r in extra_source]) + "\n")
        if target_rows is None:
            target = "kitchen.jsonl"
            if not (d / target).exists():
                (d / target).symlink_to(data_dir / "amazon/kitchen.jsonl")
        else:
            target = "tgt.jsonl"
            rows = (data_dir / "amazon/kitchen.jsonl").read_text().splitlines()[:target_rows]
            (d / target).write_text("\n".join(rows) + "\n")
        sfx = f"-{tag}" if tag else ""
        job = {"method": "simda",
               "run": {"name": name, "output_dir": f"{d}/runs{sfx}", "cache_dir": f"{d}/cache{sfx}"},
               "tracking": {"uri": f"sqlite:///{d}/mlruns{sfx}.db",
                            "artifact_location": f"{d}/art{sfx}"},
               "data": {"root": str(d), "source": {"path": "src.jsonl"},
                        "target": {"path": target}}}
        path = d / f"job{sfx}.yaml"
        path.write_text(yaml.safe_dump(_merge(job, sections), sort_keys=False))
        return path
    return make
