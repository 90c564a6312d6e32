#!/usr/bin/env bash
# Every check and benchmark that needs a CUDA GPU, in one go (about 30 minutes on one H100), so a machine with
# a GPU for a short while yields the whole picture: the GPU-marked tests (kernels on CUDA, offsets past 2^31,
# torch.compile / CUDA graphs, packed FlexAttention), the kernel table, and bench-train with each memory/speed
# setting. Results and logs go to OUT_DIR (default gpu_results/); commit the tables that matter under
# benchmarks/ with the device and date they print.
#
#   benchmarks/gpu_suite.sh [OUT_DIR] [STEPS]        # STEPS: timed bench-train steps per mode (default 6)
#
# Optional packages it uses when installed: liger-kernel and cut-cross-entropy (kernel baselines),
# flash-attn (bench-train's `auto` attention), vllm (eval-code's vLLM engine against transformers). Each part
# runs even if an earlier one failed; the exit status is non-zero if any failed.
set -uo pipefail
OUT_DIR=${1:-gpu_results}
STEPS=${2:-6}
PY=${PYTHON:-python}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT_DIR"
status=0
run() {  # run NAME CMD...: log to OUT_DIR/NAME.log, remember a failure, keep going
  local name=$1; shift
  echo "== $name: $*"
  if ! "$@" >"$OUT_DIR/$name.log" 2>&1; then
    echo "!! $name failed (see $OUT_DIR/$name.log)"; status=1
  fi
  tail -n 25 "$OUT_DIR/$name.log"
}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')" || exit 2
run gpu_tests "$PY" -m pytest -q -m gpu tests
run kernels "$PY" "$HERE/kernels/bench.py" --out "$OUT_DIR"
run train_eager "$PY" -m mftcoder_coba bench-train --steps "$STEPS" --out "$OUT_DIR"
run train_zero1 "$PY" -m mftcoder_coba bench-train --steps "$STEPS" --zero-stage 1 --out "$OUT_DIR"  # fp32 gradient sums
run train_compile "$PY" -m mftcoder_coba bench-train --steps "$STEPS" --compile --out "$OUT_DIR"
run train_selective "$PY" -m mftcoder_coba bench-train --steps "$STEPS" --compile \
  --gradient-checkpointing selective --out "$OUT_DIR"
run train_lean "$PY" -m mftcoder_coba bench-train --steps "$STEPS" --compile --gradient-checkpointing selective \
  --zero-stage 1 --master-weights bf16 --out "$OUT_DIR"
if "$PY" -c "import vllm" >/dev/null 2>&1; then  # eval-code's vLLM engine: same completions as transformers
  run eval_vllm "$PY" -m pytest -q tests/test_eval_vllm.py
else
  echo "== eval_vllm: skipped (vllm not installed: pip install -e '.[vllm]')"
fi
exit $status
