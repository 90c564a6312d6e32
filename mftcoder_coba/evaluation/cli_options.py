"""Command-line options ``eval`` and ``eval-code`` share, kept free of torch so ``eval-code --self-check`` and
option errors answer without importing a model library."""
from __future__ import annotations

import argparse
from pathlib import Path

DTYPE_NAMES = ("fp32", "bf16", "fp16")
"""``--dtype`` values besides ``auto``."""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--adapter``, ``--dtype``, ``--device`` and ``--trust-remote-code``."""
    parser.add_argument("--adapter", type=Path, default=None, help="peft LoRA adapter directory applied to TARGET")
    parser.add_argument("--dtype", choices=("auto", *DTYPE_NAMES), default="auto",
                        help="model dtype (auto: the run's or the saved model's)")
    parser.add_argument("--device", default="auto", help="torch device (auto: cuda if available, else cpu)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a model's own code (auto_map) to run; never taken from a run's config.yaml")
