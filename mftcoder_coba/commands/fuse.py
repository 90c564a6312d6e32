"""``mftcoder-coba fuse A B C --out D [--weights ...] [--base BASE]``: average contributor checkpoints.

This is the repository's step of ColD Fusion when contributors train on their own machines: each hands in
a checkpoint (a run directory, one of its ``checkpoints/step-N`` folders, or a saved model/adapter folder),
and ``fuse`` writes their parameter average as the next shared model (see
:func:`mftcoder_coba.fusion.average.average_models` for how LoRA updates are averaged exactly).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from mftcoder_coba.errors import UserError
from mftcoder_coba.fusion.average import average_models


def resolve_model_dir(path: Path) -> Path:
    """A run directory means its newest complete checkpoint's model; a checkpoint means its ``model/``."""
    from mftcoder_coba.models.persist import model_dir_of

    if not path.exists():
        raise UserError(f"{path}: not found")
    if (path / "checkpoints").is_dir():
        return model_dir_of(path)
    if (path / "model").is_dir():
        return path / "model"
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", type=Path,
                        help="model directories, LoRA adapter directories, run directories or checkpoints")
    parser.add_argument("--out", type=Path, required=True, help="output directory (must not exist)")
    parser.add_argument("--weights", type=float, nargs="+", default=None,
                        help="one non-negative weight per model (rescaled to sum to 1); default: equal")
    parser.add_argument("--base", type=Path, default=None,
                        help="for LoRA adapters: merge the averaged update into this base model directory "
                             "(output: a full model); without it the output is one exact LoRA adapter")


def main(args: argparse.Namespace) -> int:
    dirs = [resolve_model_dir(p) for p in args.models]
    base = resolve_model_dir(args.base) if args.base is not None else None
    out = average_models(dirs, args.out, weights=args.weights, base_dir=base)
    print(out)
    return 0
