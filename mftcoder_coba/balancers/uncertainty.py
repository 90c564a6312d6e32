"""Homoscedastic-uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

Why: learn each task's weight as the inverse of its noise level, so tasks with a high irreducible loss do
not dominate, without hand tuning.

Formula: with learned log-variances ``s_k`` the joint objective is ``sum_k exp(-s_k) L_k + s_k``; its
minimum over ``s_k`` is at ``s_k = log L_k``. The weights are ``w_k = exp(-s_k)``. After every step, ``s``
takes one Adam step on that objective with the step's training losses, gradient
``1 - exp(-s_k) L_k`` (0 for tasks absent from the batch) — the same simultaneous update as putting
``s`` into the model's optimiser, but with its own learning rate because an LLM's learning rate would
leave ``s`` near 0 for thousands of steps.

The weights do not sum to 1: they are ``exp(-s)``. The trainer's objective
``sum_k w_k L_k / sum_{k present} w_k`` keeps their ratios and removes their overall scale (in the paper
that scale acts on the effective learning rate).

Cost per step: nothing beyond the per-task training losses; K parameters and their Adam moments.
Hyperparameters: ``lr`` (0.01, Adam), ``init_log_variance`` (0).
Trainer feeds: ``Needs(train_losses=True)``: ``observe(s, train_losses=...)`` every step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from mftcoder_coba.balancers.adam import Adam
from mftcoder_coba.balancers.base import Balancer, Needs, check_option
from mftcoder_coba.config_io import bounded


@dataclass(frozen=True)
class UncertaintyOptions:
    lr: float = bounded(0.01, gt=0)
    """Adam learning rate of the log-variances."""
    init_log_variance: float = 0.0
    """Starting ``s_k`` for every task (0: weight 1)."""

    def validate(self) -> None:
        check_option(math.isfinite(self.init_log_variance), "init_log_variance", "must be a finite number")


class Uncertainty(Balancer, name="uncertainty"):
    """``w_k = exp(-s_k)`` with ``s`` learned on ``sum_k exp(-s_k) L_k + s_k``."""

    Options = UncertaintyOptions

    def __init__(self, num_tasks: int, lr: float = UncertaintyOptions.lr,
                 init_log_variance: float = UncertaintyOptions.init_log_variance) -> None:
        super().__init__(num_tasks, UncertaintyOptions(float(lr), float(init_log_variance)))
        self.needs = Needs(train_losses=True)
        self.log_variances = np.full(self.num_tasks, self.options.init_log_variance)
        self.optimizer = Adam(self.num_tasks, lr=self.options.lr)

    def _observe(self, step: int, losses: np.ndarray | None, train_losses: np.ndarray | None,
                 grad_norms: np.ndarray | None) -> None:
        assert train_losses is not None  # ensured by needs
        present = ~np.isnan(train_losses)
        grad = np.where(present, 1.0 - np.exp(-self.log_variances) * np.where(present, train_losses, 0.0), 0.0)
        self.log_variances = self.optimizer.step(self.log_variances, grad)

    def weights(self) -> np.ndarray:
        return np.exp(-self.log_variances)

    def _state(self) -> dict[str, Any]:
        return {"log_variances": self.log_variances.tolist(), "optimizer": self.optimizer.state_dict()}

    def _load(self, state: dict[str, Any]) -> None:
        self.log_variances = np.array(state["log_variances"], dtype=np.float64)
        self.optimizer.load_state_dict(state["optimizer"])
