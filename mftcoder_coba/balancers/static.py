"""Static weighting: fixed user weights, e.g. proportional to each task's data size or importance.

Formula: ``w_k = c_k / sum_j c_j`` for the user's non-negative ``weights`` c (task-id order, at least one
positive). Cost: nothing. Hyperparameters: ``weights`` (required, one per task). Trainer feeds: nothing
(``Needs()``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mftcoder_coba.balancers.base import Balancer, Needs, check_option


@dataclass(frozen=True)
class StaticOptions:
    weights: list[float]
    """One non-negative weight per task, in task-id order; normalised to sum 1."""

    def validate(self) -> None:
        values = np.asarray(self.weights, dtype=np.float64)
        check_option(bool(np.all(np.isfinite(values))) and bool(np.all(values >= 0)), "weights",
                     "every weight must be a finite number >= 0")
        check_option(values.sum() > 0, "weights", "at least one weight must be positive")


class Static(Balancer, name="static"):
    """Fixed, user-given weights."""

    Options = StaticOptions

    def __init__(self, num_tasks: int, weights: list[float]) -> None:
        super().__init__(num_tasks, StaticOptions(list(weights)))
        check_option(len(weights) == self.num_tasks, "weights",
                     f"needs one weight per task ({self.num_tasks}), got {len(weights)}")
        self.needs = Needs()
        values = np.asarray(weights, dtype=np.float64)
        self._weights = values / values.sum()

    def _observe(self, step: int, losses: np.ndarray | None, train_losses: np.ndarray | None,
                 grad_norms: np.ndarray | None) -> None:
        """Static weights ignore observations."""

    def weights(self) -> np.ndarray:
        return self._weights.copy()

    def _state(self) -> dict[str, Any]:
        return {}

    def _load(self, state: dict[str, Any]) -> None:
        """Nothing to restore: the weights come from the config."""
