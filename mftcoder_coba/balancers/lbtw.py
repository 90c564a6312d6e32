"""Loss-Balanced Task Weighting (Liu, Liang & Gitter, AAAI 2019), on training or held-out losses.

Why: a task whose loss has already fallen far below its starting value gets less weight, so tasks that
are still far from converged are not drowned out (and an easy task overfits less).

Formula: ``w_k ∝ (L_k / L_k(0)) ** alpha``, normalised to sum 1, with ``L_k`` the task's latest observed
loss and ``L_k(0)`` its first one. The paper weighs each batch with that batch's own loss; here the weights
of a step must be fixed before its backward passes (exact gradient accumulation), so they come from the
latest observation. A task not yet observed has ratio 1; a task missing from an observation keeps its
previous ratio. If every ratio is 0 the weights are uniform.

Cost per step: ``source="train"``: nothing (the per-task training losses come with the loss kernel);
``source="valid"``: one forward pass over the validation sample per update, like CoBa.
Hyperparameters: ``alpha`` (0.5), ``source`` ("train" or "valid").
Trainer feeds: ``Needs(train_losses=True)`` — ``observe(s, train_losses=...)`` every step — or, with
``source="valid"``, ``Needs(validation=True)`` — ``observe(0, losses=L(0))`` and then every update.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from mftcoder_coba.balancers.base import Balancer, Needs, check_option, from_json, to_json, update_reference
from mftcoder_coba.config_io import bounded


@dataclass(frozen=True)
class LbtwOptions:
    alpha: float = bounded(0.5, ge=0)
    """Exponent on the loss ratio; 0 gives uniform weights."""
    source: Literal["train", "valid"] = "train"
    """Which losses to read: the step's training losses or held-out validation losses."""

    def validate(self) -> None:
        check_option(self.source in ("train", "valid"), "source", "must be 'train' or 'valid'")


class LBTW(Balancer, name="lbtw"):
    """``w_k ∝ (L_k / L_k(0)) ** alpha``."""

    Options = LbtwOptions

    def __init__(self, num_tasks: int, alpha: float = LbtwOptions.alpha,
                 source: Literal["train", "valid"] = LbtwOptions.source) -> None:
        super().__init__(num_tasks, LbtwOptions(float(alpha), source))
        self.needs = Needs(validation=True) if source == "valid" else Needs(train_losses=True)
        self.reference = np.full(self.num_tasks, np.nan)
        self.ratios = np.ones(self.num_tasks)

    def _observe(self, step: int, losses: np.ndarray | None, train_losses: np.ndarray | None,
                 grad_norms: np.ndarray | None) -> None:
        observed = losses if self.options.source == "valid" else train_losses
        assert observed is not None  # ensured by needs
        update_reference(self.reference, observed)
        known = ~np.isnan(observed) & ~np.isnan(self.reference)
        self.ratios[known] = observed[known] / self.reference[known]

    def weights(self) -> np.ndarray:
        raw = np.maximum(self.ratios, 0.0) ** self.options.alpha
        total = raw.sum()
        return raw / total if total > 0 else np.full(self.num_tasks, 1.0 / self.num_tasks)

    def _state(self) -> dict[str, Any]:
        return {"reference": to_json(self.reference), "ratios": to_json(self.ratios)}

    def _load(self, state: dict[str, Any]) -> None:
        self.reference = from_json(state["reference"])
        self.ratios = from_json(state["ratios"])
