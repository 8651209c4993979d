#!/usr/bin/env bash
# The test suite as CI runs it (the README's test command), in three parts:
#   1. the core suite: every test but the slow, gpu, vllm and cluster ones, as two pytest
#      processes side by side (--part 1 / --part 2), then the kill / resume test alone (--part 3);
#   2. the cluster rehearsal, in a process of its own (it switches Ray to token auth);
#   3. the vLLM tests, in vLLM's own venv (.venv-vllm, scripts/setup-vllm.sh).
# The vLLM venv is built in the background while parts 1 and 2 run: its ~3.6 GB of wheels are
# mostly download and disk (~45 s of CPU, docs/engines.md), so it costs the suite little wall
# time. A complete venv is skipped by setup-vllm.sh itself. Stops at the first failing part with
# its exit code; extra arguments go to every pytest call (e.g. -x).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
log=${VLLM_SETUP_LOG:-.venv-vllm-setup.log}

# its own session, so that a failure below can stop the whole build (uv included)
if command -v setsid >/dev/null; then
  setsid bash scripts/setup-vllm.sh >"$log" 2>&1 &
else
  bash scripts/setup-vllm.sh >"$log" 2>&1 &
fi
build=$!
stop_build() {
  if kill -0 "$build" 2>/dev/null; then
    kill -- "-$build" 2>/dev/null || kill "$build" 2>/dev/null
    echo "test.sh: stopped the vLLM venv build (rerun to build it)"
  fi
}
trap stop_build EXIT

# The core suite as pytest processes (--part, tests/conftest.py): parts 1 and 2 side by side
# (much of a test's time is Ray starting processes and waiting on them, so one process leaves a
# core idle), each with its own local Ray and log, printed when both are done; then part 3, the
# kill / resume test, alone.
core=(-m "not slow and not gpu and not vllm and not cluster" -p no:cacheprovider --durations=15)
logs=$(mktemp -d)
"$PY" -m pytest "${core[@]}" --part 1 "$@" >"$logs/part1.log" 2>&1 &
p1=$!
"$PY" -m pytest "${core[@]}" --part 2 "$@" >"$logs/part2.log" 2>&1 &
p2=$!
echo "test.sh: core suite parts 1 and 2 side by side; follow them with" \
  "tail -f $logs/part1.log $logs/part2.log"
stop_parts() { kill "$p1" "$p2" 2>/dev/null; stop_build; }
trap stop_parts EXIT
wait "$p1"; rc1=$?
wait "$p2"; rc2=$?
trap stop_build EXIT
for p in 1 2; do echo "=== core suite, part $p ==="; cat "$logs/part$p.log"; done
rm -rf "$logs"
# rc 5 = no test collected: a failure on a plain run, fine for a part that extra arguments
# (e.g. -k) leave empty
ok() { [ "$1" -eq 0 ] || { [ "$1" -eq 5 ] && [ "$nargs" -gt 0 ]; }; }
nargs=$#
ok "$rc1" || exit "$rc1"
ok "$rc2" || exit "$rc2"
echo "=== core suite, part 3 ==="
"$PY" -m pytest "${core[@]}" --part 3 "$@"
rc3=$?
ok "$rc3" || exit "$rc3"
"$PY" -m pytest -m cluster tests/cluster -p no:cacheprovider --durations=5 "$@" || exit $?

echo "test.sh: waiting for the vLLM venv build ($log)"
if ! wait "$build"; then
  tail -n 40 "$log"
  echo "test.sh: scripts/setup-vllm.sh failed (log above)"
  exit 1
fi
tail -n 2 "$log"
.venv-vllm/bin/python -m pytest -m vllm tests/vllm_cpu -p no:cacheprovider "$@"
