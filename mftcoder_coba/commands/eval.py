"""``mftcoder-coba eval TARGET --data SPLIT``: per-task token loss and perplexity over every row of a split.

TARGET: a run directory (newest checkpoint, or ``--checkpoint``), an export (CGC-LoRA "1+N": each task with
its adapter), a transformers model directory (``--adapter`` LoRA on top, ``--task-adapter TASK=DIR`` per
task) or a peft adapter directory. SPLIT: a prepared split (``OUT/valid``, ``OUT/train`` or a test split
prepared the same way). Prints a table; ``--out FILE.json`` writes the numbers (atomically). Under a launcher
(``torchrun --nproc_per_node N -m mftcoder_coba eval ...``) every rank holds the whole model and scores every
N-th row; the sums are all-reduced and rank 0 prints and writes. See :mod:`mftcoder_coba.evaluation.loss`
for the library function.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from mftcoder_coba.atomic import atomic_write_text
from mftcoder_coba.data import PackedDataset
from mftcoder_coba.errors import UserError
from mftcoder_coba.evaluation.cli_options import add_model_arguments
from mftcoder_coba.evaluation.loss import evaluate_target
from mftcoder_coba.evaluation.targets import load_model, pick_device, resolve_target
from mftcoder_coba.training import distributed

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", type=Path, help="run directory, export, transformers model or adapter directory")
    parser.add_argument("--data", type=Path, required=True, help="prepared split directory (OUT/valid, a test split)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="run targets: checkpoint directory (RUN/checkpoints/step-N) instead of the newest")
    add_model_arguments(parser)
    parser.add_argument("--task-adapter", action="append", default=[], metavar="TASK=DIR",
                        help="peft adapter used for TASK only (repeatable); other tasks use the model alone")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per forward")
    parser.add_argument("--impl", choices=("auto", "triton", "torch"), default="auto",
                        help="per-task loss kernel (auto: Triton on CUDA, PyTorch otherwise)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")


def parse_task_adapters(items: list[str]) -> dict[str, Path]:
    """``TASK=DIR`` strings as a mapping; a malformed or repeated one is a one-line error."""
    found: dict[str, Path] = {}
    for item in items:
        task, sep, path = item.partition("=")
        if not sep or not task or not path:
            raise UserError(f"--task-adapter {item!r}: expected TASK=DIR")
        if task in found:
            raise UserError(f"--task-adapter: task {task!r} given twice")
        found[task] = Path(path)
    return found


def main(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    dataset = PackedDataset(args.data)
    task_adapters = parse_task_adapters(args.task_adapter)
    unknown = sorted(set(task_adapters) - set(dataset.tasks))
    if unknown:
        raise UserError(f"--task-adapter: {', '.join(unknown)} not among the tasks of {args.data}: {dataset.tasks}")
    target = resolve_target(args.target, checkpoint=args.checkpoint, adapter=args.adapter, task_adapters=task_adapters)
    world = distributed.init() if distributed.world_from_env().size > 1 else None
    device = world.device if world is not None else pick_device(args.device)
    model = load_model(target, dtype=args.dtype, device=device, trust_remote_code=args.trust_remote_code)
    start = time.monotonic()
    losses = evaluate_target(model, target, dataset, micro_batch_size=args.batch_size, impl=args.impl)
    result = {"target": target.describe(), "data": str(args.data), "rows": len(dataset),
              "world_size": 1 if world is None else world.size, **losses.to_json(),
              "seconds": round(time.monotonic() - start, 3)}
    if world is None or world.is_main:
        print(format_table(result))
        if args.out is not None:
            atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
            log.info("wrote %s", args.out)
    if world is not None:
        distributed.barrier(world)  # no rank tears the group down while another still uses it
        torch.distributed.destroy_process_group()
    return 0


def format_table(result: dict) -> str:
    """The per-task table ``eval`` prints."""
    width = max(len("task"), *(len(t) for t in result["tasks"]))
    lines = [f"{'task':<{width}}  {'tokens':>9}  {'loss':>8}  {'ppl':>9}"]
    for name, row in result["tasks"].items():
        loss = "-" if row["loss"] is None else f"{row['loss']:.4f}"
        ppl = "-" if row["perplexity"] is None else f"{row['perplexity']:.3f}"
        lines.append(f"{name:<{width}}  {row['tokens']:>9}  {loss:>8}  {ppl:>9}")
    mean = "-" if result["mean_loss"] is None else f"{result['mean_loss']:.4f}"
    token = "-" if result["token_loss"] is None else f"{result['token_loss']:.4f}"
    lines.append(f"mean over tasks {mean}, over tokens {token} ({result['rows']} rows, {result['seconds']} s)")
    return "\n".join(lines)
