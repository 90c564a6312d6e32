"""The ``mftcoder-coba`` console command: one sub-command per job, each a module of
:mod:`mftcoder_coba.commands` that parses its arguments and calls the library.

Sub-command modules are imported only when chosen, so ``mftcoder-coba --help`` stays fast and a
missing optional dependency of one job does not break the others. Each module exposes
``add_arguments(parser)`` and ``main(args) -> int``. A :class:`~mftcoder_coba.errors.UserError` raised
anywhere becomes one ``mftcoder-coba: error: ...`` line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from mftcoder_coba.errors import UserError

DESCRIPTION = ("Multitask fine-tuning of code LLMs with the CoBa convergence balancer: prepare data, train, "
               "evaluate, export. 'mftcoder-coba COMMAND --help' shows a command's options and defaults.")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prep": ("mftcoder_coba.commands.prep", "tokenise and pack multitask data into binary shards"),
    "inspect": ("mftcoder_coba.commands.inspect", "per-task table of a prepared dataset and a decoded row"),
    "verify": ("mftcoder_coba.commands.verify", "check every shard checksum of a prepared dataset"),
    "simulate": ("mftcoder_coba.commands.simulate", "run every balancer on a synthetic multitask problem"),
    "train": ("mftcoder_coba.commands.train", "multitask fine-tuning with DeepSpeed and a task balancer"),
    "plot": ("mftcoder_coba.commands.plot", "PNGs of held-out loss and task weight per task from a run"),
    "export": ("mftcoder_coba.commands.export", "export a run as a plain transformers model directory"),
    "eval": ("mftcoder_coba.commands.eval",
             "per-task loss and perplexity of a run, export or model on a prepared split"),
    "eval-code": ("mftcoder_coba.commands.eval_code",
                  "code pass@k (HumanEval or own problems) with sandboxed execution"),
    "demo": ("mftcoder_coba.commands.demo", "offline end-to-end demo on the shipped corpus (CPU, minutes)"),
    "bench-train": ("mftcoder_coba.commands.bench_train", "training throughput, MFU and memory benchmark"),
    "bench-memory": ("mftcoder_coba.commands.bench_memory",
                     "training memory by component (activations, engine), any device"),
    "cold-fusion": ("mftcoder_coba.commands.cold_fusion", "run ColD Fusion iterations locally"),
    "fuse": ("mftcoder_coba.commands.fuse", "average contributor checkpoints into one model"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mftcoder-coba", description=DESCRIPTION)
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING) (default: INFO)")
    parser.add_argument("--log-all-ranks", action="store_true",
                        help="under torchrun / the deepspeed launcher, log on every rank (default: rank 0 only; the "
                             "others log warnings and errors)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


class _DefaultsHelp(argparse.HelpFormatter):
    """Append ``(default: X)`` to an option's help when it has a real default and the help does not already say
    one (argparse's own ArgumentDefaultsHelpFormatter repeats hand-written defaults and prints 'None')."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.default in (None, False, [], "")
                or action.default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def configure_logging(level: str, *, all_ranks: bool = False) -> None:
    """Log at ``level`` on rank 0 (``RANK`` from the launcher; 0 in a plain process) and warnings only on the other
    ranks, so a multi-rank run prints each line once; ``all_ranks`` logs everywhere, each line tagged with its rank."""
    if not isinstance(logging.getLevelName(level.upper()), int):
        raise UserError(f"--log-level {level!r}: not a logging level (DEBUG, INFO, WARNING, ERROR)")
    rank = int(os.environ.get("RANK", "0") or 0)
    fmt = LOG_FORMAT if not all_ranks or "RANK" not in os.environ else f"[rank {rank}] {LOG_FORMAT}"
    logging.basicConfig(level=level.upper() if rank == 0 or all_ranks else logging.WARNING, format=fmt, force=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top, rest = _parser().parse_known_args(argv)
    try:
        configure_logging(top.log_level, all_ranks=top.log_all_ranks)
    except UserError as exc:
        print(f"mftcoder-coba: error: {exc}", file=sys.stderr)
        return 2
    module_name, help_text = COMMANDS[top.command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"mftcoder-coba {top.command}", description=help_text,
                                     formatter_class=_DefaultsHelp)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.main(args) or 0)
    except UserError as exc:
        print(f"mftcoder-coba: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mftcoder-coba: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
