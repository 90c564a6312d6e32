"""Pure-PyTorch per-task cross-entropy: the chunked path used on CPU, and the float64 reference for tests.

The chunked path has the same contract as the Triton kernels in ``task_ce_triton.py`` (per-row losses and the
gradient written in the forward pass, then per-task sums) but works through a few rows at a time, so the only
float32 temporary is one chunk (``chunk_bytes``), never a full float32 copy of the logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_BYTES = 64 * 2**20


def counted(labels: torch.Tensor, task_ids: torch.Tensor, n_vocab: int, n_tasks: int,
            ignore_index: int) -> torch.Tensor:
    """Tokens that carry loss: label not ignored and inside the vocabulary, task id inside ``[0, T)``."""
    return (labels != ignore_index) & (labels >= 0) & (labels < n_vocab) & (task_ids >= 0) & (task_ids < n_tasks)


def task_ce_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    task_ids: torch.Tensor,
    task_scale: torch.Tensor,
    ignore_index: int,
    row_ce: torch.Tensor,
    grad: torch.Tensor | None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    *,
    logit_scale: float = 1.0,
    softcap: float = 0.0,
) -> None:
    """Same contract as ``task_ce_triton.task_ce_rows``: per-row ce into ``row_ce`` (0 where not counted),
    ``task_scale[t] * (softmax - onehot)`` into ``grad`` when given (``grad`` may be ``logits``), of the
    transformed logits ``z`` (:func:`transform_logits`), the gradient taken with respect to the raw ones."""
    n_rows, n_vocab = logits.shape
    n_tasks = task_scale.numel()
    rows_per_chunk = max(1, chunk_bytes // (4 * max(n_vocab, 1)))
    for start in range(0, n_rows, rows_per_chunk):
        stop = min(start + rows_per_chunk, n_rows)
        x = logits[start:stop].to(torch.float32, copy=True)
        dz = None
        if logit_scale != 1.0 or softcap:
            x, dz = transform_logits(x, logit_scale, softcap)
        label = labels[start:stop]
        task = task_ids[start:stop]
        valid = counted(label, task, n_vocab, n_tasks, ignore_index)
        safe_label = torch.where(valid, label, 0).long().unsqueeze(1)
        # shift by the row max (0 for a row of -inf only) and keep ce = (m - x_label) + log d: storing
        # lse = m + log d and subtracting loses log d's digits when the logits are large
        m = x.amax(dim=1, keepdim=True)
        x.sub_(m.masked_fill_(m == float("-inf"), 0.0))
        log_d = x.exp().sum(dim=1, keepdim=True).log_()
        shifted_label = x.gather(1, safe_label)
        row_ce[start:stop] = torch.where(valid, (log_d - shifted_label).squeeze(1), 0.0)
        if grad is None:
            continue
        coef = torch.where(valid, task_scale.float()[torch.where(valid, task, 0).long()], 0.0).unsqueeze(1)
        log_d.masked_fill_(~valid.unsqueeze(1), 0.0)  # d may be 0 in an ignored row: -inf - -inf is NaN
        # true-class entry in float32 before the one rounding: (p - 1) * coef
        label_grad = (torch.exp(shifted_label - log_d) - 1.0) * coef
        x.sub_(log_d).exp_().mul_(coef)
        x.scatter_(1, safe_label, label_grad)
        if dz is not None:
            x.mul_(dz)
        grad[start:stop] = x


def transform_logits(x: torch.Tensor, logit_scale: float, softcap: float) -> tuple[torch.Tensor, torch.Tensor | float]:
    """``(z, dz/dx)`` of a model's logit transform: ``z = logit_scale * x``, then ``softcap * tanh(z / softcap)``
    when ``softcap`` is not 0. Works in float64 too (the test reference)."""
    z = x * logit_scale
    if not softcap:
        return z, logit_scale
    # tanh and 1 - tanh**2 from t = exp(-2|y|): 1 - tanh**2 = 4t / (1 + t)**2 keeps its digits where tanh
    # saturates (1 - th * th cancels there)
    y = z / softcap
    t = torch.exp(-2.0 * y.abs())
    th = torch.copysign((1.0 - t) / (1.0 + t), y)
    return th * softcap, logit_scale * 4.0 * t / (1.0 + t) ** 2


def task_reduce(
    row_ce: torch.Tensor,
    labels: torch.Tensor,
    task_ids: torch.Tensor,
    task_scale: torch.Tensor,
    ignore_index: int,
    n_vocab: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, per-task sums, per-task counts) from per-row losses."""
    n_tasks = task_scale.numel()
    valid = counted(labels, task_ids, n_vocab, n_tasks, ignore_index)
    safe_task = torch.where(valid, task_ids, 0).long()
    sums = torch.zeros(n_tasks, dtype=torch.float32, device=row_ce.device).index_add_(0, safe_task, row_ce)
    counts = torch.zeros(n_tasks, dtype=torch.int64, device=row_ce.device).index_add_(0, safe_task, valid.long())
    loss = (task_scale.float() * sums).sum()
    return loss, sums, counts


def scale_(x: torch.Tensor, g: torch.Tensor, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
    """``x *= g`` in place, the product taken in float32 and rounded once, a chunk of rows at a time (a
    float32 copy of a whole bf16 gradient would double its memory)."""
    g = g.float()
    if x.dtype == torch.float32:
        x.mul_(g)
        return
    rows = x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)
    step = max(1, chunk_bytes // (4 * max(rows.shape[1], 1)))
    for part in rows.split(step):
        part.copy_(part.float().mul_(g))


def reference_task_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    task_ids: torch.Tensor,
    task_scale: torch.Tensor,
    ignore_index: int = -100,
    *,
    logit_scale: float = 1.0,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The objective in float64 with autograd, for tests: the same outputs as ``task_cross_entropy``.

    Differentiable with respect to ``logits`` (a float64 leaf the caller makes); tokens with an out-of-range
    label or task id are left out, as in the kernels' unchecked mode.
    """
    n_vocab, n_tasks = logits.shape[1], task_scale.numel()
    valid = counted(labels, task_ids, n_vocab, n_tasks, ignore_index)
    safe_label = torch.where(valid, labels, ignore_index).long()
    z = transform_logits(logits.double(), logit_scale, softcap)[0]
    ce = F.cross_entropy(z, safe_label, ignore_index=ignore_index, reduction="none")
    safe_task = torch.where(valid, task_ids, 0).long()
    sums = torch.zeros(n_tasks, dtype=torch.float64, device=logits.device).index_add(0, safe_task, ce)
    counts = torch.zeros(n_tasks, dtype=torch.int64, device=logits.device).index_add_(0, safe_task, valid.long())
    loss = (task_scale.double() * sums).sum()
    return loss, sums.detach(), counts
