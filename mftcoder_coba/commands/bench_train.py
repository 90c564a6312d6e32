"""``mftcoder-coba bench-train``: arguments for :func:`mftcoder_coba.bench_train.run_benchmark` (the module
says what is measured)."""
from __future__ import annotations

import argparse
from pathlib import Path

from mftcoder_coba.bench_train import Knobs, run_benchmark, write_report
from mftcoder_coba.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("bench_results"),
                        help="folder for <device>.json and <device>.md (default: ./bench_results; the repository "
                             "keeps its committed results in benchmarks/train)")
    parser.add_argument("--tiny", action="store_true", help="small model, CPU friendly (smoke test)")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per mode (default 8)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed first steps per mode (default 2)")
    parser.add_argument("--modes", default="coba,uniform", help="comma-separated: coba, uniform")
    parser.add_argument("--attn", default="auto",
                        choices=["auto", "flash_attention_2", "flex_attention", "sdpa", "eager"],
                        help="model.attn_implementation (default auto: flash-attn if installed, else flex_attention "
                             "on a GPU, sdpa on CPU)")
    parser.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage")
    parser.add_argument("--gradient-checkpointing", default="off", choices=["off", "full", "selective"],
                        help="model.gradient_checkpointing (default off)")
    parser.add_argument("--compile", action="store_true", help="model.compile: torch.compile each decoder layer")
    parser.add_argument("--master-weights", default="fp32", choices=["fp32", "bf16"],
                        help="optim.master_weights (bf16 needs --zero-stage 1-3)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where shards and runs go (default: a temporary folder, removed afterwards)")


def main(args: argparse.Namespace) -> int:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - {"coba", "uniform"})
    if unknown or not modes:
        raise UserError(f"--modes: unknown mode(s) {', '.join(unknown) or '(none)'}; use coba and/or uniform")
    if args.steps < 1 or args.warmup_steps < 0:
        raise UserError("--steps must be >= 1 and --warmup-steps >= 0")
    if args.master_weights == "bf16" and args.zero_stage == 0:
        raise UserError("--master-weights bf16 needs --zero-stage 1, 2 or 3 (DeepSpeed's rule)")
    knobs = Knobs(attn=args.attn, zero_stage=args.zero_stage,
                  gradient_checkpointing=False if args.gradient_checkpointing == "off" else args.gradient_checkpointing,
                  compile=args.compile, master_weights=args.master_weights)
    report = run_benchmark(modes, tiny=args.tiny, steps=args.steps, warmup_steps=args.warmup_steps, knobs=knobs,
                           work_dir=args.work_dir)
    json_path, md_path = write_report(report, args.out)
    print(report["table"])
    print(f"\nwrote {json_path} and {md_path}")
    return 0
