"""``mftcoder-coba train --config run.yaml [--resume auto|CHECKPOINT] [field=value ...]``.

Fields of the config can be overridden on the command line with dotted names (``train.max_steps=50``,
``balancer.name=uniform``); see :mod:`mftcoder_coba.config` for every field. Under torchrun or the
deepspeed launcher every rank runs this same command (``launch/single_node.sh`` and friends).
"""
from __future__ import annotations

import argparse
import os
import sys

from mftcoder_coba.config import load_run_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run configuration (YAML or JSON)")
    parser.add_argument("--resume", default=None, metavar="auto|CHECKPOINT",
                        help="continue from the newest complete checkpoint of run_dir (auto) or from a checkpoint dir")
    parser.add_argument("overrides", nargs="*", metavar="FIELD=VALUE", help="config overrides, e.g. train.max_steps=50")


def main(args: argparse.Namespace) -> int:
    cfg = load_run_config(args.config, args.overrides)
    from mftcoder_coba.training import train  # after the config is known good: the heavy imports start here
    from mftcoder_coba.training.preemption import RunStopped

    try:
        run_dir = train(cfg, resume=args.resume)
    except RunStopped as stop:  # a signal stopped it after publishing a checkpoint: not a crash (preemption.py)
        if os.environ.get("RANK", "0") == "0":
            print(f"mftcoder-coba: {stop}", file=sys.stderr)
        return stop.exit_status
    if os.environ.get("RANK", "0") == "0":
        print(run_dir)
    return 0
