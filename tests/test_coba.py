"""CoBa against ``docs/coba.md``: hand-worked numbers and an independent float64 re-implementation."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mftcoder_coba.balancers import CoBa
from mftcoder_coba.balancers.coba import ols_fit


def _softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max())
    return e / e.sum()


def reference_weights(steps: list[int], losses: np.ndarray, initial: np.ndarray, n: int, w: int,
                      tau: float) -> list[np.ndarray]:
    """The spec written out with loops and np.polyfit, recomputing everything from the full history."""
    k = len(initial)
    ratios = losses / initial
    out, slopes, alpha_max = [], [], []
    for u in range(1, len(steps) + 1):
        if u <= w:
            out.append(np.full(k, 1.0 / k))
            continue
        alpha = np.zeros(k)
        for task in range(k):
            points = [(steps[i], ratios[i, task]) for i in range(max(0, u - n), u) if not np.isnan(ratios[i, task])]
            if len(points) >= 2:
                alpha[task] = np.polyfit([p[0] for p in points], [p[1] for p in points], 1)[0]
        slopes.append(alpha)
        alpha_max.append(alpha.max())
        m = len(slopes)
        total = np.abs(alpha).sum()
        rcs = _softmax(k * alpha / total) if total > 0 else np.full(k, 1.0 / k)
        window = min(m, n)
        logits = np.zeros(k)
        for task in range(k):
            own = sum(abs(slopes[j][task]) for j in range(m - window, m))
            logits[task] = -window * alpha[task] / own if own > 0 else 0.0
        acs = _softmax(logits)
        scale = np.abs(alpha_max).sum()
        df_logits = -tau * m * np.array(alpha_max) / scale if scale > 0 else np.zeros(m)
        df = min(1.0, m * _softmax(df_logits)[-1])
        out.append(df * rcs + (1 - df) * acs)
    return out


def _feed(balancer: CoBa, steps: list[int], losses: np.ndarray) -> list[np.ndarray]:
    got = []
    for step, row in zip(steps, losses):
        balancer.observe(step, losses=row)
        got.append(balancer.weights())
    return got


def test_first_update_after_warmup_is_rcs_hand_worked() -> None:
    # K=2, L(0)=[2, 4]; ratios fall by 0.1 and 0.05 per step -> slopes -0.1, -0.05; M=1 so DF=1, w=RCS.
    b = CoBa(num_tasks=2, history_length=200, warmup_steps=2, tau=5.0)
    b.observe(0, losses=[2.0, 4.0])
    weights = _feed(b, [1, 2, 3], np.array([[1.8, 4.0], [1.6, 3.8], [1.4, 3.6]]))
    assert weights[0].tolist() == [0.5, 0.5] and weights[1].tolist() == [0.5, 0.5]  # warm-up
    # RCS = softmax(2 * [-0.1, -0.05] / 0.15) = softmax([-4/3, -2/3])
    expected_first = 1.0 / (1.0 + math.exp(2.0 / 3.0))
    np.testing.assert_allclose(weights[2], [expected_first, 1 - expected_first], rtol=1e-12)
    assert b.divergence_factor() == 1.0


def test_warmup_observations_feed_first_fit_with_real_steps() -> None:
    # update_interval 10: steps 10, 20, 30; the first post-warm-up fit has all three points.
    b = CoBa(num_tasks=2, history_length=200, warmup_steps=2, tau=5.0)
    b.observe(0, losses=[1.0, 1.0])
    got = _feed(b, [10, 20, 30], np.array([[0.9, 0.99], [0.7, 0.98], [0.6, 0.97]]))
    slope0 = np.polyfit([10, 20, 30], [0.9, 0.7, 0.6], 1)[0]  # -0.015
    slope1 = -0.001
    logits = 2 * np.array([slope0, slope1]) / (abs(slope0) + abs(slope1))
    np.testing.assert_allclose(got[-1], _softmax(logits), rtol=1e-12)


def test_df_is_clipped_at_one_when_the_worst_slope_is_the_steepest_so_far() -> None:
    # Accelerating decline: the latest alpha_max is the most negative, so M * softmax(...)[u] > 1.
    b = CoBa(num_tasks=2, history_length=3, warmup_steps=1, tau=5.0)
    b.observe(0, losses=[1.0, 1.0])
    steps = [1, 2, 3, 4]
    losses = np.array([[1 - 0.01 * s * s, 1 - 0.02 * s * s] for s in steps])
    weights = _feed(b, steps, losses)
    m = len(b.alpha_max)
    history = np.array(b.alpha_max)
    unclipped = m * _softmax(-5.0 * m * history / np.abs(history).sum())[-1]
    assert m == 3 and unclipped > 1.0
    assert b.divergence_factor() == 1.0
    alpha = b.slopes[-1]
    rcs = _softmax(2 * alpha / np.abs(alpha).sum())
    np.testing.assert_allclose(weights[-1], rcs, rtol=1e-12)


def test_diverging_task_loses_weight() -> None:
    b = CoBa(num_tasks=3, history_length=10, warmup_steps=5, tau=5.0)
    b.observe(0, losses=[1.0, 1.0, 1.0])
    steps = list(range(1, 41))
    losses = np.array([[0.99 ** s, 0.995 ** s, 0.98 ** s if s <= 20 else 0.98 ** 20 + 0.01 * (s - 20)]
                       for s in steps])
    weights = _feed(b, steps, losses)
    assert weights[19][2] > 0.19  # while task 2 still converges it keeps a share (RCS leads, DF ~ 0.84)
    assert b.divergence_factor() < 0.05  # the worst slope turned positive: ACS leads
    assert max(w[2] for w in weights[-10:]) < 0.07 and weights[-1][2] == min(weights[-1])
    np.testing.assert_allclose(weights, reference_weights(steps, losses, np.ones(3), 10, 5, 5.0), rtol=1e-9)


def test_zero_slopes_give_uniform_weights() -> None:
    b = CoBa(num_tasks=3, history_length=5, warmup_steps=1, tau=5.0)
    b.observe(0, losses=[2.0, 3.0, 4.0])
    for step in range(1, 12):
        b.observe(step, losses=[2.0, 3.0, 4.0])
        np.testing.assert_array_equal(b.weights(), np.full(3, 1 / 3))
    assert b.divergence_factor() == 1.0


def test_nan_observations_are_left_out_of_each_task_fit() -> None:
    rng = np.random.default_rng(0)
    steps = [3 * i for i in range(1, 31)]
    losses = 2.0 + rng.random((30, 3)).cumsum(axis=0) * np.array([-0.02, 0.01, -0.05])
    losses[rng.random((30, 3)) < 0.3] = np.nan
    losses[:, 1][5:29] = np.nan  # task 1 has < 2 points in most windows -> slope 0
    initial = np.array([2.0, 2.5, 3.0])
    b = CoBa(num_tasks=3, history_length=8, warmup_steps=4, tau=5.0)
    b.observe(0, losses=torch.tensor(initial))  # tensors are accepted
    got = _feed(b, steps, losses)
    np.testing.assert_allclose(got, reference_weights(steps, losses, initial, 8, 4, 5.0), rtol=1e-9, atol=1e-15)
    assert all(np.isfinite(w).all() and abs(w.sum() - 1) < 1e-12 for w in got)


def test_matches_reference_on_noisy_curves_with_window_trimming() -> None:
    rng = np.random.default_rng(1)
    steps = list(range(2, 122, 2))
    base = np.stack([np.exp(-0.02 * np.arange(60)), np.exp(-0.005 * np.arange(60)),
                     0.6 + 0.004 * (np.arange(60) - 25) ** 2 / 25], axis=1)
    losses = base * (1 + 0.02 * rng.standard_normal(base.shape))
    initial = np.array([1.1, 1.0, 3.1])
    b = CoBa(num_tasks=3, history_length=7, warmup_steps=6, tau=2.0)
    b.observe(0, losses=initial)
    np.testing.assert_allclose(_feed(b, steps, losses), reference_weights(steps, losses, initial, 7, 6, 2.0),
                               rtol=1e-9, atol=1e-15)


def test_single_task_gets_weight_one() -> None:
    b = CoBa(num_tasks=1, history_length=4, warmup_steps=1, tau=5.0)
    b.observe(0, losses=[3.0])
    for step, loss in enumerate([2.5, 2.0, np.nan, 2.2, 2.9, 3.5], start=1):
        b.observe(step, losses=[loss])
        assert b.weights().tolist() == [1.0]


def test_missing_reference_uses_first_finite_observation() -> None:
    b = CoBa(num_tasks=2, history_length=10, warmup_steps=0, tau=5.0)
    b.observe(0, losses=[2.0, np.nan])
    b.observe(1, losses=[1.8, 4.0])
    b.observe(2, losses=[1.6, 3.0])
    assert b.reference.tolist() == [2.0, 4.0]
    alpha = np.array([-0.1, -0.25])  # ratios 0.9 -> 0.8 and 1.0 -> 0.75 over one step
    np.testing.assert_allclose(b.slopes[-1], alpha, rtol=1e-12)


def test_state_round_trip_continues_identically() -> None:
    rng = np.random.default_rng(2)
    losses = np.abs(2.0 + rng.standard_normal((80, 4)).cumsum(axis=0) * 0.05)
    losses[rng.random(losses.shape) < 0.1] = np.nan
    a = CoBa(num_tasks=4, history_length=12, warmup_steps=8, tau=5.0)
    a.observe(0, losses=[2.0, 2.0, 2.0, 2.0])
    for step in range(1, 41):
        a.observe(step, losses=losses[step - 1])
    b = CoBa(num_tasks=4, history_length=12, warmup_steps=8, tau=5.0)
    b.load_state_dict(json.loads(json.dumps(a.state_dict(), allow_nan=False)))
    np.testing.assert_array_equal(a.weights(), b.weights())
    for step in range(41, 81):
        a.observe(step, losses=losses[step - 1])
        b.observe(step, losses=losses[step - 1])
        np.testing.assert_array_equal(a.weights(), b.weights())
    assert a.state_dict() == b.state_dict()


def test_round_trip_during_warmup_and_before_reference() -> None:
    a = CoBa(num_tasks=2, history_length=5, warmup_steps=3, tau=5.0)
    b = CoBa(num_tasks=2, history_length=5, warmup_steps=3, tau=5.0)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for step, row in enumerate([[2.0, 3.0], [1.9, 2.9], [1.7, 2.9], [1.6, 2.85], [1.4, 2.8], [1.3, 2.8]]):
        a.observe(step, losses=row)
        if step == 2:
            b.load_state_dict(json.loads(json.dumps(a.state_dict())))
        elif step > 2:
            b.observe(step, losses=row)
    np.testing.assert_array_equal(a.weights(), b.weights())


def test_steps_must_increase_and_shapes_are_checked() -> None:
    b = CoBa(num_tasks=2)
    b.observe(0, losses=[1.0, 1.0])
    b.observe(5, losses=[1.0, 1.0])
    with pytest.raises(ValueError, match="increase"):
        b.observe(5, losses=[1.0, 1.0])
    with pytest.raises(ValueError, match="2 values"):
        b.observe(6, losses=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="losses"):
        b.observe(6, train_losses=[1.0, 1.0])


def test_defaults_are_the_spec_defaults() -> None:
    b = CoBa(num_tasks=3)
    assert (b.options.history_length, b.options.warmup_steps, b.options.tau) == (200, 100, 5.0)
    assert b.needs.validation and not b.needs.train_losses
    assert b.weights().dtype == np.float64 and b.weights().shape == (3,)


def test_slope_standard_errors_match_a_textbook_fit() -> None:
    # SE of the OLS slope = sqrt(SSR / (n - 2) / Sxx), from np.polyfit's residuals per task.
    rng = np.random.default_rng(4)
    steps = np.array([2, 4, 6, 8, 10, 12], dtype=np.int64)
    values = np.stack([1 - 0.01 * steps + 0.003 * rng.standard_normal(6), 1 - 0.02 * steps], axis=1)
    values[1, 0] = np.nan  # left out of task 0's fit only
    slopes, errors = ols_fit(steps, values)
    for k in range(2):
        keep = ~np.isnan(values[:, k])
        x, y = steps[keep].astype(float), values[keep, k]
        coef, residuals, *_ = np.polyfit(x, y, 1, full=True)
        expected = math.sqrt((residuals[0] if len(residuals) else 0.0) / (len(x) - 2) / ((x - x.mean()) ** 2).sum())
        assert slopes[k] == pytest.approx(coef[0], rel=1e-12)
        assert errors[k] == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert errors[1] < 1e-12 < errors[0]  # an exact line has no residual
    few = ols_fit(np.array([1, 2]), np.array([[1.0, np.nan], [0.5, 0.7]]))
    assert few[0].tolist() == [-0.5, 0.0] and np.isnan(few[1]).all()  # two points: a slope but no error


def test_diagnostics_report_the_fit_from_the_first_update_and_survive_a_round_trip() -> None:
    b = CoBa(num_tasks=2, history_length=4, warmup_steps=2, tau=5.0)
    assert b.diagnostics() == {}
    b.observe(0, losses=[2.0, 4.0])
    assert b.diagnostics() == {}
    rows = [[1.8, 4.0], [1.7, 3.6], [1.3, 3.4], [1.2, 3.3], [1.0, 3.1]]
    for step, row in enumerate(rows, start=1):
        b.observe(step, losses=row)
        got = b.diagnostics()
        ratios = np.array(rows[max(0, step - 4):step]) / [2.0, 4.0]
        expected = ols_fit(np.arange(max(1, step - 3), step + 1), ratios)
        np.testing.assert_array_equal(got["slope"], expected[0])
        np.testing.assert_array_equal(got["slope_se"], expected[1])
        assert np.isnan(got["slope_se"]).all() == (step < 3)
    np.testing.assert_array_equal(b.diagnostics()["slope"], b.slopes[-1])  # after warm-up: the weights' alpha
    restored = CoBa(num_tasks=2, history_length=4, warmup_steps=2, tau=5.0)
    restored.load_state_dict(json.loads(json.dumps(b.state_dict())))
    for key, value in b.diagnostics().items():
        np.testing.assert_array_equal(restored.diagnostics()[key], value)
