"""CoBa, the Convergence Balancer (Gong et al., EMNLP 2024), as ``docs/coba.md`` (the formulation as implemented)
states it.

Why: in multitask fine-tuning some tasks converge fast and then overfit while others are still learning.
CoBa reads the *slopes of the held-out loss curves*: it raises the weight of tasks that converge slower
than the others, and when a task's held-out loss flattens or turns up it takes weight away from it.

Formula. ``r_k(s) = L_k(s) / L_k(0)`` is task k's held-out loss after step s over its loss before training.
At update u, ``alpha_k(u)`` is the ordinary-least-squares slope of ``r_k`` against the real step numbers
over the last N observations (NaN observations left out of that task's fit; fewer than 2 points: 0).
After the W warm-up updates (uniform weights, but recorded so they feed the first fits), with M the
number of post-warm-up updates so far, ``N' = min(M, N)`` and ``alpha_max(j) = max_k alpha_k(j)``::

    RCS(u)   = softmax_k( K * alpha_k(u) / sum_j |alpha_j(u)| )
    ACS_k(u) = softmax_k( -N' * alpha_k(u) / sum_{last N' updates j} |alpha_k(j)| )
    DF(u)    = min(1, M * softmax_j( -tau * M * alpha_max(j) / sum_{i<=M} |alpha_max(i)| )[j = u])
    w(u)     = DF(u) * RCS(u) + (1 - DF(u)) * ACS(u)

A zero denominator makes its logits 0 (uniform score); weights are finite, >= 0 and sum to 1. K = 1 gives
weight 1. A task whose ``L_k(0)`` is missing (NaN or <= 0) takes its first finite positive held-out loss
as the reference.

Cost per update: one forward pass over ``valid_rows_per_task`` held-out rows per task (no extra
backward), and O(K * N) host arithmetic. Memory: the last N loss vectors and slope vectors, plus one
float per post-warm-up update for ``alpha_max`` (the DF softmax runs over all of them).

Hyperparameters: ``history_length`` N (200), ``warmup_steps`` W (100, in updates), ``tau`` (5). The
trainer-level ``update_interval`` and ``valid_rows_per_task`` live in the run config.

Diagnostics (logged per update, not used by the weights beyond alpha itself): each task's slope over the
current window and its standard error from the OLS residuals, so noise-driven weights can be seen.

Trainer feeds (``Needs(validation=True)``): ``observe(0, losses=L(0))`` before step 1, then
``observe(s, losses=...)`` after every ``update_interval``-th step with the per-task held-out losses; each
call after the first is one update. Steps must increase.

Known differences from MFTCoder v0.5's code, which this follows the paper instead of: MFTCoder applies an
extra ``softmax(K * w)`` with a floor at 1/(10K); does not clip DF at 1; takes ``alpha_max`` as the slope
of the maximum loss curve rather than the maximum of the slopes; renormalises the weights inside each
micro-batch on each rank (so a micro-batch of one task ignores its weight); drops missing points without
re-aligning the x axis; and does not checkpoint CoBa's state (resuming after warm-up crashes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mftcoder_coba.balancers.base import Balancer, Needs, from_json, softmax, to_json, update_reference
from mftcoder_coba.config_io import bounded


@dataclass(frozen=True)
class CobaOptions:
    history_length: int = bounded(200, ge=2)
    """N: observations per slope fit, and past slopes per ACS window (at least 2: a slope needs two points)."""
    warmup_steps: int = bounded(100, ge=0)
    """W: updates with uniform weights (their observations still feed the first slope fits)."""
    tau: float = bounded(5.0, ge=0)
    """Temperature of the divergence factor; 0 makes DF = 1 (RCS only)."""


def ols_fit(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column OLS slope of ``values`` (T, K) against ``steps`` (T,), NaN rows left out per column, and
    the slope's standard error ``sqrt(SSR / (n - 2) / Sxx)`` from the fit's residuals.

    A column with fewer than two finite points, or whose points share one step, has slope 0; its standard
    error is NaN, as is that of a column with fewer than three points (two points leave no residual).
    """
    mask = ~np.isnan(values)
    count = mask.sum(axis=0)
    x = np.where(mask, steps[:, None].astype(np.float64), 0.0)
    y = np.where(mask, values, 0.0)
    safe = np.maximum(count, 1)
    dx = np.where(mask, x - x.sum(axis=0) / safe, 0.0)
    dy = np.where(mask, y - y.sum(axis=0) / safe, 0.0)
    sxx = (dx * dx).sum(axis=0)
    sxy = (dx * dy).sum(axis=0)
    ok = (count >= 2) & (sxx > 0)
    slopes = np.where(ok, sxy / np.where(ok, sxx, 1.0), 0.0)
    residuals = np.where(mask, dy - slopes * dx, 0.0)
    fitted = ok & (count >= 3)
    variance = (residuals * residuals).sum(axis=0) / np.maximum(count - 2, 1)
    errors = np.where(fitted, np.sqrt(variance / np.where(fitted, sxx, 1.0)), np.nan)
    return slopes, errors


def _guarded_ratio(numerator: np.ndarray, denominator: np.ndarray | float) -> np.ndarray:
    """``numerator / denominator``, 0 where the denominator is 0 (a score with no signal is uniform)."""
    denominator = np.broadcast_to(np.asarray(denominator, dtype=np.float64), numerator.shape)
    return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), 0.0)


class CoBa(Balancer, name="coba"):
    """Convergence Balancer; see the module docstring and ``docs/coba.md``."""

    Options = CobaOptions

    def __init__(self, num_tasks: int, history_length: int = CobaOptions.history_length,
                 warmup_steps: int = CobaOptions.warmup_steps, tau: float = CobaOptions.tau) -> None:
        super().__init__(num_tasks, CobaOptions(history_length, warmup_steps, float(tau)))
        self.needs = Needs(validation=True)
        k = self.num_tasks
        self.reference: np.ndarray | None = None  # L_k(0); NaN until known
        self.steps = np.zeros(0, dtype=np.int64)  # steps of the last N observations
        self.losses = np.zeros((0, k))  # the last N raw held-out loss vectors
        self.slopes = np.zeros((0, k))  # the last N post-warm-up slope vectors
        self.alpha_max: list[float] = []  # max_k alpha_k(j), j = 1..M
        self.updates = 0  # u: observations after the reference
        self.last_step: int | None = None
        self._weights = np.full(k, 1.0 / k)
        self._fit: tuple[np.ndarray, np.ndarray] | None = None  # (slopes, standard errors) of the latest update

    def _observe(self, step: int, losses: np.ndarray | None, train_losses: np.ndarray | None,
                 grad_norms: np.ndarray | None) -> None:
        assert losses is not None  # ensured by needs.validation
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(f"coba: observation steps must increase (got {step} after {self.last_step})")
        self.last_step = step
        if self.reference is None:
            self.reference = np.where(losses > 0, losses, np.nan)
            return
        update_reference(self.reference, losses)
        n = self.options.history_length
        self.updates += 1
        self.steps = np.append(self.steps, step)[-n:]
        self.losses = np.vstack([self.losses, losses[None, :]])[-n:]
        ratios = self.losses / self.reference  # NaN where a loss or the reference is missing
        alpha, errors = ols_fit(self.steps, ratios)
        self._fit = (alpha, errors)
        if self.updates <= self.options.warmup_steps:
            return
        self.slopes = np.vstack([self.slopes, alpha[None, :]])[-n:]
        self.alpha_max.append(float(alpha.max()))
        self._weights = self._combine(alpha)

    def _combine(self, alpha: np.ndarray) -> np.ndarray:
        k = self.num_tasks
        m = len(self.alpha_max)
        window = min(m, self.options.history_length)
        rcs = softmax(_guarded_ratio(k * alpha, np.abs(alpha).sum()))
        own_scale = np.abs(self.slopes[-window:]).sum(axis=0)
        acs = softmax(_guarded_ratio(-window * alpha, own_scale))
        df = self.divergence_factor()
        return df * rcs + (1.0 - df) * acs

    def divergence_factor(self) -> float:
        """DF of the latest update (1 during warm-up, when RCS would lead anyway)."""
        if not self.alpha_max:
            return 1.0
        m = len(self.alpha_max)
        history = np.array(self.alpha_max)
        logits = _guarded_ratio(-self.options.tau * m * history, np.abs(history).sum())
        return min(1.0, m * float(softmax(logits)[-1]))

    def weights(self) -> np.ndarray:
        return self._weights.copy()

    def diagnostics(self) -> dict[str, np.ndarray]:
        """The latest update's fit: ``slope`` (alpha_k over the current window) and ``slope_se``, its standard
        error from the OLS residuals (NaN below three points).

        Why: a slope whose standard error is as large as itself (or as the gaps between the tasks' slopes)
        is mostly observation noise, and so are the weights built from it; more held-out rows per update, or
        ``balancer.held_out: fixed``, shrink it. During warm-up the fit is reported too (the weights do not
        use it yet). Empty before the first update.
        """
        if self._fit is None:
            return {}
        return {"slope": self._fit[0].copy(), "slope_se": self._fit[1].copy()}

    def _state(self) -> dict[str, Any]:
        return {
            "reference": None if self.reference is None else to_json(self.reference),
            "steps": self.steps.tolist(),
            "losses": to_json(self.losses),
            "slopes": to_json(self.slopes),
            "alpha_max": list(self.alpha_max),
            "updates": self.updates,
            "last_step": self.last_step,
            "weights": to_json(self._weights),
        }

    def _load(self, state: dict[str, Any]) -> None:
        k = self.num_tasks
        self.reference = None if state["reference"] is None else from_json(state["reference"])
        self.steps = np.array(state["steps"], dtype=np.int64)
        self.losses = from_json(state["losses"], columns=k)
        self.slopes = from_json(state["slopes"], columns=k)
        self.alpha_max = [float(v) for v in state["alpha_max"]]
        self.updates = int(state["updates"])
        self.last_step = None if state["last_step"] is None else int(state["last_step"])
        self._weights = from_json(state["weights"])
        self._fit = None
        if self.updates and self.reference is not None:  # the fit is a function of the restored window
            self._fit = ols_fit(self.steps, self.losses / self.reference)
