"""Stochastic rounding and the bf16 AdamW of ``optim.master_weights: bf16``, against float64 references."""
from __future__ import annotations

import pytest
import torch

from mftcoder_coba.training.bf16_adamw import StochasticRoundingAdamW, stochastic_round_


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and just above each float32 value (equal when x is a bf16 value)."""
    bits = x.view(torch.int32)
    low = (bits & -(1 << 16)).view(torch.float32)
    high = ((bits & -(1 << 16)) + (1 << 16)).view(torch.float32)
    exact = (bits & 0xFFFF) == 0
    high = torch.where(exact, low, high)
    return torch.minimum(low, high), torch.maximum(low, high)


def test_stochastic_round_picks_a_neighbour_and_is_unbiased() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, generator=g) * torch.logspace(-20, 20, 64)
    x[:4] = torch.tensor([1.0, -2.5, 0.0, 3.0]).to(torch.bfloat16).float()  # already bf16: unchanged
    draws = torch.empty(20000, 64, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    for row in draws:
        stochastic_round_(row, x, gen)
    low, high = _neighbours(x)
    values = draws.float()
    assert ((values == low) | (values == high)).all()
    assert torch.equal(values[:, :4], x[:4].expand(20000, 4))
    # Mean error in units of each value's rounding step: unbiased within sampling noise (sd 0.5/sqrt(n)).
    step = (high - low).double().clamp_min(1e-300)
    bias = ((values.double().mean(0) - x.double()) / step)[4:]
    assert bias.abs().max() < 6 * 0.5 / 20000 ** 0.5


def _reference_adamw(w: torch.Tensor, grads: list[torch.Tensor], lr: float, betas: tuple[float, float],
                     eps: float, weight_decay: float) -> torch.Tensor:
    """Decoupled-weight-decay Adam in float64."""
    w, m, v = w.double().clone(), torch.zeros_like(w, dtype=torch.float64), torch.zeros_like(w, dtype=torch.float64)
    for step, grad in enumerate(grads, start=1):
        grad = grad.double()
        m = betas[0] * m + (1 - betas[0]) * grad
        v = betas[1] * v + (1 - betas[1]) * grad * grad
        w = w * (1 - lr * weight_decay) - lr / (1 - betas[0] ** step) * m / ((v / (1 - betas[1] ** step)).sqrt() + eps)
    return w


def test_small_updates_survive_where_round_to_nearest_drops_them() -> None:
    """lr 1e-4 on weights of 1.0: each update is far below half a bf16 step (2^-9), so PyTorch's AdamW on bf16
    weights never moves them; stochastic rounding lands on the float64 trajectory on average."""
    lr, steps = 1e-4, 50
    grads = [torch.ones(8192) for _ in range(steps)]
    want = _reference_adamw(torch.ones(8192), grads, lr, (0.9, 0.999), 1e-8, 0.0)
    results = {}
    for name in ("nearest", "stochastic"):
        w = torch.nn.Parameter(torch.ones(8192, dtype=torch.bfloat16))
        opt = (torch.optim.AdamW([w], lr=lr, weight_decay=0.0) if name == "nearest"
               else StochasticRoundingAdamW([w], lr=lr, weight_decay=0.0, seed=3))
        for grad in grads:
            w.grad = grad.to(torch.bfloat16)
            opt.step()
        results[name] = w.detach().double()
    assert torch.equal(results["nearest"], torch.ones(8192, dtype=torch.float64))
    assert want[0] == pytest.approx(1 - steps * lr, rel=1e-4)
    assert results["stochastic"].mean().item() == pytest.approx(want.mean().item(), abs=1e-4)


def test_follows_float64_adamw_closer_than_round_to_nearest() -> None:
    """Same bf16 start and gradients: stochastic rounding stays unbiased and nearer the float64 trajectory than
    PyTorch's AdamW on bf16 weights (rounding to nearest), and keeps its moments in bf16."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(3, 1000, generator=g).to(torch.bfloat16)
    grads = [torch.randn(3, 1000, generator=g).to(torch.bfloat16) for _ in range(20)]
    settings = {"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.1}
    want = _reference_adamw(w0.float(), grads, eps=1e-8, **settings)
    errors, opts = {}, {}
    for name in ("nearest", "stochastic"):
        w = torch.nn.Parameter(w0.clone())
        opts[name] = (torch.optim.AdamW([w], **settings) if name == "nearest"
                      else StochasticRoundingAdamW([w], chunk_elements=700, **settings))
        for grad in grads:
            w.grad = grad
            opts[name].step()
        errors[name] = w.detach().double() - want
    rms = {name: err.pow(2).mean().sqrt().item() for name, err in errors.items()}
    movement = (want - w0.double()).pow(2).mean().sqrt().item()
    assert rms["stochastic"] < 0.5 * rms["nearest"] and rms["stochastic"] < 0.25 * movement
    assert abs(errors["stochastic"].mean().item()) < 4 * rms["stochastic"] / want.numel() ** 0.5
    state = next(iter(opts["stochastic"].state.values()))
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16 and state["step"] == 20


def test_reproducible_and_resumable_from_its_state_dict() -> None:
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(500, generator=g).to(torch.bfloat16) for _ in range(6)]

    def run(split_at: int | None) -> torch.Tensor:
        w = torch.nn.Parameter(torch.ones(500, dtype=torch.bfloat16))
        opt = StochasticRoundingAdamW([w], lr=1e-3, seed=7)
        for i, grad in enumerate(grads):
            if i == split_at:  # a fresh optimizer from a saved state, as a resumed run builds it
                saved = opt.state_dict()
                opt = StochasticRoundingAdamW([w], lr=1e-3, seed=7)
                opt.load_state_dict(saved)
            w.grad = grad
            opt.step()
        return w.detach().clone()

    assert torch.equal(run(None), run(None))
    assert torch.equal(run(None), run(3))


def test_refuses_non_bf16_parameters() -> None:
    w = torch.nn.Parameter(torch.ones(4))
    w.grad = torch.ones(4)
    with pytest.raises(TypeError, match="bf16 parameters"):
        StochasticRoundingAdamW([w]).step()
