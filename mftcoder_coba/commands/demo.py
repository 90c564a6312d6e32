"""``mftcoder-coba demo``: arguments for :func:`mftcoder_coba.demo.run_demo`, which says what the demo does."""
from __future__ import annotations

import argparse
from pathlib import Path

from mftcoder_coba.demo import MODES, run_demo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="demo folder (default: ./demo_out)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps (default: coba/cgc-lora 300; cold-fusion 15 per contributor job)")
    parser.add_argument("--mode", choices=MODES, default="coba",
                        help="coba: full training with CoBa; cgc-lora: CGC-LoRA adapters with CoBa; "
                             "cold-fusion: ColD Fusion, one contributor per task")


def main(args: argparse.Namespace) -> int:
    result = run_demo(args.out, args.steps, args.mode)
    print()
    print(result.summary())
    return 0
