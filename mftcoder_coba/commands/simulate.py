"""``mftcoder-coba simulate``: arguments for :mod:`mftcoder_coba.balancers.simulate`, which says what is
simulated and why."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from mftcoder_coba.balancers.base import BALANCERS
from mftcoder_coba.balancers.simulate import TASKS, SimulationConfig, format_table, run_all, summarise, write_report
from mftcoder_coba.errors import UserError
from mftcoder_coba.training.sampling import HELD_OUT_MODES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("simulate.png"), help="PNG to write (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None, help="table as JSON (default: --out with .json)")
    parser.add_argument("--steps", type=int, default=SimulationConfig.steps, help="optimizer steps per balancer")
    parser.add_argument("--seed", type=int, default=SimulationConfig.seed, help="data, initialisation and batches")
    parser.add_argument("--balancers", default=",".join(BALANCERS),
                        help="comma-separated balancer names (default: all)")
    parser.add_argument("--held-out", default=",".join(HELD_OUT_MODES),
                        help="comma-separated held-out modes (rotate, fixed, all) to run each balancer that reads "
                             "held-out loss (CoBa) with, labelled NAME/MODE (default: %(default)s)")
    parser.add_argument("--obs-noise", type=float, default=SimulationConfig.obs_noise,
                        help="observation noise: standard deviation of a held-out sample's log-loss offset from "
                             "its rows' difficulty (default: %(default)s; 0 leaves only sampling noise)")


def main(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.balancers.split(",") if n.strip()]
    unknown = [n for n in names if n not in BALANCERS]
    if unknown or not names:
        raise UserError(f"--balancers: unknown balancer(s) {', '.join(unknown) or '(none given)'} "
                        f"(known: {', '.join(BALANCERS)})")
    if args.steps < 50:
        raise UserError(f"--steps: must be >= 50, got {args.steps}")
    if args.out.suffix.lower() != ".png":
        raise UserError(f"--out: expected a .png path, got {args.out}")
    modes = [m.strip() for m in args.held_out.split(",") if m.strip()]
    if not modes or any(m not in HELD_OUT_MODES for m in modes):
        raise UserError(f"--held-out: expected a comma-separated subset of {', '.join(HELD_OUT_MODES)}, "
                        f"got {args.held_out!r}")
    if not (math.isfinite(args.obs_noise) and args.obs_noise >= 0):
        raise UserError(f"--obs-noise: must be a finite number >= 0, got {args.obs_noise}")
    cfg = SimulationConfig(steps=args.steps, seed=args.seed, obs_noise=args.obs_noise)
    knobs = cfg.options["coba"]
    print(f"CoBa knobs chosen for this {cfg.steps}-step problem: history_length={knobs['history_length']}, "
          f"warmup_steps={knobs['warmup_steps']}, tau={knobs['tau']}, update_interval={cfg.update_interval}, "
          f"valid_rows_per_task={cfg.valid_rows} (the LLM defaults N=200, W=100 suit thousands of updates); "
          f"observation noise {cfg.obs_noise:g}.")
    traces = run_all(names, modes, cfg)
    rows = {label: summarise(trace) for label, trace in traces.items()}
    print(f"Held-out (test) MSE per task after {cfg.steps} steps; noise floors "
          + ", ".join(f"{t.name} {t.noise ** 2:.2f}" for t in TASKS) + "; best@ = step of the task's lowest loss; "
          "w L1/update = mean L1 change of the weights per update interval; NAME/MODE = balancer.held_out")
    print(format_table(rows))
    json_path = args.json or args.out.with_suffix(".json")
    write_report(traces, rows, cfg, args.out, json_path)
    print(f"wrote {args.out} and {json_path}")
    return 0
