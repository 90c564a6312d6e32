#!/usr/bin/env bash
# One host, NPROC processes (one per GPU, or CPU processes with gloo when there is no GPU):
#
#   launch/single_node.sh NPROC --config run.yaml [--resume auto] [field=value ...]
#
# Every argument after NPROC goes to `mftcoder-coba train`. Pick an engine config with
# train.deepspeed_config=zero2 (zero0..zero3 ship in the package; RunConfig fields override its batch, clipping, bf16, optimizer).
# PYTHON selects the interpreter (default: the active environment's, see launch/lib.sh). Runs from any folder.
# MAX_RESTARTS (default 3): torchrun restarts a failed worker group this often; a restart resumes from the
# newest verified checkpoint. SIGTERM / SIGUSR1 / SIGINT: the run stops after the current step with a
# checkpoint and this script exits 75 (exit statuses: launch/lib.sh).
set -euo pipefail
# shellcheck source=launch/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
if [ $# -lt 1 ] || ! [[ "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: $0 NPROC --config run.yaml [--resume auto|CHECKPOINT] [field=value ...]" >&2
  exit 2
fi
NPROC=$1
shift
pick_python
check_run "$NPROC" "$@"
run_torchrun --standalone --nnodes 1 --nproc-per-node "$NPROC" -m mftcoder_coba train "$@"
