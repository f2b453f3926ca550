#!/usr/bin/env bash
# Set up (or update) the project's virtualenv: the one install path used by `make serve`, `make test`, CI and Docker.
# torch is pinned to 2.13.0 and installed first, so pip never resolves an unpinned (multi-GB CUDA) torch on CPU hosts.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "[setup] installing torch==$TORCH_VERSION"
  "${PIP[@]}" install "torch==$TORCH_VERSION"
fi
echo "[setup] installing m2pt-serve and its dependencies"
"${PIP[@]}" install -e ".[test]"
touch "$VENV/.installed"
echo "[setup] done: $("$VENV/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
