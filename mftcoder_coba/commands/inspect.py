"""``mftcoder-coba inspect OUT``: the tables and decoded row of :mod:`mftcoder_coba.data_prep.report`."""
from __future__ import annotations

import argparse
from pathlib import Path

from mftcoder_coba.data import PackedDataset
from mftcoder_coba.data_prep.report import decode_row, print_tables
from mftcoder_coba.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="directory written by `mftcoder-coba prep`")
    parser.add_argument("--split", choices=("train", "valid"), default="train", help="split of the decoded row")
    parser.add_argument("--row", type=int, default=0, help="row to decode")
    parser.add_argument("--no-decode", action="store_true", help="only print the tables")


def main(args: argparse.Namespace) -> int:
    print_tables(args.out)
    if args.no_decode:
        return 0
    ds = PackedDataset(args.out / args.split)
    if not 0 <= args.row < len(ds):
        raise UserError(f"--row {args.row}: {args.out / args.split} has {len(ds)} rows")
    if ds.tokenizer_dir is None:
        raise UserError(f"{args.out / args.split}: the tokenizer of this dataset is gone; cannot decode")
    from mftcoder_coba.data_prep.tokens import load_tokenizer

    print(f"row {args.row} of {args.out / args.split} (loss targets in [[...]]):")
    print(decode_row(ds, args.row, load_tokenizer(ds.tokenizer_dir)))
    return 0
