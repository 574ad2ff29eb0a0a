#!/usr/bin/env bash
# The README's first command: install, then run the embedded demo fine-tune on the CPU
# (a tiny Llama learns to reverse words; no GPU, no internet, no downloaded weights or data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
ftcore run full_finetune --config demo/reverse_full "$@"
