#!/usr/bin/env bash
# Install mcd-jax into .venv and run the full test suite (about 8 minutes
# on 2 CPU cores). Extra arguments go to pytest, e.g. `-k parity`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
VENV="${MCD_VENV:-.venv}"
exec "$VENV/bin/python" -m pytest -q -rs "$@"
