"""``mftcoder-coba export RUN_DIR --out DIR``: arguments for :func:`mftcoder_coba.export.export_run`, which
says what is written."""
from __future__ import annotations

import argparse
from pathlib import Path

from mftcoder_coba.export import export_run
from mftcoder_coba.training.best import read_best


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="run directory (config.yaml, tokenizer/, checkpoints/)")
    parser.add_argument("--out", type=Path, required=True, help="output model directory")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", type=Path, default=None,
                       help="checkpoint to export (RUN_DIR/checkpoints/step-N); default: the newest complete one")
    which.add_argument("--best", action="store_true",
                       help="export the best checkpoint of train.keep_best (RUN_DIR/checkpoints/best.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--adapter-only", action="store_true",
                        help="LoRA runs: write peft's unmerged adapter (adapter_config.json, adapter_model.safetensors)"
                             " and the tokenizer instead of the merged model")
    parser.add_argument("--merged-tasks", action="store_true",
                        help="CGC-LoRA runs: also write one merged model per task under OUT/merged/<task>")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let transformers run the model's own code (auto_map); only for models you trust. "
                             "The run's config.yaml cannot turn this on")


def main(args: argparse.Namespace) -> int:
    checkpoint = read_best(args.run_dir) if args.best else args.checkpoint
    out = export_run(args.run_dir, args.out, checkpoint, overwrite=args.overwrite,
                     merged_tasks=args.merged_tasks, trust_remote_code=args.trust_remote_code,
                     adapter_only=args.adapter_only)
    print(out)
    return 0
