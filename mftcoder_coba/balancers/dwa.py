"""Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019 — MTAN), over windows of optimizer steps.

Why: a task whose loss fell less over the last stretch of training gets more weight, using only the
losses training computes anyway.

Formula: with ``Lbar_k(t)`` the mean training loss of task k over the last ``window`` observed steps and
``Lbar_k(t-1)`` the mean over the ``window`` steps before them,
``r_k = Lbar_k(t) / Lbar_k(t-1)`` and ``w = softmax(r / T)`` (the paper's ``K * softmax`` divided by K so
the weights sum to 1). MTAN averages over epochs; LLM fine-tuning runs a few epochs, so windows of steps
play that role (``window=1`` is the per-step ratio). Uniform until ``2 * window`` steps are observed; a
task without a loss in either window has ratio 1 (NaN observations are left out of the means).

Cost per step: nothing beyond the per-task training losses; memory ``2 * window`` loss vectors.
Hyperparameters: ``temperature`` T (2), ``window`` (20 steps).
Trainer feeds: ``Needs(train_losses=True)``: ``observe(s, train_losses=...)`` every step.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from mftcoder_coba.balancers.base import Balancer, Needs, from_json, softmax, to_json
from mftcoder_coba.config_io import bounded


@dataclass(frozen=True)
class DwaOptions:
    temperature: float = bounded(2.0, gt=0)
    """T: larger flattens the weights toward uniform."""
    window: int = bounded(20, ge=1)
    """Optimizer steps per averaging window."""


class DWA(Balancer, name="dwa"):
    """``w = softmax((Lbar(t) / Lbar(t-1)) / T)`` over windowed mean training losses."""

    Options = DwaOptions

    def __init__(self, num_tasks: int, temperature: float = DwaOptions.temperature,
                 window: int = DwaOptions.window) -> None:
        super().__init__(num_tasks, DwaOptions(float(temperature), window))
        self.needs = Needs(train_losses=True)
        self.history = np.zeros((0, self.num_tasks))  # the last 2 * window loss vectors

    def _observe(self, step: int, losses: np.ndarray | None, train_losses: np.ndarray | None,
                 grad_norms: np.ndarray | None) -> None:
        assert train_losses is not None  # ensured by needs
        self.history = np.vstack([self.history, train_losses[None, :]])[-2 * self.options.window:]

    def ratios(self) -> np.ndarray:
        """``Lbar(t) / Lbar(t-1)`` per task (1 where it is not defined yet)."""
        window = self.options.window
        if len(self.history) < 2 * window:
            return np.ones(self.num_tasks)
        with warnings.catch_warnings():  # all-NaN window columns are expected and handled below
            warnings.simplefilter("ignore", RuntimeWarning)
            older = np.nanmean(self.history[:window], axis=0)
            recent = np.nanmean(self.history[window:], axis=0)
        ok = np.isfinite(older) & np.isfinite(recent) & (older > 0)
        return np.where(ok, recent / np.where(ok, older, 1.0), 1.0)

    def weights(self) -> np.ndarray:
        return softmax(self.ratios() / self.options.temperature)

    def _state(self) -> dict[str, Any]:
        return {"history": to_json(self.history)}

    def _load(self, state: dict[str, Any]) -> None:
        self.history = from_json(state["history"], columns=self.num_tasks)
