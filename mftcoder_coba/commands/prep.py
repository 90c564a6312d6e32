"""``mftcoder-coba prep``: tokenise and pack multitask data into binary shards (see :mod:`prepare`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from mftcoder_coba.data_prep.fim import parse_rate
from mftcoder_coba.data_prep.pipeline import PrepOptions, prepare
from mftcoder_coba.data_prep.report import print_tables
from mftcoder_coba.errors import UserError

DEMO = "demo"
"""``--task demo`` / ``--tokenizer demo``: the corpus and tokenizer that ship with the package, by a name a user
can type (their install paths are not)."""


def parse_tasks(values: list[str]) -> list[tuple[str, Path]]:
    """Every ``--task``; ``demo`` stands for the four shipped demo tasks."""
    from mftcoder_coba.demo_data import DEMO_TASKS

    tasks: list[tuple[str, Path]] = []
    for value in values:
        tasks.extend(DEMO_TASKS.items() if value.strip() == DEMO else [parse_task(value)])
    return tasks


def tokenizer_path(value: str) -> Path:
    """``--tokenizer``: a local tokenizer directory, or ``demo`` for the shipped one."""
    if value.strip() == DEMO and not Path(value).exists():
        from mftcoder_coba.demo_data import TOKENIZER_DIR

        return Path(TOKENIZER_DIR)
    return Path(value)


def parse_task(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise UserError(f"--task {value!r}: expected NAME=PATH, e.g. --task code_completion=data/completion.jsonl")
    return name.strip(), Path(path.strip())


def parse_mix(value: str) -> tuple[str, float]:
    name, sep, factor = value.partition("=")
    try:
        number = float(factor)
    except ValueError:
        number = float("nan")
    if not sep or not name.strip() or not 0 < number < float("inf"):
        raise UserError(f"--mix {value!r}: expected NAME=FACTOR with FACTOR > 0, e.g. --mix unit_tests=2")
    return name.strip(), number


def _once(flag: str, pairs: list[tuple[str, object]]) -> dict:
    given: dict = {}
    for name, value in pairs:
        if name in given:
            raise UserError(f"{flag}: task '{name}' given twice")
        given[name] = value
    return given


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", action="append", required=True, metavar="NAME=PATH",
                        help="a task and its data (.jsonl, or .json holding an array or JSON lines, each optionally "
                             ".gz or .bz2; .parquet; .arrow; any case; a directory searched for them; a datasets "
                             "save_to_disk directory; or hf:ORG/DATASET[:CONFIG][@SPLIT] from the Hugging Face Hub or "
                             "its local cache); repeat per task, task ids follow this order; 'demo': the four "
                             "shipped demo tasks")
    parser.add_argument("--tokenizer", required=True, type=str,
                        help="local Hugging Face tokenizer directory; 'demo': the shipped demo tokenizer")
    parser.add_argument("--seq-len", required=True, type=int, help="tokens per packed row")
    parser.add_argument("--out", required=True, type=Path, help="output directory (train/, valid/, tokenizer/)")
    valid = parser.add_mutually_exclusive_group()
    valid.add_argument("--valid-fraction", type=float, help="share of each task held out (default 0.05)")
    valid.add_argument("--valid-samples-per-task", type=int, help="records held out per task")
    parser.add_argument("--seed", type=int, default=1234,
                        help="seed of the held-out choice, of --mix subsets and of --fim choices and cut points")
    parser.add_argument("--overlong", choices=("truncate", "truncate-left", "drop"), default="truncate",
                        help="samples longer than --seq-len: truncate cuts the end, truncate-left keeps the answer and "
                             "cuts the oldest context (earlier turns first), drop drops them (all counted)")
    parser.add_argument("--fim", action="append", metavar="NAME=RATE[,SPM_RATE]",
                        help="rewrite RATE of the task's samples into fill-in-the-middle form with the tokenizer's FIM "
                             "tokens (SPM_RATE of those in SPM order, the rest PSM); the loss covers the middle and "
                             "EOS")
    parser.add_argument("--mix", action="append", metavar="NAME=FACTOR",
                        help="use each training sample of the task FACTOR times (2: twice, 0.5: a seeded half, 1.5: "
                             "once plus a seeded half); held-out samples are chosen first and used once")
    parser.add_argument("--template", choices=("auto", "chat", "mftcoder"), default="auto",
                        help="chat: the tokenizer's chat template; mftcoder: MFTCoder role markers; "
                             "auto: chat when the tokenizer has one")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip bad records (counted by reason in the manifest) instead of stopping")
    parser.add_argument("--workers", type=int, default=1,
                        help="1: render and tokenise in this process, one thread per core (fastest on small "
                             "machines); N > 1: N worker processes. The output is the same for any value")
    parser.add_argument("--rows-per-shard", type=int, help="rows per shard file (default: ~256 MiB shards)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out that prep wrote, once the new one is done (never a folder "
                             "holding the inputs or other files, never inside a run directory)")


def main(args: argparse.Namespace) -> int:
    opts = PrepOptions(
        tasks=parse_tasks(args.task), tokenizer=tokenizer_path(args.tokenizer), seq_len=args.seq_len, out=args.out,
        valid_fraction=args.valid_fraction, valid_samples_per_task=args.valid_samples_per_task, seed=args.seed,
        overlong=args.overlong, template=args.template, skip_bad=args.skip_bad, workers=args.workers,
        overwrite=args.overwrite, rows_per_shard=args.rows_per_shard,
        fim=_once("--fim", [parse_rate(v) for v in args.fim or ()]),
        mix=_once("--mix", [parse_mix(v) for v in args.mix or ()]))
    prepare(opts)
    print_tables(Path(args.out))
    return 0
