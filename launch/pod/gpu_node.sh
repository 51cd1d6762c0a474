#!/usr/bin/env bash
# Start the training process of one GPU node: one process drives all of the node's GPUs.
#
# Usage, one node:
#   launch/pod/gpu_node.sh WORKDIR [TRAIN_FLAGS...]
# Usage, several nodes (run it on every node, with the same COORDINATOR and NUM_NODES):
#   COORDINATOR=node0.example:12355 NUM_NODES=2 NODE_RANK=0 launch/pod/gpu_node.sh WORKDIR ...
#
# Environment:
#   CONFIG         flagfile, relative to the repository (default configs/meta-llama-3-8b-instruct.cfg)
#   COORDINATOR    host:port of node 0, reachable from every node; unset for one node
#   NUM_NODES      number of nodes (processes) in the job
#   NODE_RANK      this node's index, from 0; node 0 runs the coordinator
#   CUDA_VISIBLE_DEVICES  restricts the GPUs this process uses, as usual
#
# Needs jax[cuda12] in .venv. With several nodes, WORKDIR must be on a file system that every
# node shares. TRAIN_FLAGS go after the flagfile and override it.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 WORKDIR [TRAIN_FLAGS...]" >&2
  exit 2
fi
workdir=$1
shift

cd "$(dirname "$0")/../.."
config=${CONFIG:-configs/meta-llama-3-8b-instruct.cfg}
distributed=()
if [[ -n ${COORDINATOR:-} ]]; then
  if [[ -z ${NUM_NODES:-} || -z ${NODE_RANK:-} ]]; then
    echo "COORDINATOR=$COORDINATOR is set but NUM_NODES or NODE_RANK is missing; set both" >&2
    exit 2
  fi
  distributed=(
    --coordinator_address="$COORDINATOR"
    --num_processes="$NUM_NODES"
    --process_id="$NODE_RANK"
  )
fi

exec .venv/bin/python launch/train.py \
  --flagfile="$config" \
  --workdir="$workdir" \
  "${distributed[@]}" \
  "$@"
