"""What the trainer does about non-finite numbers (``train.nonfinite``): detect, skip a step, or stop.

Why: with ``optim.lr: .inf`` the loss was NaN from step 2, metrics held NaN, an all-NaN checkpoint was
published and the run exited 0. Now a step is checked before it is applied:

- the step's per-task training losses (all-reduced over ranks, so every rank decides alike) and, at ZeRO-0
  with fp32 weights, the global gradient norm (the engine steps PyTorch's optimizer directly there, with no
  check of its own) are checked before ``engine.step()``;
- at ZeRO 1-3 and for bf16 models DeepSpeed 0.19 computes the norm inside ``engine.step()`` and, when it is
  not finite, skips the update itself (no optimizer or LR-schedule step) and reports the norm as inf: the
  trainer reads that norm after the step.

``stop`` raises :class:`TrainingDiverged` (exit status 2 through the CLI) before the step is applied or
saved. ``skip`` runs ``engine.step()`` under :func:`update_disabled` so the engine keeps its own bookkeeping
(gradients cleared, micro-step counters) but neither the weights, the optimizer state nor the LR schedule
move, exactly as DeepSpeed's own skip does. Checkpoints check the trainable weights (:func:`nonfinite_weights`)
before anything is published.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from mftcoder_coba.errors import UserError


class TrainingDiverged(UserError):
    """A non-finite loss, gradient norm or trainable weight stopped the run; nothing of that step was saved."""


def step_problem(sums: np.ndarray, counts: np.ndarray, grad_norm: float | None, tasks: list[str]) -> str | None:
    """What is non-finite in a step's numbers (one phrase), or None: the loss of each task that has loss
    tokens in the step (``sums`` / ``counts`` over all ranks), and the gradient norm where it is known."""
    bad = [task for task, total, count in zip(tasks, sums, counts) if count > 0 and not math.isfinite(total)]
    parts = []
    if bad:
        parts.append(f"non-finite training loss of task(s) {', '.join(bad)}")
    if grad_norm is not None and not math.isfinite(grad_norm):
        parts.append(f"non-finite gradient norm ({grad_norm})")
    return "; ".join(parts) or None


def _inner_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The PyTorch optimizer inside DeepSpeed's wrappers (ZeRO, bf16), whose ``step`` updates the weights."""
    optimizer = engine.optimizer
    while not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


@contextlib.contextmanager
def update_disabled(engine: Any) -> Iterator[None]:
    """An ``engine.step()`` made meanwhile applies nothing: the inner optimizer's and the LR scheduler's
    ``step`` are no-ops (the wrappers around them still clip and clear the gradients and copy their unchanged
    master weights back, so their state stays consistent)."""
    targets = [_inner_optimizer(engine)]
    if engine.lr_scheduler is not None:
        targets.append(engine.lr_scheduler)
    saved = [obj.__dict__.get("step") for obj in targets]  # torch wraps optimizer.step per instance
    for obj in targets:
        obj.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        for obj, old in zip(targets, saved):
            if old is None:
                del obj.step
            else:
                obj.step = old


def nonfinite_weights(engine: Any) -> int:
    """How many trainable weight tensors of this rank hold inf or NaN (its own partitions under ZeRO-3)."""
    flags = []
    for param in engine.module.parameters():
        if not param.requires_grad:
            continue
        tensor = getattr(param, "ds_tensor", None) if hasattr(param, "ds_id") else param
        if tensor is not None and tensor.numel():
            flags.append(~torch.isfinite(tensor.detach()).all())
    return int(torch.stack(flags).sum()) if flags else 0
