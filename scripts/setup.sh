#!/usr/bin/env bash
# Set up (or update) the project's virtualenv: the one install path used by `make serve`, `make test`, CI and Docker.
#
# 1. torch==$TORCH_VERSION first, the build that fits the host:
#    - a wheel pip already has locally (its configured find-links) is used when it satisfies the pin, offline;
#    - else, with no GPU (no `nvidia-smi`), the CPU build from PyTorch's own CPU wheel index (no multi-GB CUDA
#      download on CPU-only machines), falling back to pip's configured indexes when that index is unreachable;
#    - with a GPU, the default (CUDA) build.
#    M2PT_TORCH=cpu|cuda overrides the detection (the Docker build has no GPU but wants CUDA); TORCH_CPU_INDEX_URL
#    overrides the CPU index.
# 2. the project and its test extra, constrained to the exact versions in constraints.txt (what the tests and the
#    README's answers were produced with).
# Idempotent: a second run changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TORCH_CPU_INDEX_URL="${TORCH_CPU_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
EXTRAS="${M2PT_EXTRAS:-test}"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "[setup] error: Python >= 3.11 is needed ($PYTHON is $("$PYTHON" --version 2>&1)); set PYTHON=python3.11" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

torch_flavour() {
  case "${M2PT_TORCH:-auto}" in
    cpu | cuda) echo "$M2PT_TORCH" ;;
    auto) if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo cuda; else echo cpu; fi ;;
    *) echo "[setup] error: M2PT_TORCH must be auto, cpu or cuda, not '$M2PT_TORCH'" >&2; exit 1 ;;
  esac
}

torch_ok() {  # the pinned torch is installed, and a CUDA build where one is wanted
  "$VENV/bin/python" - "$TORCH_VERSION" "$1" <<'EOF' 2>/dev/null
import sys
import torch
pin, flavour = sys.argv[1], sys.argv[2]
ok = torch.__version__.split("+")[0] == pin and (flavour == "cpu" or torch.version.cuda is not None)
sys.exit(0 if ok else 1)
EOF
}

install_torch() {
  local flavour="$1"
  # torch alone (--no-deps): its own dependencies come with the project's, under constraints.txt.
  if [ "$flavour" = cpu ]; then
    # A local wheel first (pip's find-links, no index): works offline where the machine provides one.
    if "${PIP[@]}" install --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null; then
      echo "[setup] torch==$TORCH_VERSION from a local wheel"
      return
    fi
    echo "[setup] installing torch==$TORCH_VERSION (CPU build) from $TORCH_CPU_INDEX_URL"
    if ! "${PIP[@]}" install --no-deps --index-url "$TORCH_CPU_INDEX_URL" "torch==$TORCH_VERSION"; then
      echo "[setup] warning: $TORCH_CPU_INDEX_URL unreachable; falling back to pip's configured indexes" >&2
      "${PIP[@]}" install --no-deps "torch==$TORCH_VERSION"
    fi
  else
    echo "[setup] installing torch==$TORCH_VERSION (CUDA build, the default one)"
    "${PIP[@]}" install "torch==$TORCH_VERSION"
    if ! torch_ok cuda; then
      echo "[setup] warning: the torch pip chose has no CUDA support; for a GPU build run:" >&2
      echo "[setup]   $VENV/bin/pip install --force-reinstall --no-deps --index-url https://download.pytorch.org/whl/cu128 torch==$TORCH_VERSION" >&2
    fi
  fi
}

FLAVOUR="$(torch_flavour)"
if ! torch_ok "$FLAVOUR"; then
  install_torch "$FLAVOUR"
fi
echo "[setup] installing m2pt-serve[$EXTRAS] with the versions of constraints.txt"
"${PIP[@]}" install -c constraints.txt -e ".[$EXTRAS]"
touch "$VENV/.installed"
echo "[setup] done: $("$VENV/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
echo "[setup] the m2pt command is $VENV/bin/m2pt (or run: source $VENV/bin/activate)"
