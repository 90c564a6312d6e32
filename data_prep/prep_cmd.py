"""``mftcoder-coba prep``: tokenise and pack multitask data into binary shards (see :mod:`prepare`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from mftcoder_coba.data_prep.inspect_cmd import print_tables
from mftcoder_coba.data_prep.pipeline import PrepOptions, prepare
from mftcoder_coba.errors import UserError


def parse_task(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise UserError(f"--task {value!r}: expected NAME=PATH, e.g. --task code_completion=data/completion.jsonl")
    return name.strip(), Path(path.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", action="append", required=True, metavar="NAME=PATH",
                        help="a task and its data (.jsonl, or .json holding an array or JSON lines, each optionally "
                             ".gz or .bz2, any case; a directory searched for them; or a datasets save_to_disk "
                             "directory); repeat per task, task ids follow this order")
    parser.add_argument("--tokenizer", required=True, type=Path, help="local Hugging Face tokenizer directory")
    parser.add_argument("--seq-len", required=True, type=int, help="tokens per packed row")
    parser.add_argument("--out", required=True, type=Path, help="output directory (train/, valid/, tokenizer/)")
    valid = parser.add_mutually_exclusive_group()
    valid.add_argument("--valid-fraction", type=float, help="share of each task held out (default 0.05)")
    valid.add_argument("--valid-samples-per-task", type=int, help="records held out per task")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the held-out choice")
    parser.add_argument("--overlong", choices=("truncate", "drop"), default="truncate",
                        help="samples longer than --seq-len are truncated or dropped (counted either way)")
    parser.add_argument("--template", choices=("auto", "chat", "mftcoder"), default="auto",
                        help="chat: the tokenizer's chat template; mftcoder: MFTCoder role markers; "
                             "auto: chat when the tokenizer has one")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip bad records (counted by reason in the manifest) instead of stopping")
    parser.add_argument("--workers", type=int, default=1, help="render/tokenise processes")
    parser.add_argument("--rows-per-shard", type=int, help="rows per shard file (default: ~256 MiB shards)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out that prep wrote, once the new one is done (never a folder "
                             "holding the inputs or other files, never inside a run directory)")


def main(args: argparse.Namespace) -> int:
    opts = PrepOptions(
        tasks=[parse_task(t) for t in args.task], tokenizer=args.tokenizer, seq_len=args.seq_len, out=args.out,
        valid_fraction=args.valid_fraction, valid_samples_per_task=args.valid_samples_per_task, seed=args.seed,
        overlong=args.overlong, template=args.template, skip_bad=args.skip_bad, workers=args.workers,
        overwrite=args.overwrite, rows_per_shard=args.rows_per_shard)
    prepare(opts)
    print_tables(Path(args.out))
    return 0
