"""Record a pytest run's slowest tests and its total (docs/testing.md quotes them from here).

    python -m pytest ... --durations=60 > core.log
    python benchmarks/test_durations.py core.log --key core --conditions "idle machine"
        → benchmarks/results/test-durations-cpu.json (one key per recorded run, --key)

Parses pytest's "slowest N durations" block and its last summary line ("540 passed, ... in
3026.99s"); nothing is timed here. The machine is this one (benchmarks/machine.py); say in
--conditions what else ran beside the tests, since these are wall times.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "test-durations-cpu.json"
_DURATION = re.compile(r"^(\d+\.\d+)s (call|setup|teardown)\s+(\S+)")
_SUMMARY = re.compile(r"^=*\s*(.*?) in (\d+\.\d+)s")


def parse(text: str) -> dict:
    """{'summary': '540 passed, 2 skipped, ...', 'seconds': 3026.99, 'slowest': [...]}."""
    slowest, summary, seconds = [], None, None
    for line in text.splitlines():
        m = _DURATION.match(line.strip())
        if m:
            slowest.append({"seconds": float(m.group(1)), "phase": m.group(2),
                            "test": m.group(3)})
            continue
        m = _SUMMARY.match(line.strip())
        if m and ("passed" in m.group(1) or "failed" in m.group(1)):
            summary, seconds = m.group(1).strip("= "), float(m.group(2))
    if seconds is None:
        raise SystemExit("no pytest summary line ('N passed ... in Ss') in the log")
    return {"summary": summary, "seconds": seconds, "slowest": slowest}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("log", type=Path)
    ap.add_argument("--key", required=True, help="name of this run in the JSON")
    ap.add_argument("--command", default="", help="the pytest command that wrote the log")
    ap.add_argument("--conditions", required=True, help="what else ran on the machine")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--console", default="",
                    help="a regular expression: the log lines it matches (what a test printed, "
                    "run with -s) are kept under 'console'")
    args = ap.parse_args(argv)
    report = json.loads(args.out.read_text()) if args.out.exists() else {
        "benchmark": "test-durations-cpu"}
    text = args.log.read_text(errors="replace")
    report.setdefault("runs", {})[args.key] = {
        "command": args.command, "conditions": args.conditions, "machine": describe(),
        **parse(text)}
    if args.console:
        pat = re.compile(args.console)
        report["runs"][args.key]["console"] = [
            line for line in text.splitlines() if pat.search(line)]
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
