"""The best value of a watched metric: ``train.keep_best`` and ``train.early_stopping``.

A metric (``eval.mean``, ``eval.worst``, ``eval.<task>``, ``valid.mean``, ``valid.worst``, ``valid.<task>``;
lower is better) is read from the per-task losses measured at a step (:func:`metric_value`): the ``eval:``
split's or the balancer's held-out sample's. :class:`MetricWatch` keeps the best value, its step and the
measurements since it; its state goes into every checkpoint's trainer_state.json, so a resumed run makes
the same keep-best and stopping decisions as one that was never interrupted. The best checkpoint is named
by ``checkpoints/best.json`` (:func:`write_best` / :func:`read_best`), a plain file rather than a link, so it
reads the same on every filesystem.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mftcoder_coba.atomic import atomic_write_text
from mftcoder_coba.errors import UserError

BEST_FILE = "best.json"
"""In ``run_dir/checkpoints``: ``{"metric", "step", "value", "checkpoint"}`` of the best checkpoint."""


def metric_value(metric: str, tasks: list[str], eval_losses: np.ndarray | None,
                 valid_losses: np.ndarray | None) -> float | None:
    """The value of ``metric`` from this step's measurements, or None when its source was not measured.

    ``mean`` / ``worst``: the mean / largest over the tasks that have a loss (finite values; a task without
    rows in the split has none). A non-finite measurement gives ``nan``, which never counts as an improvement.
    """
    source, _, name = metric.partition(".")
    losses = eval_losses if source == "eval" else valid_losses
    if losses is None:
        return None
    losses = np.asarray(losses, dtype=np.float64)
    if name in ("mean", "worst"):
        present = losses[~np.isnan(losses)]
        if present.size == 0:
            return math.nan
        return float(present.mean() if name == "mean" else present.max())
    return float(losses[tasks.index(name)])


def check_metric_tasks(metric: str, field: str, tasks: list[str]) -> str | None:
    """Why ``metric`` names no task of the shards (one phrase naming ``field``), or None."""
    _, _, name = metric.partition(".")
    if name in ("mean", "worst") or name in tasks:
        return None
    return f"config field '{field}': {metric!r}: no task {name!r} in the shards (tasks: {', '.join(tasks)})"


@dataclass
class MetricWatch:
    """Best value so far of one metric and how many measurements have not improved on it."""

    metric: str
    min_delta: float = 0.0
    best: float | None = None
    best_step: int | None = None
    since_best: int = 0
    """Measurements since the best one (0 right after an improvement)."""

    def observe(self, step: int, value: float) -> bool:
        """Record a measurement; True when it improves on the best by more than ``min_delta``."""
        if math.isfinite(value) and (self.best is None or value < self.best - self.min_delta):
            self.best, self.best_step, self.since_best = value, step, 0
            return True
        self.since_best += 1
        return False

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Continue the watch saved in a checkpoint; one of another metric (or none) leaves this one fresh."""
        if state and state.get("metric") == self.metric:
            self.best, self.best_step = state.get("best"), state.get("best_step")
            self.since_best = int(state.get("since_best", 0))


def write_best(run_dir: Path, watch: MetricWatch, checkpoint: Path) -> None:
    """Name the best checkpoint in ``run_dir/checkpoints/best.json`` (replaced in one rename)."""
    record = {"metric": watch.metric, "step": watch.best_step, "value": watch.best,
              "checkpoint": checkpoint.relative_to(run_dir).as_posix()}
    atomic_write_text(Path(run_dir) / "checkpoints" / BEST_FILE, json.dumps(record, indent=1) + "\n")


def read_best(run_dir: Path) -> Path:
    """The best checkpoint of a run (``train.keep_best``), checked to exist; errors are one line."""
    path = Path(run_dir) / "checkpoints" / BEST_FILE
    if not path.is_file():
        raise UserError(f"{path}: not found; the run kept no best checkpoint (set train.keep_best and train again)")
    try:  # the path is made from the step, so a hand-edited record cannot point outside the run
        record = json.loads(path.read_text(encoding="utf-8"))
        step = record["step"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 1:
            raise TypeError(f"step {step!r} is not a positive integer")
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not a best-checkpoint record ({type(exc).__name__}: {exc})") from None
    checkpoint = Path(run_dir) / "checkpoints" / f"step-{step:08d}"
    if not checkpoint.is_dir():
        raise UserError(f"{path}: names {checkpoint}, which does not exist")
    return checkpoint
