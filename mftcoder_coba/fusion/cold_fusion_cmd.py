"""``mftcoder-coba cold-fusion --config fusion.yaml [field=value ...]``: run ColD Fusion iterations locally.

See :mod:`mftcoder_coba.fusion.cold_fusion` for the config fields, the run-directory layout and how
contributors on separate machines take part with ``mftcoder-coba fuse``.
"""
from __future__ import annotations

import argparse

from mftcoder_coba.fusion.cold_fusion import METRICS_FILE, load_fusion_config, run_cold_fusion


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="fusion configuration (YAML or JSON)")
    parser.add_argument("overrides", nargs="*", metavar="FIELD=VALUE",
                        help="config overrides, e.g. iterations=5 parallel=true")


def main(args: argparse.Namespace) -> int:
    cfg = load_fusion_config(args.config, args.overrides)
    run_dir = run_cold_fusion(cfg)
    print(run_dir / METRICS_FILE)
    return 0
