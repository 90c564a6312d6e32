"""``mftcoder-coba verify OUT``: recompute every shard checksum and compare it with the manifests."""
from __future__ import annotations

import argparse
from pathlib import Path

from mftcoder_coba.data import manifest as manifest_io
from mftcoder_coba.data.layout import shard_problem
from mftcoder_coba.data_prep.tokens import tokenizer_files_sha256
from mftcoder_coba.errors import UserError


def verify(out: Path) -> list[str]:
    """Problems found (empty when every shard and the tokenizer copy match their manifests)."""
    problems: list[str] = []
    for split in ("train", "valid"):
        manifest = manifest_io.load(out / split)
        for shard in manifest["shards"]:
            problem = shard_problem(out / split / shard["file"], shard)
            if problem:
                problems.append(problem)
        tok_dir = out / split / manifest["tokenizer"]["dir"]
        if tok_dir.is_dir() and tokenizer_files_sha256(tok_dir)[0] != manifest["tokenizer"]["sha256"]:
            problems.append(f"{tok_dir.resolve()}: tokenizer files differ from the ones the shards were made with")
    return problems


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="directory written by `mftcoder-coba prep`")


def main(args: argparse.Namespace) -> int:
    problems = verify(args.out)
    if problems:
        raise UserError(f"{len(problems)} problem(s): " + "; ".join(problems))
    count = sum(len(manifest_io.load(args.out / s)["shards"]) for s in ("train", "valid"))
    print(f"{args.out}: OK ({count} shards, checksums match)")
    return 0
