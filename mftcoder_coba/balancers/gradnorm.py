"""GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018), alpha = 1.5.

Why: balance training rates by making each task's weighted gradient norm at the last shared layer track
the mean norm, scaled up for tasks that have trained less.

Formula. Weights ``w_k`` start at 1 (they sum to K in the paper; :meth:`weights` returns ``w / K``). With
``g_k = ||dL_k/dW||`` (unweighted task loss, ``W`` the weight of the last shared layer), ``G_k = w_k g_k``,
``Gbar = mean_k G_k``, the inverse training rate ``r_k = (L_k / L_k(0)) / mean_j (L_j / L_j(0))`` and
the target ``Gbar * r_k ** alpha`` held constant, the weights take one Adam step on
``L_grad = sum_k |G_k - Gbar r_k^alpha|`` (gradient ``sign(G_k - target_k) * g_k``), are clamped at
``1e-3`` and renormalised to sum K. Means run over the tasks present in the step (finite loss and norm);
absent tasks get a zero gradient. ``L_k(0)`` is a task's first observed training loss.

Cost per step: the trainer must compute K per-task gradient norms at the last shared layer: K extra
partial backward passes (from each task's loss back to that layer only, keeping the step's graph alive
until they are done: ``torch.autograd.grad(L_k, W, retain_graph=True)``), plus a transient gradient buffer
the size of ``W``. K weights and their Adam moments.
Hyperparameters: ``alpha`` (1.5), ``lr`` (0.025, Adam on the weights).
Trainer feeds: ``Needs(train_losses=True, grad_norms=True)``: ``observe(s, train_losses=...,
grad_norms=...)`` every step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mftcoder_coba.balancers.adam import Adam
from mftcoder_coba.balancers.base import Balancer, Needs, from_json, to_json, update_reference
from mftcoder_coba.config_io import bounded

_MIN_WEIGHT = 1e-3


@dataclass(frozen=True)
class GradNormOptions:
    alpha: float = bounded(1.5, ge=0)
    """Strength of the pull toward equal training rates (0: equal gradient norms)."""
    lr: float = bounded(0.025, gt=0)
    """Adam learning rate of the task weights."""


class GradNorm(Balancer, name="gradnorm"):
    """Weights learned so that weighted gradient norms follow the tasks' relative training rates."""

    Options = GradNormOptions

    def __init__(self, num_tasks: int, alpha: float = GradNormOptions.alpha, lr: float = GradNormOptions.lr) -> None:
        super().__init__(num_tasks, GradNormOptions(float(alpha), float(lr)))
        self.needs = Needs(train_losses=True, grad_norms=True)
        self.task_weights = np.ones(self.num_tasks)  # sum K
        self.reference = np.full(self.num_tasks, np.nan)
        self.optimizer = Adam(self.num_tasks, lr=self.options.lr)

    def _observe(self, step: int, losses: np.ndarray | None, train_losses: np.ndarray | None,
                 grad_norms: np.ndarray | None) -> None:
        assert train_losses is not None and grad_norms is not None  # ensured by needs
        update_reference(self.reference, train_losses)
        present = ~np.isnan(train_losses) & ~np.isnan(grad_norms) & ~np.isnan(self.reference)
        grad = np.zeros(self.num_tasks)
        if present.any():
            norms = grad_norms[present]
            weighted = self.task_weights[present] * norms
            rates = train_losses[present] / self.reference[present]
            mean_rate = rates.mean()
            inverse_rates = rates / mean_rate if mean_rate > 0 else np.ones_like(rates)
            target = weighted.mean() * inverse_rates ** self.options.alpha
            grad[present] = np.sign(weighted - target) * norms
        updated = np.maximum(self.optimizer.step(self.task_weights, grad), _MIN_WEIGHT)
        self.task_weights = updated * self.num_tasks / updated.sum()

    def weights(self) -> np.ndarray:
        return self.task_weights / self.num_tasks

    def _state(self) -> dict[str, Any]:
        return {"task_weights": self.task_weights.tolist(), "reference": to_json(self.reference),
                "optimizer": self.optimizer.state_dict()}

    def _load(self, state: dict[str, Any]) -> None:
        self.task_weights = np.array(state["task_weights"], dtype=np.float64)
        self.reference = from_json(state["reference"])
        self.optimizer.load_state_dict(state["optimizer"])
