#!/usr/bin/env bash
# The README's second command (and what CI runs): install with the dev tools, lint, type-check, run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
ruff check src recipes scripts tests
ruff format --check src recipes scripts tests
mypy src
python3 -m pytest "$@"
