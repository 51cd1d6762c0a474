#!/usr/bin/env bash
# Create .venv (if missing) and install mcd-jax with its test extras into it.
#
# torch is installed first, pinned to a CPU build, so that no later
# requirement pulls a CUDA build of several GB. Where a local wheel of
# torch 2.13.0 is on pip's find-links path it is used; elsewhere the CPU
# wheel comes from the PyTorch CPU index.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${MCD_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if ls "${PIP_FIND_LINKS:-/nonexistent}"/torch-"$TORCH_VERSION"* >/dev/null 2>&1; then
    "${PIP[@]}" "torch==$TORCH_VERSION"
  else
    "${PIP[@]}" "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"${PIP[@]}" -e ".[test]" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
