"""Per-task cross-entropy for multitask fine-tuning: the loss, per-task sums and counts, and the gradient,
from one sweep over the logits (or over the LM head, without ever forming the logits).

The public API of ``mftcoder_coba.kernels`` (a folder without ``__init__.py``: see setup.py)::

    loss, task_loss_sum, task_token_count = task_cross_entropy(logits, labels, task_ids, task_scale)
    loss, task_loss_sum, task_token_count = linear_task_cross_entropy(hidden, weight, labels, task_ids,
                                                                      task_scale, bias=None)

``loss = Σ_{i counted} task_scale[task_i] · ce_i`` (float32 scalar, differentiable), ``task_loss_sum[t] =
Σ ce_i`` over task t's counted tokens (float32, no grad), ``task_token_count[t]`` their number (int64, no
grad). A token is counted when its label is not ``ignore_index``. Task ids of ignored tokens are never used,
so padding may carry any task id (``-1`` by this project's data convention).

Modes (keyword-only):

- ``logit_scale=s, softcap=c``: the loss is taken over the model's transformed logits ``z = s * x`` (Cohere's
  ``logit_scale``, Granite's ``1 / logits_scaling``), then ``z = c * tanh(z / c)`` when ``c`` is not 0 or None
  (Gemma 2/3's ``final_logit_softcapping``), applied inside the kernels' tiles; gradients are those of the
  raw logits (or hidden states, weight and bias), as a model's own forward + loss would give.

- ``check=True`` (or the environment variable ``MFTCODER_COBA_CHECK_IDS=1``): before the kernel, raise
  :class:`~mftcoder_coba.errors.UserError` naming the first token whose label is outside ``[0, V)`` or whose
  task id is outside ``[0, T)`` while its label is not ignored. It reads a flag back to the host, so it
  synchronises and breaks ``torch.compile`` graphs: a debugging mode. Unchecked, such tokens are left out
  (ce 0, zero gradient, not counted); no kernel ever reads or writes outside its tensors.
- ``inplace=True`` (``task_cross_entropy`` only): the gradient is written over the logits' own storage, so
  no second (N, V) buffer exists. The logits' values are gone after the call; autograd's version counter
  raises if anything else saved them for its backward. Eager mode; under ``torch.compile`` the compiler may
  copy the logits first, which defeats the purpose.

Under ``torch.no_grad()`` (or when nothing requires grad) the kernels only read: sums and counts, no
gradient written. With gradients the backward is a scale by the upstream gradient, in place, skipped on the
device when that gradient is exactly 1 (so fold constants such as 1/accumulation-steps into ``task_scale``),
and a graph through these functions supports one backward. ``task_scale`` is treated as a constant. The
calls are custom ops without host synchronisation (``torch.compile(fullgraph=True)``, CUDA graphs); under
``torch.compile`` the in-place scale becomes a copy, one extra pass over the gradient, so for full speed
keep the loss outside the compiled region.

``impl``: ``"triton"`` (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``), ``"torch"`` (chunked PyTorch,
any device) or ``"auto"`` (Triton on CUDA, PyTorch otherwise).

This module holds the argument checks, the optional id check, backend choice and the hand-off to the
autograd functions in ``ops``.
"""
from __future__ import annotations

import os

import torch

from mftcoder_coba.errors import UserError

from . import ops
from .linear_task_ce import DEFAULT_CHUNK_BYTES

_IMPLS = ("auto", "triton", "torch")


def _backend(impl: str, device: torch.device) -> ops.Backend:
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if impl == "auto":
        return ops.TRITON if device.type == "cuda" else ops.TORCH
    if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before import for CPU tensors")
    return ops.TRITON if impl == "triton" else ops.TORCH


def _checking(check: bool | None) -> bool:
    return os.environ.get("MFTCODER_COBA_CHECK_IDS", "0") == "1" if check is None else check


def _check_ids(labels: torch.Tensor, task_ids: torch.Tensor, n_vocab: int, n_tasks: int, ignore_index: int) -> None:
    live = labels != ignore_index
    bad = live & ((labels < 0) | (labels >= n_vocab) | (task_ids < 0) | (task_ids >= n_tasks))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        label, task = int(labels[i]), int(task_ids[i])
        what = (
            f"label {label} is outside the vocabulary [0, {n_vocab})"
            if not 0 <= label < n_vocab
            else f"task id {task} is outside [0, {n_tasks}) (task_scale has {n_tasks} entries)"
        )
        raise UserError(f"task cross-entropy: token {i}: {what}; {int(bad.sum())} such token(s) in this batch")


def _tensor(name: str, value: object, kind: str) -> torch.Tensor:
    """``value`` as given if it is a tensor of ``kind`` (``"float"`` or ``"int"``), else one line naming it."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of {kind} dtype, got {type(value).__name__}")
    is_int = not value.is_floating_point() and not value.is_complex() and value.dtype != torch.bool
    if (kind == "float" and not value.is_floating_point()) or (kind == "int" and not is_int):
        article = "a floating" if kind == "float" else "an integer"
        raise ValueError(f"{name} must be {article} tensor, got {value.dtype}")
    return value


def _nonempty_vocab(n_vocab: int, what: str) -> None:
    if n_vocab == 0:
        raise ValueError(f"{what} has a vocabulary of size 0: there is no class to take a cross-entropy over")


def _transform_args(logit_scale: float, softcap: float | None) -> tuple[float, float]:
    """``(logit_scale, softcap)`` as the kernels take them (softcap 0 = none); one line for a bad value."""
    if not isinstance(logit_scale, (int, float)) or not 0 < float(logit_scale) < float("inf"):
        raise ValueError(f"logit_scale must be a finite number > 0, got {logit_scale!r}")
    if softcap is not None and (not isinstance(softcap, (int, float)) or not 0 <= float(softcap) < float("inf")):
        raise ValueError(f"softcap must be None or a finite number >= 0, got {softcap!r}")
    return float(logit_scale), float(softcap or 0.0)


def _prepare_ids(labels, task_ids, task_scale, n_rows: int, device: torch.device):
    _tensor("labels", labels, "int")
    _tensor("task_ids", task_ids, "int")
    _tensor("task_scale", task_scale, "float")
    if labels.dim() != 1 or labels.shape[0] != n_rows or task_ids.shape != labels.shape:
        raise ValueError(
            f"labels and task_ids must be ({n_rows},), got {tuple(labels.shape)} and {tuple(task_ids.shape)}"
        )
    if task_scale.dim() != 1 or task_scale.numel() == 0:
        raise ValueError(f"task_scale must be a non-empty (T,) tensor, got {tuple(task_scale.shape)}")
    return (
        labels.to(device).contiguous(),
        task_ids.to(device).contiguous(),
        task_scale.detach().to(device=device, dtype=torch.float32).contiguous(),
    )


def task_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    task_ids: torch.Tensor,
    task_scale: torch.Tensor,
    ignore_index: int = -100,
    impl: str = "auto",
    *,
    inplace: bool = False,
    check: bool | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-task cross-entropy over (N, V) logits; see the module docstring for the outputs and modes."""
    if _tensor("logits", logits, "float").dim() != 2:
        raise ValueError(f"logits must be a floating (N, V) tensor, got {logits.dtype} {tuple(logits.shape)}")
    _nonempty_vocab(logits.shape[1], "logits")
    backend = _backend(impl, logits.device)
    logit_scale, softcap = _transform_args(logit_scale, softcap)
    labels, task_ids, task_scale = _prepare_ids(labels, task_ids, task_scale, logits.shape[0], logits.device)
    if _checking(check):
        _check_ids(labels, task_ids, logits.shape[1], task_scale.numel(), ignore_index)
    if logits.stride(-1) != 1:
        if inplace:
            raise ValueError("inplace=True needs logits whose rows are contiguous (stride(-1) == 1)")
        logits = logits.contiguous()
    if torch.is_grad_enabled() and logits.requires_grad:
        return ops.TaskCrossEntropy.apply(logits, labels, task_ids, task_scale, ignore_index, backend, inplace,
                                          logit_scale, softcap)
    return backend.stats(logits.detach(), labels, task_ids, task_scale, ignore_index, logit_scale, softcap)


def linear_task_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    task_ids: torch.Tensor,
    task_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    impl: str = "auto",
    *,
    check: bool | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-task cross-entropy of ``hidden @ weight.T + bias`` without forming the (N, V) logits.

    Works through row chunks of at most ``chunk_bytes`` of logits (the only large temporary); gradients for
    hidden, weight and bias (whichever require grad) are accumulated in the forward pass.
    """
    _tensor("hidden", hidden, "float")
    _tensor("weight", weight, "float")
    if bias is not None:
        _tensor("bias", bias, "float")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (N, H) and weight (V, H) expected, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise ValueError(f"hidden, weight and bias must share a dtype, got {hidden.dtype}, {weight.dtype}"
                         f"{'' if bias is None else ', ' + str(bias.dtype)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    _nonempty_vocab(weight.shape[0], "weight")
    backend = _backend(impl, hidden.device)
    logit_scale, softcap = _transform_args(logit_scale, softcap)
    labels, task_ids, task_scale = _prepare_ids(labels, task_ids, task_scale, hidden.shape[0], hidden.device)
    if _checking(check):
        _check_ids(labels, task_ids, weight.shape[0], task_scale.numel(), ignore_index)
    params = (hidden, weight) if bias is None else (hidden, weight, bias)
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        return ops.LinearTaskCrossEntropy.apply(
            hidden, weight, bias, labels, task_ids, task_scale, ignore_index, backend, chunk_bytes, logit_scale, softcap
        )
    loss, sums, counts, *_ = backend.linear(
        hidden.detach(), weight.detach(), None if bias is None else bias.detach(), labels, task_ids, task_scale,
        ignore_index, False, False, False, chunk_bytes, logit_scale, softcap,
    )
    return loss, sums, counts
