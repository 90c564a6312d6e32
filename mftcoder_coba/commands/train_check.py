"""``python -m mftcoder_coba.commands.train_check WORLD_SIZE TRAIN-ARGS...``: the checks of ``train`` for a run
of WORLD_SIZE ranks, without training (used by ``launch/*.sh`` before they start torchrun).

Why: under torchrun a config or data mistake was reported by every rank, wrapped in torchrun's ChildFailedError
report, and with restarts enabled repeated for every restart. Checked once here, it is one
``mftcoder-coba: error: ...`` line and exit 2. The checks are :func:`mftcoder_coba.training.preflight.run`, the
same the workers make (shard checksums are cached, so they are not hashed twice).
"""
from __future__ import annotations

import argparse
import sys

from mftcoder_coba.commands.train import add_arguments
from mftcoder_coba.config import load_run_config
from mftcoder_coba.errors import UserError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mftcoder-coba train")
    parser.add_argument("world_size", type=int)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg = load_run_config(args.config, args.overrides)
        from mftcoder_coba.training import preflight  # heavy imports, after the config is known good

        preflight.run(cfg, args.world_size, args.resume)
    except UserError as exc:
        print(f"mftcoder-coba: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
