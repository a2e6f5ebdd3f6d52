#!/usr/bin/env bash
# Create .venv and install ia3 into it.  Usage: scripts/setup.sh [test]
#   (no argument) ia3 + the offline demo model;  test: also the test tools and the peft oracle.
# torch is installed first, so that pip never pulls a multi-GB CUDA build onto a machine without a GPU:
#   a GPU (nvidia-smi works): the default PyPI build (CUDA);
#   no GPU: a local CPU wheel when pip's find-links has one (torch==2.13.0), else PyTorch's CPU index.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip install "torch>=2.2"
  elif tmp=$(mktemp -d) && pip download --no-deps --no-index -d "$tmp" "torch==2.13.0" >/dev/null 2>&1; then
    rm -rf "$tmp"
    pip install "torch==2.13.0"        # the local CPU wheel (pip's find-links); its dependencies from PyPI
  else
    pip install "torch>=2.2" --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
  fi
fi
extras="demo"
[ "${1:-}" = "test" ] && extras="demo,test"
pip install -e ".[${extras}]"
.venv/bin/python -c "import torch, transformers, ia3; print(f'ia3 {ia3.__version__} | torch {torch.__version__} (cuda: {torch.cuda.is_available()}) | transformers {transformers.__version__}')"
