#!/usr/bin/env bash
# Reproduces benchmarks/deps/results.md: a fresh virtual environment outside the clone with the oldest declared
# versions (constraints-oldest.txt), or with the CI lock (MODE=lock: lock-ci.txt), or with the newest resolve
# (MODE=newest), then the fast test tier from the repository root. Removes the environment afterwards.
# Usage: benchmarks/deps/check_oldest.sh [extra pytest args]   (PYTHON=python3.11 MODE=oldest|lock|newest)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
mode=${MODE:-oldest}
case $mode in
    oldest) constraints=(-c "$root/benchmarks/deps/constraints-oldest.txt") ;;
    lock) constraints=(-c "$root/benchmarks/deps/lock-ci.txt") ;;
    newest) constraints=() ;;
    *) echo "MODE must be oldest, lock or newest, not '$mode'" >&2; exit 2 ;;
esac
venv=$(mktemp -d "${TMPDIR:-/tmp}/mftcoder-deps-XXXXXX")
trap 'rm -rf "$venv"' EXIT
"${PYTHON:-python3.11}" -m venv "$venv"
# torch first: its wheel decides CPU or CUDA, and the project's resolve must not replace it.
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q "${constraints[@]}" -e "$root[test]"
echo "== installed ($mode):"; "$venv/bin/pip" freeze --exclude-editable
cd "$root"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$venv/bin/python" -m pytest -p no:cacheprovider -m "not slow" -q "$@" tests
