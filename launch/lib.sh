# Shared by single_node.sh and multi_node.sh (sourced, not run): the interpreter, the check before torchrun,
# and torchrun under a shell that forwards stop signals and reports how the run ended.
#
# Exit status of a launcher: 0 the run finished; 2 a config or data error (one line, before any worker starts);
# 75 stopped by SIGTERM / SIGUSR1 / SIGINT after publishing a verified checkpoint (resume with --resume auto);
# anything else: torchrun's status after MAX_RESTARTS restarts of a failing worker group.

# The Python of the environment this launcher was started from: $PYTHON, else the active venv's or conda
# env's, else the first `python` / `python3` on PATH that has mftcoder_coba and torch.
pick_python() {
  if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
    return
  fi
  local prefix candidate
  for prefix in "${VIRTUAL_ENV:-}" "${CONDA_PREFIX:-}"; do
    if [ -n "$prefix" ] && [ -x "$prefix/bin/python" ]; then
      PY=$prefix/bin/python
      return
    fi
  done
  for candidate in python python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c \
        "import importlib.util as u, sys; sys.exit(not (u.find_spec('mftcoder_coba') and u.find_spec('torch')))" \
        2>/dev/null; then
      PY=$(command -v "$candidate")
      return
    fi
  done
  echo "$0: no python with mftcoder_coba and torch installed found; activate its environment or set PYTHON" >&2
  exit 2
}

# Every check a worker makes before training (config, data, batch against WORLD_SIZE, resume), once, in this
# process: a mistake is one line and exit 2, not one traceback per rank, restarted MAX_RESTARTS times.
check_run() {
  local world_size=$1
  shift
  "$PY" -m mftcoder_coba.commands.train_check "$world_size" "$@" || exit $?
}

# torchrun (arguments: its own, then the module's) in the background of this shell. SIGTERM, SIGUSR1, SIGINT
# and SIGHUP sent to this shell go to the workers (torchrun starts each in a session of its own, so a terminal's
# Ctrl-C reaches only this shell); the workers stop at the next step boundary, publish a checkpoint, record the
# stop in $MFTCODER_STOP_FILE and exit 0 (torchrun would restart a non-zero worker group), and this shell
# exits 75. torchrun gets SIGINT ignored (a background job of a script) and is not told to handle it.
run_torchrun() {
  MFTCODER_STOP_FILE=$(mktemp "${TMPDIR:-/tmp}/mftcoder-stop.XXXXXX")
  export MFTCODER_STOP_FILE
  : >"$MFTCODER_STOP_FILE"
  "$PY" -m torch.distributed.run --max-restarts "${MAX_RESTARTS:-3}" \
    --signals-to-handle SIGTERM,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "${SHUTDOWN_TIMEOUT:-300}" "$@" &
  AGENT=$!
  trap 'forward TERM' TERM HUP
  trap 'forward USR1' USR1
  trap 'forward INT' INT
  local status
  while :; do
    TRAPPED=0
    status=0
    wait "$AGENT" || status=$?
    [ "$TRAPPED" = 1 ] || break                  # the agent ended: its status
    kill -0 "$AGENT" 2>/dev/null && continue     # a trapped signal interrupted wait; the agent still runs
    status=0
    wait "$AGENT" || status=$?                   # the agent ended while the trap ran
    break
  done
  trap - TERM HUP USR1 INT
  if [ -s "$MFTCODER_STOP_FILE" ]; then
    echo "$0: stopped, checkpoint published: $(cat "$MFTCODER_STOP_FILE")" >&2
    rm -f "$MFTCODER_STOP_FILE"
    exit 75
  fi
  rm -f "$MFTCODER_STOP_FILE"
  exit "$status"
}

# The signal $1 to torchrun's workers (its child processes).
forward() {
  local pid
  TRAPPED=1
  for pid in $(pgrep -P "$AGENT" || true); do
    kill -s "$1" "$pid" 2>/dev/null || true
  done
}
