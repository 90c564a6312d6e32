"""AdamW on bf16 weights and bf16 moments with stochastic rounding: the optimizer of ``master_weights: bf16``.

Why: bf16 keeps 8 significant bits, so round-to-nearest drops any update smaller than half a weight's
rounding step (2^-9 to 2^-8 of its magnitude). At fine-tuning learning rates most AdamW updates are that small, and
plain bf16 weights simply stop moving. Stochastic rounding rounds up with probability equal to the remainder's
share of the step, so every update survives in expectation (E[round(x)] = x) and training with 6 bytes of
optimizer state per parameter follows fp32-master training closely instead of stalling.

The arithmetic is float32, chunk by chunk, so its temporaries stay small next to a flat multi-GB ZeRO
partition. The random bits come from a generator seeded by (seed, step, parameter), so a run is reproducible
and a resumed run draws exactly what the uninterrupted one would.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

_LOW_BITS_MASK = -(1 << 16)  # int32 with the 16 low bits clear: a float32 pattern that is exactly a bf16 value


def stochastic_round_(out: torch.Tensor, x: torch.Tensor, generator: torch.Generator) -> None:
    """Write float32 ``x`` into bf16 ``out``, rounding up with probability (remainder / rounding step).

    Adding uniform random 16-bit integers to the float32 bit pattern and clearing the low 16 bits carries into
    the kept bits exactly that often; the sign-magnitude layout makes it symmetric for negative values.
    Finite inputs never overflow the int32 addition; the largest finite values may round up to infinity."""
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = (x.view(torch.int32) + noise).bitwise_and_(_LOW_BITS_MASK)
    out.copy_(rounded.view(torch.float32))  # exact: the value is representable in bf16


class StochasticRoundingAdamW(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam for bf16 parameters; moments kept in bf16; every write rounded stochastically."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, seed: int = 0, chunk_elements: int = 1 << 24) -> None:
        if lr <= 0 or eps <= 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas) or chunk_elements < 1:
            raise ValueError(f"invalid AdamW settings: lr={lr} betas={betas} eps={eps} weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.seed = seed
        self.chunk_elements = chunk_elements
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device, step: int, group: int, index: int) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        # Distinct, reproducible streams per (seed, step, parameter); the constants just spread the fields apart.
        gen.manual_seed((self.seed * 0x9E3779B1 + step * 0x85EBCA77 + group * 0xC2B2AE3D + index) % (1 << 63))
        return gen

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g_index, group in enumerate(self.param_groups):
            beta1, beta2 = group["betas"]
            for p_index, param in enumerate(group["params"]):
                if param.grad is None:
                    continue
                if param.dtype != torch.bfloat16:
                    raise TypeError(f"StochasticRoundingAdamW updates bf16 parameters, got {param.dtype}")
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1
                step = state["step"]
                gen = self._generator(param.device, step, g_index, p_index)
                step_size = group["lr"] / (1 - beta1 ** step)
                bias2 = 1 - beta2 ** step
                decay = 1 - group["lr"] * group["weight_decay"]
                chunks = zip(*(t.view(-1).split(self.chunk_elements)
                               for t in (param, param.grad, state["exp_avg"], state["exp_avg_sq"])))
                for w16, g16, m16, v16 in chunks:
                    grad = g16.float()
                    m = m16.float().mul_(beta1).add_(grad, alpha=1 - beta1)
                    v = v16.float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    denom = (v / bias2).sqrt_().add_(group["eps"])
                    w = w16.float().mul_(decay).addcdiv_(m, denom, value=-step_size)
                    stochastic_round_(w16, w, gen)
                    stochastic_round_(m16, m, gen)
                    stochastic_round_(v16, v, gen)
        return loss
