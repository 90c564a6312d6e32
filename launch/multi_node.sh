#!/usr/bin/env bash
# Several hosts. run_dir must be on a filesystem every node shares (checkpoints hold per-rank shards).
#
# torchrun form: run the same command on every node, with
#   NNODES (number of nodes), NODE_RANK (0 .. NNODES-1, this node), MASTER_ADDR / MASTER_PORT (node 0),
#   NPROC_PER_NODE (processes per node, default: number of GPUs, or 1 without GPUs)
#     NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 launch/multi_node.sh --config run.yaml
# Elastic: with MIN_NODES (< NNODES) the nodes meet at torchrun's c10d rendezvous on MASTER_ADDR:MASTER_PORT
# (hosted by the node whose MASTER_ADDR is its own; NODE_RANK is not needed, RDZV_ID names the job). A job that
# loses nodes restarts on the MIN_NODES..NNODES that remain and resumes from the newest checkpoint on the new
# world size (the global batch must split over it). MAX_RESTARTS (default 3) restarts of a failed worker group,
# each from the newest verified checkpoint. SIGTERM / SIGUSR1 / SIGINT: stop after the current step with a
# checkpoint, exit 75 (exit statuses: launch/lib.sh).
#
# deepspeed form: run once, on the first node; the launcher starts every node over ssh from a hostfile
# ("node0 slots=8" per line):
#     HOSTFILE=hostfile MASTER_ADDR=node0 launch/multi_node.sh --config run.yaml
#
# Arguments go to `mftcoder-coba train`. PYTHON selects the interpreter (default: the active environment's).
set -euo pipefail
# shellcheck source=launch/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
pick_python
if [ -n "${HOSTFILE:-}" ]; then
  exec "$PY" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --no_local_rank \
    --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" --master_port "${MASTER_PORT:-29500}" \
    --module mftcoder_coba train "$@"
fi
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$("$PY" -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
check_run "$((${NNODES:?set NNODES} * NPROC_PER_NODE))" "$@"
if [ -n "${MIN_NODES:-}" ]; then
  run_torchrun --nnodes "$MIN_NODES:$NNODES" --nproc-per-node "$NPROC_PER_NODE" --rdzv-backend c10d \
    --rdzv-endpoint "${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:?set MASTER_PORT}" \
    --rdzv-id "${RDZV_ID:-mftcoder-coba}" -m mftcoder_coba train "$@"
fi
run_torchrun --nnodes "$NNODES" --node-rank "${NODE_RANK:?set NODE_RANK}" --nproc-per-node "$NPROC_PER_NODE" \
  --master-addr "${MASTER_ADDR:?set MASTER_ADDR}" --master-port "${MASTER_PORT:?set MASTER_PORT}" \
  -m mftcoder_coba train "$@"
