"""FAMO, Fast Adaptive Multitask Optimization (Liu, Feng, Stone & Liu, NeurIPS 2023).

Why: decrease every task's loss at a balanced *rate* (in log space) with O(1) extra cost instead of
per-task gradients, by learning task logits from how much each task's loss actually fell.

Formula. Task logits ``xi`` (K), ``z = softmax(xi)``. The step minimises ``sum_k z_k log L_k``, whose
gradient is ``sum_k (z_k / L_k) grad L_k``; normalised, the loss weights are
``w_k = (z_k / L_k) / sum_j (z_j / L_j)``. After the step the same batch is evaluated again and
``delta_k = log L_k(before) - log L_k(after)`` (the log-loss decrease); the logits take one Adam step
(lr 0.025, L2 weight decay 0.01, as the paper) along the softmax's vector-Jacobian product
``grad_xi = z * (delta - <z, delta>)``, which moves weight toward the tasks that improved least.

Departures, both forced by the trainer's exact objective: the paper's ``L_k`` in the weight is the current
batch's loss, which is not known before the backward passes of gradient accumulation start, so the latest
post-step loss stands in for it (it is measured at exactly the parameters the next step starts from). Tasks
absent from a batch (NaN) are left out: the softmax Jacobian is taken over the present tasks only, absent
tasks get a zero gradient (their logits still feel Adam momentum and weight decay) and keep their last
known loss for the weight (or the mean of the known ones before they are first seen). As in the reference
code, ``1e-8`` is added to every loss before its logarithm and in the weight.

Cost per step: one extra forward pass over the step's global batch after the optimizer step; K logits
and their Adam moments. Hyperparameters: ``lr`` (0.025), ``weight_decay`` (0.01).
Trainer feeds: ``Needs(train_losses=True, post_step_losses=True)``: ``observe(s, train_losses=...)`` with
the step's losses, then ``observe_post_step(s, train_losses=...)`` with the same batch after the update.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mftcoder_coba.balancers.adam import Adam
from mftcoder_coba.balancers.base import Balancer, Needs, from_json, softmax, to_json
from mftcoder_coba.config_io import bounded

_LOSS_EPS = 1e-8


def _shifted(losses: np.ndarray) -> np.ndarray:
    """``max(L, 0) + 1e-8``: the reference code's ``L - min_loss + 1e-8`` with the minimum loss 0."""
    return np.maximum(losses, 0.0) + _LOSS_EPS


@dataclass(frozen=True)
class FamoOptions:
    lr: float = bounded(0.025, gt=0)
    """Adam learning rate of the task logits."""
    weight_decay: float = bounded(0.01, ge=0)
    """L2 weight decay on the task logits (keeps them near uniform)."""


class FAMO(Balancer, name="famo"):
    """Task logits learned from the post-step log-loss decrease."""

    Options = FamoOptions

    def __init__(self, num_tasks: int, lr: float = FamoOptions.lr,
                 weight_decay: float = FamoOptions.weight_decay) -> None:
        super().__init__(num_tasks, FamoOptions(float(lr), float(weight_decay)))
        self.needs = Needs(train_losses=True, post_step_losses=True)
        self.logits = np.zeros(self.num_tasks)
        self.optimizer = Adam(self.num_tasks, lr=self.options.lr, weight_decay=self.options.weight_decay)
        self.latest_losses = np.full(self.num_tasks, np.nan)  # post-step losses, the next step's L_k
        self.pending: tuple[int, np.ndarray] | None = None  # (step, losses before the update)

    def _observe(self, step: int, losses: np.ndarray | None, train_losses: np.ndarray | None,
                 grad_norms: np.ndarray | None) -> None:
        assert train_losses is not None  # ensured by needs
        self.pending = (step, train_losses)

    def _observe_post_step(self, step: int, train_losses: np.ndarray) -> None:
        if self.pending is None or self.pending[0] != step:
            raise ValueError(f"famo: observe_post_step({step}) must follow observe({step}, train_losses=...)")
        before = self.pending[1]
        self.pending = None
        present = ~np.isnan(before) & ~np.isnan(train_losses)
        self.latest_losses[present] = train_losses[present]
        grad = np.zeros(self.num_tasks)
        if present.any():
            delta = np.log(_shifted(before[present])) - np.log(_shifted(train_losses[present]))
            z = softmax(self.logits[present])
            grad[present] = z * (delta - z @ delta)
        self.logits = self.optimizer.step(self.logits, grad)

    def weights(self) -> np.ndarray:
        known = ~np.isnan(self.latest_losses)
        fill = self.latest_losses[known].mean() if known.any() else 1.0
        raw = softmax(self.logits) / _shifted(np.where(known, self.latest_losses, fill))
        return raw / raw.sum()

    def _state(self) -> dict[str, Any]:
        return {
            "logits": self.logits.tolist(),
            "optimizer": self.optimizer.state_dict(),
            "latest_losses": to_json(self.latest_losses),
            "pending": None if self.pending is None else [self.pending[0], to_json(self.pending[1])],
        }

    def _load(self, state: dict[str, Any]) -> None:
        self.logits = np.array(state["logits"], dtype=np.float64)
        self.optimizer.load_state_dict(state["optimizer"])
        self.latest_losses = from_json(state["latest_losses"])
        pending = state["pending"]
        self.pending = None if pending is None else (int(pending[0]), from_json(pending[1]))

