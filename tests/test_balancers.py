"""The baselines against their formulas (torch float64 references for the learned ones), the registry and
its config errors, NaN robustness and state round-trips of every balancer."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mftcoder_coba.balancers import (
    BALANCERS,
    DWA,
    FAMO,
    LBTW,
    Balancer,
    GradNorm,
    Needs,
    Static,
    Uncertainty,
    Uniform,
    build_balancer,
)
from mftcoder_coba.balancers.adam import Adam
from mftcoder_coba.errors import ConfigError

OPTIONS = {"static": {"weights": [1.0, 2.0, 3.0]}, "coba": {"history_length": 4, "warmup_steps": 2},
           "dwa": {"window": 2}}


def _feed_step(b: Balancer, step: int, rng: np.random.Generator, nan_rate: float = 0.0) -> None:
    """One step of whatever ``b.needs`` asks for, with random positive values and some NaN/inf."""
    def vec() -> np.ndarray:
        v = rng.uniform(0.2, 3.0, b.num_tasks)
        v[rng.random(b.num_tasks) < nan_rate] = np.nan
        if rng.random() < nan_rate:
            v[rng.integers(b.num_tasks)] = np.inf
        return v
    if b.needs.validation:
        b.observe(step, losses=vec())
    if b.needs.train_losses:
        b.observe(step, train_losses=vec(), grad_norms=vec() if b.needs.grad_norms else None)
    if b.needs.post_step_losses:
        b.observe_post_step(step, vec())


def test_adam_matches_torch_adam_with_l2_weight_decay() -> None:
    rng = np.random.default_rng(0)
    param = torch.tensor(rng.standard_normal(4), dtype=torch.float64, requires_grad=True)
    reference = torch.optim.Adam([param], lr=0.025, weight_decay=0.01)
    ours, value = Adam(4, lr=0.025, weight_decay=0.01), param.detach().numpy().copy()
    for _ in range(25):
        grad = rng.standard_normal(4)
        param.grad = torch.tensor(grad)
        reference.step()
        value = ours.step(value, grad)
    np.testing.assert_allclose(value, param.detach().numpy(), rtol=1e-13, atol=1e-15)


def test_uniform_and_static() -> None:
    assert Uniform(4).weights().tolist() == [0.25] * 4
    np.testing.assert_allclose(Static(3, weights=[1, 0, 3]).weights(), [0.25, 0.0, 0.75], rtol=1e-15)
    assert Uniform(2).needs == Needs() and Static(1, weights=[2.0]).weights().tolist() == [1.0]


@pytest.mark.parametrize("source", ["train", "valid"])
def test_lbtw_square_root_of_loss_ratios(source: str) -> None:
    b = LBTW(3, alpha=0.5, source=source)
    feed = (lambda s, v: b.observe(s, losses=v)) if source == "valid" else (lambda s, v: b.observe(s, train_losses=v))
    assert b.needs == (Needs(validation=True) if source == "valid" else Needs(train_losses=True))
    feed(0 if source == "valid" else 1, [2.0, 4.0, np.nan])  # L(0) of tasks 0, 1; task 2 not seen yet
    np.testing.assert_array_equal(b.weights(), np.full(3, 1 / 3))
    feed(2, [1.0, 3.0, 5.0])  # ratios 0.5, 0.75; task 2's reference is 5 -> ratio 1
    expected = np.sqrt([0.5, 0.75, 1.0])
    np.testing.assert_allclose(b.weights(), expected / expected.sum(), rtol=1e-14)
    feed(3, [np.nan, 2.0, 2.5])  # task 0 keeps its ratio 0.5
    expected = np.sqrt([0.5, 0.5, 0.5])
    np.testing.assert_allclose(b.weights(), expected / expected.sum(), rtol=1e-14)


def test_dwa_windowed_ratios_temperature_two() -> None:
    b = DWA(2, temperature=2.0, window=2)
    rows = [[1.0, 2.0], [3.0, 2.0], [1.0, 1.8], [1.0, 2.2], [0.5, np.nan]]
    for step, row in enumerate(rows[:3], start=1):
        b.observe(step, train_losses=row)
        np.testing.assert_array_equal(b.weights(), [0.5, 0.5])  # fewer than 2 windows yet
    b.observe(4, train_losses=rows[3])
    ratios = np.array([(1.0 + 1.0) / (1.0 + 3.0), (1.8 + 2.2) / (2.0 + 2.0)])  # [0.5, 1.0]
    e = np.exp(ratios / 2.0)
    np.testing.assert_allclose(b.weights(), e / e.sum(), rtol=1e-14)
    b.observe(5, train_losses=rows[4])  # windows slide: [3, 1] -> [1, 0.5]; task 1: [2, 1.8] -> [2.2] (NaN out)
    ratios = np.array([(1.0 + 0.5) / (3.0 + 1.0), 2.2 / ((2.0 + 1.8) / 2)])
    e = np.exp(ratios / 2.0)
    np.testing.assert_allclose(b.weights(), e / e.sum(), rtol=1e-14)


def test_famo_follows_the_reference_update() -> None:
    """The FAMO code's update (softmax VJP with grad_outputs = log-loss decrease, torch Adam lr 0.025 wd 0.01)."""
    rng = np.random.default_rng(3)
    logits = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.025, weight_decay=0.01)
    b = FAMO(3)
    assert b.needs == Needs(train_losses=True, post_step_losses=True)
    for step in range(1, 21):
        before = rng.uniform(0.5, 2.0, 3)
        after = before * rng.uniform(0.8, 1.05, 3)
        b.observe(step, train_losses=before)
        b.observe_post_step(step, after)
        delta = torch.log(torch.tensor(before) + 1e-8) - torch.log(torch.tensor(after) + 1e-8)
        grad = torch.autograd.grad(torch.softmax(logits, -1), logits, grad_outputs=delta)[0]
        opt.zero_grad()
        logits.grad = grad
        opt.step()
        z = torch.softmax(logits.detach(), -1).numpy() / (after + 1e-8)
        np.testing.assert_allclose(b.logits, logits.detach().numpy(), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(b.weights(), z / z.sum(), rtol=1e-12)


def test_famo_absent_task_gets_no_gradient_and_keeps_its_loss() -> None:
    b = FAMO(3, weight_decay=0.0)
    b.observe(1, train_losses=[1.0, 2.0, np.nan])
    b.observe_post_step(1, [0.5, 1.9, np.nan])
    assert b.logits[2] == 0.0 and b.logits[0] < 0 < b.logits[1]  # task 0 improved most: less weight
    assert np.isfinite(b.weights()).all()
    b.observe(2, train_losses=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="must follow"):
        b.observe_post_step(3, [1.0, 2.0, 3.0])


def test_uncertainty_matches_torch_on_the_kendall_objective() -> None:
    rng = np.random.default_rng(4)
    s = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([s], lr=0.01)
    b = Uncertainty(3)
    for step in range(1, 31):
        losses = rng.uniform(0.3, 3.0, 3)
        b.observe(step, train_losses=losses)
        opt.zero_grad()
        (torch.exp(-s) * torch.tensor(losses) + s).sum().backward()
        opt.step()
        np.testing.assert_allclose(b.weights(), torch.exp(-s.detach()).numpy(), rtol=1e-13)
    momentum = b.optimizer.exp_avg.copy()
    b.observe(31, train_losses=[np.nan, 1.0, 1.0])
    assert b.optimizer.exp_avg[0] == pytest.approx(0.9 * momentum[0], rel=1e-15)  # absent task: zero gradient


def test_gradnorm_matches_torch_on_the_paper_objective() -> None:
    rng = np.random.default_rng(5)
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.025)
    b = GradNorm(3, alpha=1.5)
    initial = None
    for step in range(1, 21):
        losses = rng.uniform(0.5, 2.0, 3)
        norms = rng.uniform(0.1, 1.0, 3)
        b.observe(step, train_losses=losses, grad_norms=norms)
        initial = losses if initial is None else initial
        g = w * torch.tensor(norms)
        rates = torch.tensor(losses / initial)
        target = (g.mean() * (rates / rates.mean()) ** 1.5).detach()
        opt.zero_grad()
        (g - target).abs().sum().backward()
        opt.step()
        with torch.no_grad():
            w.clamp_(min=1e-3)
            w.mul_(3 / w.sum())
        np.testing.assert_allclose(b.weights(), w.detach().numpy() / 3, rtol=1e-12)
    assert b.needs == Needs(train_losses=True, grad_norms=True)


@pytest.mark.parametrize("name", sorted(BALANCERS))
def test_nan_and_inf_observations_never_make_nan_weights(name: str) -> None:
    rng = np.random.default_rng(6)
    b = build_balancer(name, 3, OPTIONS.get(name, {}))
    for step in range(0, 40):
        if step == 0 and not b.needs.validation:
            continue
        _feed_step(b, step, rng, nan_rate=0.4)
        w = b.weights()
        assert w.dtype == np.float64 and w.shape == (3,) and np.isfinite(w).all() and (w >= 0).all()
        if name != "uncertainty":
            assert abs(w.sum() - 1.0) < 1e-12
    b.observe(100, losses=[np.nan] * 3, train_losses=[np.nan] * 3, grad_norms=[np.nan] * 3)
    assert np.isfinite(b.weights()).all()


@pytest.mark.parametrize("name", sorted(BALANCERS))
def test_state_round_trip_continues_identically(name: str) -> None:
    rng_a = np.random.default_rng(7)
    a = build_balancer(name, 3, OPTIONS.get(name, {}))
    for step in range(1, 16):
        _feed_step(a, step, rng_a, nan_rate=0.2)
    b = build_balancer(name, 3, OPTIONS.get(name, {}))
    b.load_state_dict(json.loads(json.dumps(a.state_dict(), allow_nan=False)))
    rng_b = np.random.default_rng()
    rng_b.bit_generator.state = rng_a.bit_generator.state
    for step in range(16, 30):
        _feed_step(a, step, rng_a, nan_rate=0.2)
        _feed_step(b, step, rng_b, nan_rate=0.2)
        np.testing.assert_array_equal(a.weights(), b.weights())
    assert a.state_dict() == b.state_dict()


def test_loading_another_balancers_state_names_the_field() -> None:
    with pytest.raises(ConfigError, match="'balancer.name'"):
        Uniform(3).load_state_dict(DWA(3).state_dict())
    with pytest.raises(ConfigError, match="3 tasks"):
        DWA(2).load_state_dict(DWA(3).state_dict())


@pytest.mark.parametrize(("name", "options", "field"), [
    ("cobaa", {}, "balancer.name"),
    ("coba", {"history": 3}, "balancer.options.history"),
    ("coba", {"history_length": "long"}, "balancer.options.history_length"),
    ("coba", {"history_length": 1}, "balancer.options.history_length"),
    ("coba", {"warmup_steps": -1}, "balancer.options.warmup_steps"),
    ("coba", {"tau": -1.0}, "balancer.options.tau"),
    ("static", {}, "balancer.options.weights"),
    ("static", {"weights": [1.0, 2.0]}, "balancer.options.weights"),
    ("static", {"weights": [0.0, 0.0, 0.0]}, "balancer.options.weights"),
    ("static", {"weights": [1.0, -1.0, 1.0]}, "balancer.options.weights"),
    ("lbtw", {"source": "test"}, "balancer.options.source"),
    ("lbtw", {"alpha": -0.5}, "balancer.options.alpha"),
    ("dwa", {"window": 0}, "balancer.options.window"),
    ("dwa", {"temperature": 0}, "balancer.options.temperature"),
    ("famo", {"lr": 0}, "balancer.options.lr"),
    ("uncertainty", {"lr": "fast"}, "balancer.options.lr"),
    ("gradnorm", {"alpha": float("nan")}, "balancer.options.alpha"),
    ("uniform", {"anything": 1}, "balancer.options.anything"),
])
def test_build_balancer_errors_name_the_field(name: str, options: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"'{field}'"):
        build_balancer(name, 3, options)


def test_option_ranges_are_declared_on_the_fields_and_hold_for_balancers_built_directly() -> None:
    """The ranges live on the Options fields (config_io.bounded): a balancer built in Python, past the config
    loader, is held to them too, inf included."""
    with pytest.raises(ConfigError, match=r"^config field 'balancer.options.lr': must be > 0, got 0.0$"):
        FAMO(3, lr=0)
    with pytest.raises(ConfigError, match=r"^config field 'balancer.options.temperature': must be > 0, got inf$"):
        DWA(3, temperature=float("inf"))
    with pytest.raises(ConfigError, match=r"^config field 'balancer.options.history_length': must be >= 2, got 1$"):
        build_balancer("coba", 3, {"history_length": 1})
    with pytest.raises(ConfigError, match=r"'balancer.options.init_log_variance': must be a finite number"):
        Uncertainty(3, init_log_variance=float("nan"))


def test_build_balancer_applies_options_and_registry_is_complete() -> None:
    assert set(BALANCERS) == {"coba", "uniform", "static", "lbtw", "famo", "dwa", "uncertainty", "gradnorm"}
    b = build_balancer("coba", 2, {"history_length": 50, "warmup_steps": 0, "tau": "2.5"})
    assert (b.options.history_length, b.options.warmup_steps, b.options.tau) == (50, 0, 2.5)
    assert build_balancer("lbtw", 2, {"source": "valid"}).needs == Needs(validation=True)
    assert build_balancer("famo", 2, None).options.lr == 0.025


def test_observe_checks_what_it_is_fed() -> None:
    with pytest.raises(ValueError, match="grad_norms"):
        GradNorm(2).observe(1, train_losses=[1.0, 1.0])
    with pytest.raises(ValueError, match="post-step"):
        DWA(2).observe_post_step(1, [1.0, 1.0])
    with pytest.raises(ValueError, match="2 values"):
        DWA(2).observe(1, train_losses=np.ones((2, 2)))
    with pytest.raises(ValueError, match="positive integer"):
        Uniform(0)
    Uniform(2).observe(1, losses=[1.0, 2.0])  # observations a method does not need are accepted


@pytest.mark.parametrize("name", sorted(BALANCERS))
def test_negative_losses_are_refused(name: str) -> None:
    b = build_balancer(name, 2, {"weights": [1.0, 2.0]} if name == "static" else OPTIONS.get(name, {}))
    with pytest.raises(ValueError, match=rf"balancer '{name}': losses must be >= 0 .* got -0.5 for task 1"):
        b.observe(1, losses=[1.0, -0.5], train_losses=[1.0, 1.0], grad_norms=[1.0, 1.0])
    with pytest.raises(ValueError, match="train_losses must be >= 0"):
        b.observe(1, losses=[1.0, 1.0], train_losses=[-1e-3, 1.0], grad_norms=[1.0, 1.0])
    b.observe(1, losses=[1.0, np.nan], train_losses=[-np.inf, 1.0], grad_norms=[1.0, 1.0])  # non-finite: unmeasured
