"""`raydapt --help` / `--version` and every sub-command's help: a description, an example, help
on positional arguments; a closed stdout pipe ends quietly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import raydapt
from raydapt.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]


def _commands():
    p = build_parser()
    sub = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction")
    out = {}
    for name, sp in sub.choices.items():
        nested = [a for a in sp._actions if a.__class__.__name__ == "_SubParsersAction"]
        if nested:
            out.update({f"{name} {n}": s for n, s in nested[0].choices.items()})
        else:
            out[name] = sp
    return p, out


def test_top_level_help_and_version(capsys):
    p, cmds = _commands()
    assert "Ray-native domain adaptation" in p.format_help() and "examples:" in p.format_help()
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"raydapt {raydapt.__version__}"
    assert {"run", "sweep", "config", "models", "cache", "dashboards", "submit", "jobs", "plan",
            "runs compare"} <= set(cmds)


def test_every_command_has_a_description_an_example_and_positional_help():
    _, cmds = _commands()
    for name, sp in cmds.items():
        text = sp.format_help()
        assert sp.description and len(sp.description) > 20, name
        assert "example:" in text and f"raydapt {name}" in text.split("example:")[1], name
        for a in sp._actions:
            if not a.option_strings:
                assert a.help, (name, a.dest)
    gpu = next(a for a in cmds["plan"]._actions if "--gpu" in a.option_strings)
    assert set(gpu.choices) >= {"h100", "a100"} and "cpu" not in gpu.choices


def test_runs_compare_help_is_its_own(capsys):
    with pytest.raises(SystemExit):
        main(["runs", "compare", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: raydapt runs compare") and "--experiment" in out


def test_models_list_has_a_header_and_prepared_column(capsys):
    assert main(["models", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["MODEL", "PREPARED"]
    assert all(ln.startswith("pkg:") for ln in lines[1:]) and len(lines) >= 3


def test_closed_stdout_pipe_ends_without_a_traceback():
    r, w = os.pipe()
    os.close(r)  # the reader (e.g. `head`) is gone before anything is written
    try:
        p = subprocess.run([sys.executable, "-m", "raydapt.cli", "config", "schema"], stdout=w,
                           stderr=subprocess.PIPE, text=True, timeout=120, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        os.close(w)
    assert "Traceback" not in p.stderr and "BrokenPipeError" not in p.stderr, p.stderr
    assert p.returncode == 141
