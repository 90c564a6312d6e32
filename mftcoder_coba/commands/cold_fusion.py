"""``mftcoder-coba cold-fusion --config fusion.yaml [field=value ...]``: run ColD Fusion iterations locally, then
print the seen tasks' held-out loss (base vs fused) and, with ``unseen`` tasks, their fine-tune losses from
both starting points.

See :mod:`mftcoder_coba.fusion.cold_fusion` for the config fields, the run-directory layout and how
contributors on separate machines take part with ``mftcoder-coba fuse``.
"""
from __future__ import annotations

import argparse
import json

from mftcoder_coba.fusion.cold_fusion import METRICS_FILE, format_summary, load_fusion_config, run_cold_fusion


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="fusion configuration (YAML or JSON)")
    parser.add_argument("overrides", nargs="*", metavar="FIELD=VALUE",
                        help="config overrides, e.g. iterations=5 parallel=true")


def main(args: argparse.Namespace) -> int:
    cfg = load_fusion_config(args.config, args.overrides)
    run_dir = run_cold_fusion(cfg)
    metrics = run_dir / METRICS_FILE
    print(format_summary([json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line]))
    print(metrics)
    return 0
