"""How a balancer is fed: which observations go into which call at which step, in one place.

The trainer (:mod:`mftcoder_coba.training.trainer`) and the synthetic problem of :mod:`.simulate` measure
different things in different ways, but feed every balancer by the same rules, so what ``simulate`` shows
is what a training run does. They hand over their measurements as callables that this module calls only
when the balancer's :class:`~mftcoder_coba.balancers.base.Needs` ask for them, so no run pays for a
measurement its balancer does not read (FAMO's extra forward pass, GradNorm's per-task norms).

The rules (step ``s`` counts optimizer steps from 1; an *update* step is every ``update_interval``-th):

- before step 1, a balancer that reads held-out loss gets ``observe(0, losses=L(0))``;
- after step ``s``, ``observe(s, ...)`` with every observation it needs, in one call: a balancer that reads
  held-out loss is observed on update steps only (then with its training losses and norms too, if it also
  needs those), any other balancer that needs training losses or gradient norms on every step;
- then, on every step, ``observe_post_step(s, ...)`` for a balancer that needs the post-step losses.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mftcoder_coba.balancers.base import Balancer

Measure = Callable[[], Any]
"""A measurement of K per-task values (list, array or tensor), taken when called."""


@dataclass(frozen=True)
class StepObservations:
    """Where the observations of one optimizer step come from; each is called at most once."""

    train_losses: Measure
    """Per-task token-mean training loss of the step's global batch, at the parameters the step started from."""
    held_out_losses: Measure | None = None
    """Per-task held-out loss after the step; ``None`` on steps that are not update steps."""
    grad_norms: Measure | None = None
    """Per-task gradient norm of each unweighted task loss at the last shared layer (``Needs.grad_norms``)."""
    post_step_losses: Measure | None = None
    """The step's batch re-evaluated at the updated parameters (``Needs.post_step_losses``)."""


def is_update(step: int, update_interval: int) -> bool:
    """Whether optimizer step ``step`` ends an update interval (held-out losses are measured after it)."""
    return step % update_interval == 0


def feed_reference(balancer: Balancer, held_out_losses: Measure) -> None:
    """Before step 1: the reference losses L(0), for a balancer that reads held-out loss."""
    if balancer.needs.validation:
        balancer.observe(0, losses=held_out_losses())


def feed_step(balancer: Balancer, step: int, observations: StepObservations) -> None:
    """After optimizer step ``step``: everything the balancer needs from it, by the module's rules."""
    needs = balancer.needs
    if needs.validation and observations.held_out_losses is None:
        observed: dict[str, Any] | None = None  # not an update step: nothing to observe until the next one
    else:
        observed = {}
        if needs.validation:
            observed["losses"] = observations.held_out_losses()
        if needs.train_losses:
            observed["train_losses"] = observations.train_losses()
        if needs.grad_norms:
            observed["grad_norms"] = _required(observations.grad_norms, "grad_norms", balancer)()
    if observed:
        balancer.observe(step, **observed)
    if needs.post_step_losses:
        balancer.observe_post_step(step, _required(observations.post_step_losses, "post_step_losses", balancer)())


def _required(measure: Measure | None, what: str, balancer: Balancer) -> Measure:
    if measure is None:
        raise ValueError(f"balancer '{balancer.name}' needs {what}, and this step's observations give none")
    return measure
