"""Cost of the isolated sandbox against the guarded one (issue 21): start-up of one trivial sample, and HumanEval's
164 canonical solutions x N executed as ``eval-code`` does (``workers`` at a time). The two modes alternate round by
round so a busy machine slows both alike; medians are reported. ``--baseline DIR`` (a ``git archive`` of the
commit before the isolated sandbox) times that tree's sandbox the same way in each round, in a subprocess.
Writes ``results.json`` beside this file.

    python benchmarks/sandbox/measure.py [--rounds 3] [--n 2] [--workers 2] [--startup 15] [--baseline DIR]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from mftcoder_coba.evaluation.code_eval import canonical_completions, execute
from mftcoder_coba.evaluation.problems import load_benchmark
from mftcoder_coba.evaluation.sandbox import Limits, isolation_problem, run_program

MODES = ("guarded", "isolated")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=2, help="copies of each canonical solution (samples per problem)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--startup", type=int, default=15, help="trivial samples per mode and round")
    parser.add_argument("--baseline", type=Path, default=None, help="source tree of the sandbox before isolation")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    args = parser.parse_args()
    problem = isolation_problem()
    if problem is not None:
        sys.exit(f"isolated sandbox unavailable here: {problem}")
    _, problems = load_benchmark("humaneval")
    completions = [samples * args.n for samples in canonical_completions(problems)]
    modes = (*MODES, "before") if args.baseline else MODES
    startup: dict[str, list[float]] = {m: [] for m in modes}
    humaneval: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        if args.baseline:
            done = subprocess.run([sys.executable, "-c", BASELINE, str(args.n), str(args.workers), str(args.startup)],
                                  env={**os.environ, "PYTHONPATH": str(args.baseline.resolve())}, check=True,
                                  cwd=args.baseline,
                                  capture_output=True, text=True)
            before = json.loads(done.stdout)
            startup["before"] += before["startup"]
            humaneval["before"].append(before["humaneval"])
        for mode in MODES:
            limits = replace(Limits(), sandbox=mode)
            for _ in range(args.startup):
                start = time.monotonic()
                assert run_program("pass\n", limits).passed
                startup[mode].append(time.monotonic() - start)
            start = time.monotonic()
            results = execute(problems, completions, limits, args.workers)
            humaneval[mode].append(time.monotonic() - start)
            assert all(r.passed for r in results), [r for r in results if not r.passed][:3]
    median = {m: {"startup_seconds": round(statistics.median(startup[m]), 4),
                  "humaneval_seconds": round(statistics.median(humaneval[m]), 2)} for m in modes}
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs)",
        "kernel": platform.release(), "python": platform.python_version(),
        "samples": len(problems) * args.n, "n": args.n, "workers": args.workers, "rounds": args.rounds,
        "median": median,
        "ratio_isolated_to_guarded": {
            "startup": round(median["isolated"]["startup_seconds"] / median["guarded"]["startup_seconds"], 3),
            "humaneval": round(median["isolated"]["humaneval_seconds"] / median["guarded"]["humaneval_seconds"], 3)},
        **({"ratio_isolated_to_before": {
            "startup": round(median["isolated"]["startup_seconds"] / median["before"]["startup_seconds"], 3),
            "humaneval": round(median["isolated"]["humaneval_seconds"] / median["before"]["humaneval_seconds"], 3)}}
           if args.baseline else {}),
        "raw": {"startup_seconds": startup, "humaneval_seconds": humaneval},
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k.startswith(("median", "ratio"))}))


BASELINE = """
import json, sys, time
import mftcoder_coba.evaluation.sandbox as sandbox
from mftcoder_coba.evaluation.code_eval import canonical_completions, execute
from mftcoder_coba.evaluation.problems import load_benchmark
assert "isolated" not in sandbox.__doc__, sandbox.__file__
n, workers, count = map(int, sys.argv[1:])
_, problems = load_benchmark("humaneval")
startup = []
for _ in range(count):
    start = time.monotonic()
    assert sandbox.run_program("pass\\n").passed
    startup.append(time.monotonic() - start)
start = time.monotonic()
assert all(r.passed for r in execute(problems, [s * n for s in canonical_completions(problems)], sandbox.Limits(),
                                     workers))
print(json.dumps({"startup": startup, "humaneval": time.monotonic() - start}))
"""


if __name__ == "__main__":
    main()
