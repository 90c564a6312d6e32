"""The one feeding protocol (:mod:`mftcoder_coba.balancers.feeding`) that the trainer and ``simulate`` share:
which observations each kind of balancer gets, in which call, at which step, and that nothing is measured
that the balancer does not read."""
from __future__ import annotations

import numpy as np
import pytest

from mftcoder_coba.balancers import Needs, build_balancer
from mftcoder_coba.balancers.feeding import StepObservations, feed_reference, feed_step, is_update


class _Recorder:
    """Stands in for a balancer with the given needs and records every call made on it."""

    name = "recorder"

    def __init__(self, needs: Needs) -> None:
        self.needs = needs
        self.calls: list[tuple] = []

    def observe(self, step: int, **observed: object) -> None:
        self.calls.append(("observe", step, tuple(sorted(observed))))

    def observe_post_step(self, step: int, train_losses: object) -> None:
        self.calls.append(("post_step", step, train_losses))


def _run(needs: Needs, steps: int = 4, interval: int = 2) -> tuple[list[tuple], list[str]]:
    """Feed ``steps`` steps; return the balancer's calls and the measurements taken (by name)."""
    balancer, measured = _Recorder(needs), []

    def measure(what: str):
        return lambda: measured.append(what) or [1.0, 2.0]

    feed_reference(balancer, measure("reference"))
    for step in range(1, steps + 1):
        feed_step(balancer, step, StepObservations(
            train_losses=measure("train"),
            held_out_losses=measure("held_out") if is_update(step, interval) else None,
            grad_norms=measure("grad_norms"), post_step_losses=measure("post_step")))
    return balancer.calls, measured


def test_each_kind_of_balancer_is_fed_by_the_rules_and_nothing_else_is_measured() -> None:
    calls, measured = _run(Needs())
    assert calls == [] and measured == []
    calls, measured = _run(Needs(validation=True))
    assert calls == [("observe", 0, ("losses",)), ("observe", 2, ("losses",)), ("observe", 4, ("losses",))]
    assert measured == ["reference", "held_out", "held_out"]
    calls, measured = _run(Needs(train_losses=True, grad_norms=True))
    assert calls == [("observe", s, ("grad_norms", "train_losses")) for s in (1, 2, 3, 4)]
    assert measured == ["train", "grad_norms"] * 4
    calls, measured = _run(Needs(train_losses=True, post_step_losses=True))
    assert calls == [c for s in (1, 2, 3, 4) for c in (("observe", s, ("train_losses",)),
                                                       ("post_step", s, [1.0, 2.0]))]
    assert measured == ["train", "post_step"] * 4


def test_a_balancer_reading_held_out_and_training_losses_gets_both_in_one_call_on_update_steps() -> None:
    calls, measured = _run(Needs(validation=True, train_losses=True), steps=6, interval=3)
    assert calls == [("observe", 0, ("losses",)), ("observe", 3, ("losses", "train_losses")),
                     ("observe", 6, ("losses", "train_losses"))]
    assert measured == ["reference", "held_out", "train", "held_out", "train"]


def test_a_measurement_the_balancer_needs_but_the_step_lacks_is_one_error() -> None:
    with pytest.raises(ValueError, match="balancer 'recorder' needs grad_norms"):
        feed_step(_Recorder(Needs(train_losses=True, grad_norms=True)), 1,
                  StepObservations(train_losses=lambda: [1.0, 1.0]))
    with pytest.raises(ValueError, match="balancer 'recorder' needs post_step_losses"):
        feed_step(_Recorder(Needs(train_losses=True, post_step_losses=True)), 1,
                  StepObservations(train_losses=lambda: [1.0, 1.0]))


def test_real_balancers_fed_by_the_protocol_match_direct_calls() -> None:
    rng = np.random.default_rng(0)
    losses = rng.uniform(0.5, 2.0, size=(9, 3))
    for name in ("coba", "famo"):
        fed, direct = build_balancer(name, 3), build_balancer(name, 3)
        feed_reference(fed, lambda: losses[0])
        if direct.needs.validation:
            direct.observe(0, losses=losses[0])
        for step in range(1, 9):
            update = is_update(step, 2)
            feed_step(fed, step, StepObservations(train_losses=lambda s=step: losses[s],
                                                  held_out_losses=(lambda s=step: losses[s]) if update else None,
                                                  post_step_losses=lambda s=step: 0.9 * losses[s]))
            if name == "coba" and update:
                direct.observe(step, losses=losses[step])
            if name == "famo":
                direct.observe(step, train_losses=losses[step])
                direct.observe_post_step(step, 0.9 * losses[step])
            np.testing.assert_array_equal(fed.weights(), direct.weights())
        assert fed.state_dict() == direct.state_dict()
