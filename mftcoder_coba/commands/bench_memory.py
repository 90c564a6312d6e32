"""``mftcoder-coba bench-memory``: arguments for :func:`mftcoder_coba.bench_memory.run` (which says what
is measured)."""
from __future__ import annotations

import argparse
from pathlib import Path

from mftcoder_coba.bench_memory import run
from mftcoder_coba.bench_train import write_files
from mftcoder_coba.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("bench_results"),
                        help="folder for memory_<device>.json / .md (default: ./bench_results; the repository keeps "
                             "its committed results in benchmarks/train)")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens in the measured row (default 1024)")
    parser.add_argument("--tiny", action="store_true", help="the tiny model (tests; seconds)")


def main(args: argparse.Namespace) -> int:


    if args.tokens < 4:
        raise UserError("--tokens must be >= 4")
    report = run(args.tiny, args.tokens)
    json_path, md_path = write_files(report, args.out, [], args.tiny, prefix="memory_")
    print(report["table"])
    print(f"\nwrote {json_path} and {md_path}")
    return 0
