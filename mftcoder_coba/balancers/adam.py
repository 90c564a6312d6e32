"""Adam for the few learnable numbers a balancer owns (K task logits, log-variances or weights).

The learning balancers need an optimiser whose whole state fits in ``trainer_state.json`` and steps in
float64 on the host, independent of the model's DeepSpeed optimiser. This is Kingma & Ba's Adam with
bias correction and L2 weight decay added to the gradient, i.e. the update of ``torch.optim.Adam`` with
its default betas and eps (the FAMO reference code uses exactly that optimiser for its task logits), kept
as NumPy vectors so its state is plain data.
"""
from __future__ import annotations

from typing import Any

import numpy as np


class Adam:
    """Adam over one float64 vector; :meth:`step` returns the updated vector."""

    def __init__(self, size: int, lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.steps = 0
        self.exp_avg = np.zeros(size)
        self.exp_avg_sq = np.zeros(size)

    def step(self, param: np.ndarray, grad: np.ndarray) -> np.ndarray:
        beta1, beta2 = self.betas
        grad = grad + self.weight_decay * param
        self.steps += 1
        self.exp_avg = beta1 * self.exp_avg + (1.0 - beta1) * grad
        self.exp_avg_sq = beta2 * self.exp_avg_sq + (1.0 - beta2) * grad * grad
        correction1 = 1.0 - beta1 ** self.steps
        correction2 = 1.0 - beta2 ** self.steps
        denom = np.sqrt(self.exp_avg_sq) / np.sqrt(correction2) + self.eps
        return param - (self.lr / correction1) * self.exp_avg / denom

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "exp_avg": self.exp_avg.tolist(), "exp_avg_sq": self.exp_avg_sq.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.exp_avg = np.array(state["exp_avg"], dtype=np.float64)
        self.exp_avg_sq = np.array(state["exp_avg_sq"], dtype=np.float64)
