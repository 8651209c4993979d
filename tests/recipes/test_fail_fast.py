"""Bad input found by a new-user probe (issue 16): every failure is one ``raydapt: error:`` line,
found before any stage runs where it can be, and nothing is silently skipped. These jobs all stop
at or before the read stage, so each test costs seconds, not a pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from raydapt.cli import main

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.timeout(300)]
REPO = Path(__file__).resolve().parents[2]


def _rows(n: int, prefix: str, label: str | None = "positive") -> list[dict]:
    return [{"id": f"{prefix}{i}", "text": f"review number {i} is {'good' if i % 2 else 'bad'}",
             **({"label": label if i % 2 else "negative"} if label else {})} for i in range(n)]


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def simda_job(tmp_path: Path, *, source: list | None = None, target: list | None = None) -> Path:
    """A tiny SimDA job over tmp_path/src.jsonl and tmp_path/tgt.jsonl (written unless None)."""
    if source is not None:
        _write_jsonl(tmp_path / "src.jsonl", source)
    if target is not None:
        _write_jsonl(tmp_path / "tgt.jsonl", target)
    job = tmp_path / "job.yaml"
    job.write_text(f"""
method: simda
run: {{name: ff, output_dir: {tmp_path}/runs, cache_dir: {tmp_path}/cache}}
tracking: {{uri: "sqlite:///{tmp_path}/mlruns.db", artifact_location: {tmp_path}/art,
           experiment: t}}
data: {{root: {tmp_path}, source: {{path: src.jsonl}}, target: {{path: tgt.jsonl}}}}
teacher: {{text_max_tokens: 32, demo_max_tokens: 12, pool: {{concurrency: 1, num_cpus: 1}}}}
annotate: {{k: 4, prompt_k: 2, baselines: [zero_shot, knn]}}
distill: {{variants: [kl], epochs: 1, batch_size: 8, max_length: 32, num_workers: 1}}
""")
    return job


def _error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("raydapt: error:")]


def test_file_whose_rows_are_all_bad_writes_rejects_then_one_error(tmp_path, capsys):
    bad = [{"id": f"b{i}", "text": "" if i % 2 else "ok", "label": "neutral"} for i in range(6)]
    job = simda_job(tmp_path, source=bad, target=_rows(20, "t", None))
    assert main(["run", str(job)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = _error_lines(err)
    rej_path = tmp_path / "runs/ff/rejects.parquet"
    assert f"no usable rows in {tmp_path / 'src.jsonl'}: 6 rejected, see {rej_path}" in line
    rej = pd.read_parquet(rej_path)
    assert sorted(rej["id"]) == [f"b{i}" for i in range(6)]
