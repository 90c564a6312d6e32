#!/usr/bin/env bash
# One host, NPROC processes (one per GPU, or CPU processes with gloo when there is no GPU):
#
#   launch/single_node.sh NPROC --config run.yaml [--resume auto] [field=value ...]
#
# Every argument after NPROC goes to `mftcoder-coba train`. Pick an engine config with
# train.deepspeed_config=launch/ds_zero2.json (RunConfig fields override its batch, clipping, bf16, optimizer).
# PYTHON selects the interpreter (default: python).
set -euo pipefail
if [ $# -lt 1 ] || ! [[ "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: $0 NPROC --config run.yaml [--resume auto|CHECKPOINT] [field=value ...]" >&2
  exit 2
fi
NPROC=$1
shift
exec "${PYTHON:-python}" -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node "$NPROC" \
  -m mftcoder_coba train "$@"
