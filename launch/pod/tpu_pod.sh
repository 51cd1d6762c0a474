#!/usr/bin/env bash
# Start one training process on every worker of a Cloud TPU VM pod slice.
#
# Usage:
#   launch/pod/tpu_pod.sh TPU_NAME ZONE WORKDIR [TRAIN_FLAGS...]
#
# Environment:
#   CONFIG       flagfile, relative to the repository (default configs/meta-llama-3-8b-instruct.cfg)
#   REPO_DIR     the checkout on the workers (default: this checkout's path)
#   GCP_PROJECT  Google Cloud project (default: gcloud's configured project)
#
# Every worker needs the same checkout at REPO_DIR with its .venv (jax[tpu] installed).
# WORKDIR must be a path that all workers share (a gs:// bucket or a shared file system),
# because every process writes checkpoints there and reads them back on resume.
# No --coordinator_address is passed: launch/train.py starts jax.distributed by itself when
# TPU_WORKER_HOSTNAMES lists several workers.
# NOTE: not run on a real pod slice. If a worker's ssh environment lacks TPU_WORKER_HOSTNAMES,
# pass --coordinator_address, --num_processes and --process_id per worker instead. TRAIN_FLAGS go after the flagfile and override it, for
# example --mesh_fsdp=2 --mesh_tensor=8.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  echo "usage: $0 TPU_NAME ZONE WORKDIR [TRAIN_FLAGS...]" >&2
  exit 2
fi
tpu_name=$1
zone=$2
workdir=$3
shift 3

repo_dir=${REPO_DIR:-$(cd "$(dirname "$0")/../.." && pwd)}
config=${CONFIG:-configs/meta-llama-3-8b-instruct.cfg}
project_flag=()
if [[ -n ${GCP_PROJECT:-} ]]; then
  project_flag=(--project="$GCP_PROJECT")
fi

# printf %q quotes each word so that the remote shell receives it unchanged.
remote_command="cd $(printf %q "$repo_dir") && .venv/bin/python launch/train.py"
remote_command+=" --flagfile=$(printf %q "$config") --workdir=$(printf %q "$workdir")"
if [[ $# -gt 0 ]]; then
  remote_command+=$(printf ' %q' "$@")
fi

gcloud compute tpus tpu-vm ssh "$tpu_name" \
  --zone="$zone" \
  "${project_flag[@]}" \
  --worker=all \
  --command="$remote_command"
