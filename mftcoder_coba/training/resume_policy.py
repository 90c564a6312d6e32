"""Which config fields a resumed run may change, checked against the run's own ``config.yaml``.

Why: a resumed run restores the model, the adapter, the optimizer's moments and hyper-parameters, the balancer,
the data order and the LR schedule's position from its checkpoint. A changed field among those was either
silently ignored (``optim.lr=0.5`` on resume trained on near the old LR while ``config.yaml`` said 0.5) or
failed deep inside DeepSpeed (``model.lora.r=4``: a 60-line ``state_dict`` traceback). Torchtitan and Megatron
keep the same rule: what defines the optimisation is fixed at the first start; how long it runs, how often it
saves, logs and evaluates, and where it reports may change. Anything else is refused in one line naming the
field, before the run directory is touched, so ``config.yaml`` (rewritten at every start) always describes the
run that was trained.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from mftcoder_coba import config_io
from mftcoder_coba.config import RunConfig
from mftcoder_coba.errors import ConfigError

# Fields (or whole sections, by prefix) a resumed run may change: where the run directory is, length, cadences,
# checkpoint retention, what is reported where, host threads and per-rank micro-batch rows (the global batch, hence
# every step's rows, stays).
MAY_CHANGE = (
    "run_dir",  # a run directory copied or moved elsewhere resumes there
    "train.max_steps", "train.num_epochs", "train.save_every", "train.save_every_minutes", "train.save_final",
    "train.keep_last",
    "train.log_every", "train.report_to", "train.tensorboard", "train.keep_best", "train.early_stopping",
    "train.nonfinite", "train.max_skipped_steps", "train.cpu_threads", "train.micro_batch_size",
    "eval.every", "eval.micro_batch_size",
)


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted field names to leaf values (lists stay whole: ``optim.betas``, ``train.report_to``)."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _may_change(field: str) -> bool:
    return any(field == allowed or field.startswith(allowed + ".") for allowed in MAY_CHANGE)


def _same(old: Any, new: Any) -> bool:
    """Equal values; paths compare by the file they name (``prepared/train`` = its absolute path)."""
    if old == new:
        return True
    return isinstance(old, str) and isinstance(new, str) and os.path.realpath(old) == os.path.realpath(new)


def changed_fields(saved: dict[str, Any], cfg: RunConfig) -> list[tuple[str, Any, Any]]:
    """``(field, saved value, new value)`` for each field a resume may not change; fields only one side knows
    (a config written by an older version) are not compared."""
    old, new = _flat(saved), _flat(config_io.to_dict(cfg))
    return [(field, old[field], new[field]) for field in old
            if field in new and not _may_change(field) and not _same(old[field], new[field])]


def check(cfg: RunConfig, checkpoint: Path) -> None:
    """Refuse, in one line naming the field, a resume of ``checkpoint`` whose config changes a fixed field of the
    run recorded in ``run_dir/config.yaml`` (no file: nothing to compare, as for a run made by hand)."""
    recorded = Path(cfg.run_dir) / "config.yaml"
    if not recorded.is_file():
        return
    saved = yaml.safe_load(recorded.read_text(encoding="utf-8"))
    if not isinstance(saved, dict):
        return
    changes = changed_fields(saved, cfg)
    if changes:
        field, was, now = changes[0]
        more = f" (and {len(changes) - 1} more: {', '.join(f for f, _, _ in changes[1:])})" if len(changes) > 1 else ""
        raise ConfigError(f"config field '{field}': {now!r} differs from {was!r} in {recorded}, and resuming "
                          f"{checkpoint.name} keeps it{more}; start a new run_dir to change it (a resume may "
                          "change only lengths, cadences and reporting: README 'Resuming')")
