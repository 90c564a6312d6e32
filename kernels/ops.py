"""Custom-op registration and autograd for the per-task cross-entropy kernels.

The Triton kernels are registered with ``torch.library.custom_op`` (namespace ``mftcoder_coba``) together
with fake implementations, so ``torch.compile`` treats each call as one opaque node and CUDA graphs can
capture it: nothing here reads a device value on the host. The PyTorch backend uses the same structure with
plain functions, which the compiler traces like any other PyTorch code.

Autograd: the forward op already returns ``d loss / d logits`` (or, for the linear variant, the gradients of
hidden, weight and bias), so the backward only multiplies them by the upstream gradient, in place, with a
kernel that returns at once when that gradient is exactly 1. The buffers are handed to autograd as the
gradients themselves: a graph through these functions can be backpropagated once (a second backward raises).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import linear_task_ce as _linear
from . import task_ce_torch as _torch_ce

Tensor = torch.Tensor


def _rows_then_reduce(rows_fn, reduce_fn, logits, labels, task_ids, task_scale, ignore_index, grad, logit_scale,
                      softcap):
    """A backend's row pass (writing ``grad`` when given) followed by its per-task reduction."""
    row_ce = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    rows_fn(logits, labels, task_ids, task_scale, ignore_index, row_ce, grad, logit_scale=logit_scale,
            softcap=softcap)
    return reduce_fn(row_ce, labels, task_ids, task_scale, ignore_index, logits.shape[1])


# ---------------------------------------------------------------- Triton custom ops
def _triton_rows_then_reduce(logits, labels, task_ids, task_scale, ignore_index, grad, logit_scale, softcap):
    from . import task_ce_triton

    return _rows_then_reduce(task_ce_triton.task_ce_rows, task_ce_triton.task_reduce, logits, labels, task_ids,
                             task_scale, ignore_index, grad, logit_scale, softcap)


def _fake_stats(task_scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    n_tasks = task_scale.shape[0]
    return (
        task_scale.new_empty((), dtype=torch.float32),
        task_scale.new_empty((n_tasks,), dtype=torch.float32),
        task_scale.new_empty((n_tasks,), dtype=torch.int64),
    )


@torch.library.custom_op("mftcoder_coba::task_ce_stats", mutates_args=())
def _triton_stats(
    logits: Tensor, labels: Tensor, task_ids: Tensor, task_scale: Tensor, ignore_index: int, logit_scale: float,
    softcap: float,
) -> tuple[Tensor, Tensor, Tensor]:
    return _triton_rows_then_reduce(logits, labels, task_ids, task_scale, ignore_index, None, logit_scale, softcap)


@_triton_stats.register_fake
def _(logits, labels, task_ids, task_scale, ignore_index, logit_scale, softcap):
    return _fake_stats(task_scale)


@torch.library.custom_op("mftcoder_coba::task_ce_grad", mutates_args=())
def _triton_grad(
    logits: Tensor, labels: Tensor, task_ids: Tensor, task_scale: Tensor, ignore_index: int, logit_scale: float,
    softcap: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    return (*_triton_rows_then_reduce(logits, labels, task_ids, task_scale, ignore_index, grad, logit_scale, softcap),
            grad)


@_triton_grad.register_fake
def _(logits, labels, task_ids, task_scale, ignore_index, logit_scale, softcap):
    return (*_fake_stats(task_scale), torch.empty_like(logits, memory_format=torch.contiguous_format))


@torch.library.custom_op("mftcoder_coba::task_ce_grad_inplace", mutates_args=("logits",))
def _triton_grad_inplace(
    logits: Tensor, labels: Tensor, task_ids: Tensor, task_scale: Tensor, ignore_index: int, logit_scale: float,
    softcap: float,
) -> tuple[Tensor, Tensor, Tensor]:
    return _triton_rows_then_reduce(logits, labels, task_ids, task_scale, ignore_index, logits, logit_scale, softcap)


@_triton_grad_inplace.register_fake
def _(logits, labels, task_ids, task_scale, ignore_index, logit_scale, softcap):
    return _fake_stats(task_scale)


@torch.library.custom_op("mftcoder_coba::scale_", mutates_args=("x",))
def _triton_scale_(x: Tensor, g: Tensor) -> None:
    from . import task_ce_triton

    task_ce_triton.scale_(x, g)


@_triton_scale_.register_fake
def _(x, g):
    return None


def _fake_linear(hidden, weight, bias, need_dhidden, need_dweight, need_dbias, task_scale):
    return (
        *_fake_stats(task_scale),
        torch.empty_like(hidden) if need_dhidden else hidden.new_empty(0),
        torch.empty_like(weight) if need_dweight else weight.new_empty(0),
        torch.empty_like(bias) if need_dbias and bias is not None else hidden.new_empty(0),
    )


@torch.library.custom_op("mftcoder_coba::linear_task_ce", mutates_args=())
def _triton_linear(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    task_ids: Tensor,
    task_scale: Tensor,
    ignore_index: int,
    need_dhidden: bool,
    need_dweight: bool,
    need_dbias: bool,
    chunk_bytes: int,
    logit_scale: float,
    softcap: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from . import task_ce_triton

    return _linear.linear_task_ce(
        task_ce_triton.task_ce_rows, task_ce_triton.task_reduce, hidden, weight, bias, labels, task_ids, task_scale,
        ignore_index, need_dhidden, need_dweight, need_dbias, chunk_bytes, logit_scale, softcap,
    )


@_triton_linear.register_fake
def _(hidden, weight, bias, labels, task_ids, task_scale, ignore_index, need_dhidden, need_dweight, need_dbias,
      chunk_bytes, logit_scale, softcap):
    return _fake_linear(hidden, weight, bias, need_dhidden, need_dweight, need_dbias, task_scale)


# ---------------------------------------------------------------- PyTorch backend, same signatures
def _torch_stats(logits, labels, task_ids, task_scale, ignore_index, logit_scale, softcap):
    return _rows_then_reduce(_torch_ce.task_ce_rows, _torch_ce.task_reduce, logits, labels, task_ids, task_scale,
                             ignore_index, None, logit_scale, softcap)


def _torch_grad(logits, labels, task_ids, task_scale, ignore_index, logit_scale, softcap):
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    return (*_rows_then_reduce(_torch_ce.task_ce_rows, _torch_ce.task_reduce, logits, labels, task_ids, task_scale,
                               ignore_index, grad, logit_scale, softcap), grad)


def _torch_grad_inplace(logits, labels, task_ids, task_scale, ignore_index, logit_scale, softcap):
    return _rows_then_reduce(_torch_ce.task_ce_rows, _torch_ce.task_reduce, logits, labels, task_ids, task_scale,
                             ignore_index, logits, logit_scale, softcap)


def _torch_linear(hidden, weight, bias, labels, task_ids, task_scale, ignore_index, need_dh, need_dw, need_db,
                  chunk_bytes, logit_scale, softcap):
    return _linear.linear_task_ce(
        _torch_ce.task_ce_rows, _torch_ce.task_reduce, hidden, weight, bias, labels, task_ids, task_scale,
        ignore_index, need_dh, need_dw, need_db, chunk_bytes, logit_scale, softcap,
    )


@dataclass(frozen=True)
class Backend:
    """One implementation of the five operations the public functions are built from."""

    stats: Callable[..., tuple[Tensor, Tensor, Tensor]]
    grad: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]
    grad_inplace: Callable[..., tuple[Tensor, Tensor, Tensor]]
    scale_: Callable[[Tensor, Tensor], None]
    linear: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]]


TRITON = Backend(_triton_stats, _triton_grad, _triton_grad_inplace, _triton_scale_, _triton_linear)
TORCH = Backend(_torch_stats, _torch_grad, _torch_grad_inplace, _torch_ce.scale_, _torch_linear)


# ---------------------------------------------------------------- autograd
def _take_once(ctx) -> None:
    """Guards the one backward a forward-computed gradient buffer supports."""
    if getattr(ctx, "consumed", False):
        raise RuntimeError(
            "task cross-entropy: backward ran twice through the same call; its gradient was computed in the "
            "forward pass and handed to autograd once (call the function again for a second backward)"
        )
    ctx.consumed = True


class TaskCrossEntropy(torch.autograd.Function):
    """loss, sums, counts with the logits' gradient made in forward; ``inplace`` writes it over the logits."""

    @staticmethod
    def forward(ctx, logits, labels, task_ids, task_scale, ignore_index, backend, inplace, logit_scale, softcap):
        if inplace:
            loss, sums, counts = backend.grad_inplace(logits, labels, task_ids, task_scale, ignore_index, logit_scale,
                                                      softcap)
            grad = logits
        else:
            loss, sums, counts, grad = backend.grad(logits, labels, task_ids, task_scale, ignore_index, logit_scale,
                                                    softcap)
        ctx.save_for_backward(grad)
        ctx.backend = backend
        ctx.mark_non_differentiable(sums, counts)
        return loss, sums, counts

    @staticmethod
    def backward(ctx, grad_loss, grad_sums, grad_counts):
        _take_once(ctx)
        (grad,) = ctx.saved_tensors
        ctx.backend.scale_(grad, grad_loss)
        return grad, None, None, None, None, None, None, None, None


class LinearTaskCrossEntropy(torch.autograd.Function):
    """loss, sums, counts of ``hidden @ weight.T + bias``; all gradients made in forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, task_ids, task_scale, ignore_index, backend, chunk_bytes,
                logit_scale, softcap):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_db = bias is not None and ctx.needs_input_grad[2]
        loss, sums, counts, dh, dw, db = backend.linear(
            hidden, weight, bias, labels, task_ids, task_scale, ignore_index, need_dh, need_dw, need_db, chunk_bytes,
            logit_scale, softcap,
        )
        ctx.save_for_backward(dh, dw, db)
        ctx.backend = backend
        ctx.needs = (need_dh, need_dw, need_db)
        ctx.mark_non_differentiable(sums, counts)
        return loss, sums, counts

    @staticmethod
    def backward(ctx, grad_loss, grad_sums, grad_counts):
        _take_once(ctx)
        grads = []
        for needed, buf in zip(ctx.needs, ctx.saved_tensors):
            if needed:
                ctx.backend.scale_(buf, grad_loss)
                grads.append(buf)
            else:
                grads.append(None)
        return (*grads, None, None, None, None, None, None, None, None)
