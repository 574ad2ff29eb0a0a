#!/usr/bin/env bash
# Install ftcore (editable) and what it needs. Keeps an already-installed torch (e.g. your CUDA build);
# otherwise pins torch==2.13.0, which on CPU-only machines is the CPU build rather than gigabytes of CUDA.
# Usage: bash scripts/install.sh [extras]   e.g. `dev` for the test tools and reference libraries.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if ! python3 -c "import torch" 2>/dev/null; then
  python3 -m pip install -q "torch==2.13.0"
fi
if [ -n "$extras" ]; then
  python3 -m pip install -q -e ".[$extras]"
else
  python3 -m pip install -q -e .
fi
