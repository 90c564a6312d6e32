"""Uniform weighting: every task weighs 1/K — the plain multitask baseline every method is judged against.

Formula: ``w_k = 1/K``. With the trainer's exact objective ``sum_k w_k L_k / sum_{k present} w_k`` this is
the mean of the per-task token-mean losses of the tasks in the global batch (each task counts the same,
however many tokens it has). Cost: nothing. Hyperparameters: none. Trainer feeds: nothing
(``Needs()``); ``observe`` accepts and ignores observations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mftcoder_coba.balancers.base import Balancer, Needs


@dataclass(frozen=True)
class UniformOptions:
    def validate(self) -> None:
        """Nothing to check: uniform weighting has no hyperparameters."""


class Uniform(Balancer, name="uniform"):
    """``w_k = 1/K`` always."""

    Options = UniformOptions

    def __init__(self, num_tasks: int) -> None:
        super().__init__(num_tasks, UniformOptions())
        self.needs = Needs()

    def _observe(self, step: int, losses: np.ndarray | None, train_losses: np.ndarray | None,
                 grad_norms: np.ndarray | None) -> None:
        """Uniform weights ignore observations."""

    def weights(self) -> np.ndarray:
        return np.full(self.num_tasks, 1.0 / self.num_tasks)

    def _state(self) -> dict[str, Any]:
        return {}

    def _load(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""
