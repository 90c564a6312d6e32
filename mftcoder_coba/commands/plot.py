"""``mftcoder-coba plot RUN_DIR``: arguments for :func:`mftcoder_coba.plots.plot_run`, which says what is drawn."""
from __future__ import annotations

import argparse
from pathlib import Path

from mftcoder_coba.plots import plot_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="run directory holding metrics.jsonl (or fusion_metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: RUN_DIR/plots)")


def main(args: argparse.Namespace) -> int:
    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0
