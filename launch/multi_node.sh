#!/usr/bin/env bash
# Several hosts. run_dir must be on a filesystem every node shares (checkpoints hold per-rank shards).
#
# torchrun form: run the same command on every node, with
#   NNODES (number of nodes), NODE_RANK (0 .. NNODES-1, this node), MASTER_ADDR / MASTER_PORT (node 0),
#   NPROC_PER_NODE (processes per node, default: number of GPUs, or 1 without GPUs)
#     NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 launch/multi_node.sh --config run.yaml
#
# deepspeed form: run once, on the first node; the launcher starts every node over ssh from a hostfile
# ("node0 slots=8" per line):
#     HOSTFILE=hostfile MASTER_ADDR=node0 launch/multi_node.sh --config run.yaml
#
# Arguments go to `mftcoder-coba train`. PYTHON selects the interpreter (default: python).
set -euo pipefail
PY=${PYTHON:-python}
if [ -n "${HOSTFILE:-}" ]; then
  exec "$PY" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --no_local_rank \
    --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" --master_port "${MASTER_PORT:-29500}" \
    --module mftcoder_coba train "$@"
fi
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$("$PY" -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
exec "$PY" -m torch.distributed.run \
  --nnodes "${NNODES:?set NNODES}" --node_rank "${NODE_RANK:?set NODE_RANK}" --nproc_per_node "$NPROC_PER_NODE" \
  --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" --master_port "${MASTER_PORT:?set MASTER_PORT}" \
  -m mftcoder_coba train "$@"
