#!/usr/bin/env bash
# Produce the tables of RESULTS.md: no system prompt, the default text prompt, DRO and MCD on the
# demo model, evaluated on our test split and on PolyRefuse's test split.
#
#   bash scripts/run_results.sh [DEMO_DIR] [OUT]   (defaults: checkpoints/demo, checkpoints/results)
#
# MCD is the prompt that launch/demo.sh trained in DEMO_DIR/train (run the demo first). DRO is
# trained here with the same settings (configs/demo_cpu.cfg) and the same estimation artifacts,
# on English only for 2 epochs, so both prompts take 40 optimizer steps. PolyRefuse is read from
# $MCD_JAX_DATA_DIR (a folder with polyrefuse/ in it, see mcd_jax/data/registry.py).
set -euo pipefail
cd "$(dirname "$0")/.."

DEMO="${1:-checkpoints/demo}"
OUT="${2:-checkpoints/results}"
PYTHON="${MCD_VENV:-.venv}/bin/python"
MODEL="packaged:qwen2.5-coder-0.5b-instruct"
COMMON=(--model="$MODEL" --soft_prompts=DRO="$OUT/dro",MCD="$DEMO/train" --max_new_tokens=32)
# PolyRefuse languages that the keyword judge covers (it has no Dutch, Polish or Yoruba phrases).
POLYREFUSE_LANGUAGES="ar,de,en,es,fr,it,ja,ko,ru,th,zh"

if [[ -z "${MCD_JAX_DATA_DIR:-}" || ! -d "${MCD_JAX_DATA_DIR}/polyrefuse" ]]; then
  echo "Set MCD_JAX_DATA_DIR to a folder that contains polyrefuse/ (PolyRefuse's files)." >&2
  exit 1
fi
if [[ ! -f "$DEMO/train/final_soft_prompt.npy" ]]; then
  echo "No MCD prompt in $DEMO/train: run 'bash launch/demo.sh $DEMO' first." >&2
  exit 1
fi

"$PYTHON" launch/train.py --flagfile=configs/demo_cpu.cfg --mode=dro --train_languages=en \
  --epochs_per_language=2 --estimation_artifacts="$DEMO/train/estimation" --workdir="$OUT/dro"

"$PYTHON" launch/evaluate.py "${COMMON[@]}" --dataset=builtin --limit_per_language=20 \
  --output_dir="$OUT/builtin"

"$PYTHON" launch/evaluate.py "${COMMON[@]}" --dataset=polyrefuse \
  --languages="$POLYREFUSE_LANGUAGES" --limit_per_language=10 --output_dir="$OUT/polyrefuse"

"$PYTHON" scripts/compare_reports.py "$OUT/builtin/report.json" "$OUT/polyrefuse/report.json"
