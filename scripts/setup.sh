#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install multiway-align.
#
# torch is never replaced: if the Python used here already has torch (a CUDA
# build on a GPU box, say), the venv sees it through --system-site-packages;
# otherwise the CPU wheel torch==2.13.0 is installed first so pip never pulls a
# multi-GB CUDA build as a dependency.
#   VENV=.venv  PYTHON=python3  EXTRAS=dev,demo,bench  bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-dev,demo,bench}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] $PYTHON already has torch $("$PYTHON" -c 'import torch; print(torch.__version__)'): reusing it"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch==2.13.0 (CPU wheel)"
  "${PIP[@]}" "torch==2.13.0"
fi
echo "[setup] installing multiway-align[$EXTRAS]"
"${PIP[@]}" -e ".[$EXTRAS]"
echo "[setup] done: $("$VENV/bin/python" -c 'import torch, lightning; print("torch", torch.__version__, "lightning", lightning.__version__)')"
