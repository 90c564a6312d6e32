"""Triton kernels: per-token cross-entropy, its gradient and per-task sums, reading the logits in one sweep.

Why one sweep: the objective's gradient ``task_scale[t_i] * (softmax_i - onehot(label_i))`` depends only on the
row's log-sum-exp and a coefficient that is known before the forward pass, so the forward kernel can write it
while the row is still hot (each row is read once from DRAM and a second time, moments later, from L2).
Training then needs no backward kernel over the logits at all; ``scale_`` folds a non-unit upstream gradient
in afterwards and returns at once when that gradient is exactly 1 (read on the device: no host sync).

Layout and numerics:
- a persistent grid strides over the rows, streaming the vocabulary in blocks with an online max /
  sum-of-exponentials in float32 (base 2: ``exp2`` is the hardware instruction); when the gradient is
  written, ``SPLIT`` programs share each row (see ``default_launch``) so that each re-reads only a short
  segment, from L2;
- the running max is shifted by a finite reference (a block of ``-inf`` / ``finfo.min`` logits, e.g. masked
  columns, never meets ``-inf - -inf``) and a row's ce is ``(m - x_label) + log d``, never a stored
  log-sum-exp minus the label's logit, which loses ``log d``'s digits when the logits are large;
- row offsets are int64 (``N * V`` passes 2**31 at V = 152k);
- the true-class gradient ``(p - 1) * coef`` is formed in float32 and rounded once, so bf16 cancellation
  never zeroes it;
- a token is counted only when its label is not ``ignore_index``, its label lies in ``[0, V)`` and its task
  id in ``[0, T)``; any other token reads nothing beyond its own row, gets ce 0 and a zero gradient row
  (the public API's checking mode turns such tokens into an error instead);
- per-task sums come from a second, single-program kernel over the per-row losses, so they are
  deterministic (no float atomics).

The kernels know nothing of autograd, torch.compile or the models: ``ops.py`` registers them as custom ops.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _transform(x, scale, softcap, SOFTCAP: tl.constexpr):
    """The model's logit transform on raw head outputs ``x`` (float32) and its derivative ``dz/dx``:
    ``z = scale * x`` (Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``), then, with ``SOFTCAP``,
    ``z = softcap * tanh(z / softcap)`` (Gemma 2/3's ``final_logit_softcapping``). tanh is formed from one
    ``exp2`` of ``-2|y|`` so it saturates to +-1 instead of overflowing."""
    z = x * scale
    if SOFTCAP:
        t = tl.exp2(tl.abs(z) * (-2.0 * _LOG2E / softcap))
        th = (1.0 - t) / (1.0 + t)
        th = tl.where(z < 0, -th, th)
        # 1 - tanh**2 = 4t / (1 + t)**2: 1 - th * th would cancel where tanh saturates
        return softcap * th, scale * 4.0 * t / ((1.0 + t) * (1.0 + t))
    return z, scale


@triton.jit
def _lse_block(row_ptr, cols, stop, m, d, scale, softcap, MASKED: tl.constexpr, SOFTCAP: tl.constexpr):
    """Fold one block of (transformed) logits into the running (max m, sum of exp(z - m) d), natural-log units."""
    if MASKED:
        mask = cols < stop
        x, _ = _transform(tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32), scale, softcap, SOFTCAP)
        x = tl.where(mask, x, float("-inf"))
    else:
        x, _ = _transform(tl.load(row_ptr + cols).to(tl.float32), scale, softcap, SOFTCAP)
    m_new = tl.maximum(m, tl.max(x, axis=0))
    # shift by a finite reference: while every logit so far is -inf, (-inf) - (-inf) would be NaN; differences
    # (not x*log2e - m*log2e) so that finfo.min logits neither overflow to -inf nor cancel to NaN
    ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    d = d * tl.exp2((m - ref) * _LOG2E) + tl.sum(tl.exp2((x - ref) * _LOG2E), axis=0)
    return m_new, d


@triton.jit
def _grad_block(row_ptr, grad_row_ptr, cols, stop, m, log2d, coef, scale, softcap, MASKED: tl.constexpr,
                SOFTCAP: tl.constexpr):
    """Write ``coef * softmax(z) * dz/dx`` with ``softmax = 2**((z - m) * log2(e) - log2(d))`` for one block (the
    true class is corrected after the sweep); ``m`` is finite and ``z - m <= 0``, so nothing overflows or
    cancels to NaN."""
    if MASKED:
        mask = cols < stop
        z, dz = _transform(tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32), scale, softcap, SOFTCAP)
        p = tl.exp2((z - m) * _LOG2E - log2d)
        tl.store(grad_row_ptr + cols, (p * coef * dz).to(grad_row_ptr.dtype.element_ty), mask=mask)
    else:
        z, dz = _transform(tl.load(row_ptr + cols).to(tl.float32), scale, softcap, SOFTCAP)
        p = tl.exp2((z - m) * _LOG2E - log2d)
        tl.store(grad_row_ptr + cols, (p * coef * dz).to(grad_row_ptr.dtype.element_ty))


@triton.jit
def _task_ce_rows_kernel(
    logits_ptr,
    stride_logits,
    grad_ptr,
    stride_grad,
    labels_ptr,
    tasks_ptr,
    scale_ptr,
    row_ce_ptr,
    partial_ptr,
    arrived_ptr,
    n_rows,
    n_vocab,
    n_tasks,
    ignore_index,
    seg_len,
    scale,
    softcap,
    WRITE_GRAD: tl.constexpr,
    SOFTCAP: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    seg = pid % SPLIT
    group = pid // SPLIT
    n_groups = tl.num_programs(0) // SPLIT
    seg_start = seg * seg_len
    seg_stop = tl.minimum(seg_start + seg_len, n_vocab)
    # whole blocks go unmasked; only the segment's last, partial block pays for a mask
    full_stop = seg_start + tl.maximum(seg_stop - seg_start, 0) // BLOCK_V * BLOCK_V
    cols0 = tl.arange(0, BLOCK_V)
    for row in range(group, n_rows, n_groups):
        row64 = tl.cast(row, tl.int64)
        label = tl.load(labels_ptr + row64).to(tl.int64)
        task = tl.load(tasks_ptr + row64).to(tl.int64)
        valid = (label != ignore_index) & (label >= 0) & (label < n_vocab) & (task >= 0) & (task < n_tasks)
        row_logits = logits_ptr + row64 * stride_logits
        # read before any program of this row may start overwriting the logits (in-place mode)
        x_label, dz_label = _transform(tl.load(row_logits + tl.where(valid, label, 0)).to(tl.float32), scale,
                                       softcap, SOFTCAP)

        # pass 1 over this program's segment: running max and sum of exponentials, float32
        m = float("-inf")
        d = 0.0
        for start in range(seg_start, full_stop, BLOCK_V):
            m, d = _lse_block(row_logits, start + cols0, seg_stop, m, d, scale, softcap, False, SOFTCAP)
        if full_stop < seg_stop:
            m, d = _lse_block(row_logits, full_stop + cols0, seg_stop, m, d, scale, softcap, True, SOFTCAP)
        if SPLIT > 1:
            # the SPLIT programs of a row meet here: publish (m, d), count in, wait for the others. Scalar
            # atomics run once per program and act at L2; the grid is persistent and small enough to be
            # resident at once, so every partner is running and the wait ends.
            slot = partial_ptr + (row64 * SPLIT + seg) * 2
            tl.atomic_xchg(slot, m)
            tl.atomic_xchg(slot + 1, d)
            tl.atomic_add(arrived_ptr + row64, 1, sem="release")
            arrived = tl.atomic_add(arrived_ptr + row64, 0, sem="acquire")
            while arrived < SPLIT:
                arrived = tl.atomic_add(arrived_ptr + row64, 0, sem="acquire")
            parts = partial_ptr + (row64 * SPLIT + tl.arange(0, SPLIT)) * 2
            part_m = tl.atomic_add(parts, 0.0, sem="acquire")
            part_d = tl.atomic_add(parts + 1, 0.0, sem="acquire")
            m = tl.max(part_m, axis=0)
            d = tl.sum(part_d * tl.exp2((part_m - tl.where(m == float("-inf"), 0.0, m)) * _LOG2E), axis=0)
        # a row of -inf only (a fully masked, ignored row) has no max: any finite reference gives 0 gradient
        m = tl.where(m == float("-inf"), 0.0, m)
        log_d = tl.log(d)

        if seg == 0:
            # (m - x_label) + log d, not lse - x_label: with large logits lse = m + log d rounds log d away
            tl.store(row_ce_ptr + row64, tl.where(valid, (m - x_label) + log_d, 0.0))

        if WRITE_GRAD:
            # pass 2: coef * softmax over the segment just read (from L2), then the true class
            coef = tl.where(valid, tl.load(scale_ptr + tl.where(valid, task, 0)).to(tl.float32), 0.0)
            log2d = tl.where(valid, log_d * _LOG2E, 0.0)  # d may be 0 in an ignored row: -inf - -inf is NaN
            row_grad = grad_ptr + row64 * stride_grad
            for start in range(seg_start, full_stop, BLOCK_V):
                _grad_block(row_logits, row_grad, start + cols0, seg_stop, m, log2d, coef, scale, softcap, False,
                            SOFTCAP)
            if full_stop < seg_stop:
                _grad_block(row_logits, row_grad, full_stop + cols0, seg_stop, m, log2d, coef, scale, softcap, True,
                            SOFTCAP)
            if valid & (label >= seg_start) & (label < seg_stop):
                # (p - 1) * coef formed in float32 and rounded once; the barrier orders it after the
                # block store of the same element by another thread of this program
                tl.debug_barrier()
                p_label = tl.exp2((x_label - m) * _LOG2E - log2d)
                tl.store(row_grad + label, ((p_label - 1.0) * coef * dz_label).to(grad_ptr.dtype.element_ty))


@triton.jit
def _task_reduce_kernel(
    row_ce_ptr,
    labels_ptr,
    tasks_ptr,
    scale_ptr,
    loss_ptr,
    sums_ptr,
    counts_ptr,
    n_rows,
    n_vocab,
    n_tasks,
    ignore_index,
    BLOCK_N: tl.constexpr,
    T_PAD: tl.constexpr,
):
    task_range = tl.arange(0, T_PAD)
    sums = tl.zeros((T_PAD,), dtype=tl.float32)
    counts = tl.zeros((T_PAD,), dtype=tl.int32)
    for start in range(0, n_rows, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        in_range = rows < n_rows
        label = tl.load(labels_ptr + rows, mask=in_range, other=ignore_index).to(tl.int64)
        task = tl.load(tasks_ptr + rows, mask=in_range, other=-1).to(tl.int64)
        ce = tl.load(row_ce_ptr + rows, mask=in_range, other=0.0)
        valid = in_range & (label != ignore_index) & (label >= 0) & (label < n_vocab) & (task >= 0) & (task < n_tasks)
        hit = (task[:, None] == task_range[None, :]) & valid[:, None]
        sums += tl.sum(tl.where(hit, ce[:, None], 0.0), axis=0)
        counts += tl.sum(hit.to(tl.int32), axis=0)
    task_mask = task_range < n_tasks
    scale = tl.load(scale_ptr + task_range, mask=task_mask, other=0.0).to(tl.float32)
    tl.store(sums_ptr + task_range, sums, mask=task_mask)
    tl.store(counts_ptr + task_range, counts.to(tl.int64), mask=task_mask)
    tl.store(loss_ptr, tl.sum(scale * sums, axis=0))


@triton.jit
def _scale_kernel(x_ptr, numel, n_blocks, g_ptr, BLOCK: tl.constexpr):
    g = tl.load(g_ptr).to(tl.float32)
    if g != 1.0:
        pid = tl.program_id(0)
        n_programs = tl.num_programs(0)
        for block in range(pid, n_blocks, n_programs):
            offs = tl.cast(block, tl.int64) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < numel
            x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
            tl.store(x_ptr + offs, (x * g).to(x_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _program_slots(device_index: int) -> int:
    """Programs the persistent grid launches: a few per multiprocessor, so few rows are in flight at once
    and a row's second read still finds it in L2."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _interpreted(t: torch.Tensor) -> bool:
    return t.device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class RowsLaunch:
    """How the row kernel is launched: the knobs ``python benchmarks/kernels/bench.py --sweep`` times.

    ``task_ce_rows`` takes one explicitly (tuning runs, tests); without one it uses :func:`default_launch`,
    the measured defaults, which is what the custom ops and the public API always do.
    """

    block_v: int
    """Vocabulary columns per block of the online sweep (a power of two, at least 16)."""
    num_warps: int
    """Warps per program (a power of two)."""
    programs_per_sm: int = 4
    """Persistent-grid rows in flight per multiprocessor: few, so a row's second read still finds it in L2."""
    split: int = 1
    """Programs sharing one row (a power of two): each reads and writes its segment of the vocabulary and they
    exchange their (max, sum) partials. The Triton interpreter always uses 1 (it runs programs one after
    another, so partners could never meet)."""

    def __post_init__(self) -> None:
        for name, low in (("block_v", 16), ("num_warps", 1), ("split", 1)):
            value = getattr(self, name)
            if value < low or value & (value - 1):
                raise ValueError(f"RowsLaunch.{name} must be a power of two >= {low}, got {value}")
        if self.programs_per_sm < 1:
            raise ValueError(f"RowsLaunch.programs_per_sm must be >= 1, got {self.programs_per_sm}")


def default_launch(n_vocab: int, write_grad: bool, device: torch.device) -> RowsLaunch:
    """The measured launch of the row kernel for this vocabulary size and mode (benchmarks/kernels/, H100).

    When the gradient is written, SPLIT programs share a row at large vocabularies: each reads its segment,
    they exchange their (max, sum) partials, and each writes its segment's gradient while that segment is
    still in L2 -- with whole rows per program the rows in flight (programs x 2*V bytes) overflow L2 and the
    second read goes to DRAM. The forward-only sweep reads each row once, so whole rows per program are best
    there. Off CUDA (the interpreter) small blocks keep the simulated programs cheap.
    """
    if device.type != "cuda":
        return RowsLaunch(block_v=128, num_warps=1, programs_per_sm=1)
    if write_grad:
        split = 8 if n_vocab >= 65536 else 1
        return RowsLaunch(block_v=min(triton.next_power_of_2(n_vocab), 4096), num_warps=8, split=split)
    return RowsLaunch(block_v=min(triton.next_power_of_2(n_vocab), 16384), num_warps=16)


def task_ce_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    task_ids: torch.Tensor,
    task_scale: torch.Tensor,
    ignore_index: int,
    row_ce: torch.Tensor,
    grad: torch.Tensor | None,
    launch: RowsLaunch | None = None,
    *,
    logit_scale: float = 1.0,
    softcap: float = 0.0,
) -> None:
    """Write each row's cross-entropy into ``row_ce`` (float32, 0 where not counted) and, when ``grad`` is
    given, ``task_scale[t] * (softmax - onehot)`` into it (``grad`` may be ``logits`` itself). ``launch``:
    the kernel's launch configuration; ``None`` = :func:`default_launch`. ``logit_scale`` / ``softcap`` (0 =
    none): the model's logit transform, applied inside the tiles; the gradient is that of the raw logits."""
    n_rows, n_vocab = logits.shape
    if n_rows == 0:
        return
    if launch is None:
        launch = default_launch(n_vocab, grad is not None, logits.device)
    block, split = launch.block_v, launch.split
    if _interpreted(logits):
        split = 1  # the interpreter runs programs one after another: partners could never meet
        n_programs = min(n_rows, 4)
    else:
        slots = launch.programs_per_sm * _program_slots(logits.device.index or 0)
        n_programs = split * min(n_rows, max(1, slots // split))
    seg_len = triton.cdiv(triton.cdiv(n_vocab, split), block) * block
    partial = torch.empty(n_rows * split * 2 if split > 1 else 1, dtype=torch.float32, device=logits.device)
    arrived = torch.zeros(n_rows if split > 1 else 1, dtype=torch.int32, device=logits.device)
    target = grad if grad is not None else logits
    _task_ce_rows_kernel[(n_programs,)](
        logits,
        logits.stride(0),
        target,
        target.stride(0),
        labels,
        task_ids,
        task_scale,
        row_ce,
        partial,
        arrived,
        n_rows,
        n_vocab,
        task_scale.numel(),
        ignore_index,
        seg_len,
        float(logit_scale),
        float(softcap) if softcap else 1.0,
        WRITE_GRAD=grad is not None,
        SOFTCAP=bool(softcap),
        SPLIT=split,
        BLOCK_V=block,
        num_warps=launch.num_warps,
    )


def task_reduce(
    row_ce: torch.Tensor,
    labels: torch.Tensor,
    task_ids: torch.Tensor,
    task_scale: torch.Tensor,
    ignore_index: int,
    n_vocab: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, per-task sums, per-task counts) from per-row losses; one program, fixed order."""
    n_tasks = task_scale.numel()
    loss = torch.empty((), dtype=torch.float32, device=row_ce.device)
    sums = torch.empty(n_tasks, dtype=torch.float32, device=row_ce.device)
    counts = torch.empty(n_tasks, dtype=torch.int64, device=row_ce.device)
    t_pad = max(2, triton.next_power_of_2(n_tasks))
    block_n = max(16, min(1024, 16384 // t_pad))
    _task_reduce_kernel[(1,)](
        row_ce,
        labels,
        task_ids,
        task_scale,
        loss,
        sums,
        counts,
        row_ce.numel(),
        n_vocab,
        n_tasks,
        ignore_index,
        BLOCK_N=block_n,
        T_PAD=t_pad,
        num_warps=4,
    )
    return loss, sums, counts


def scale_(x: torch.Tensor, g: torch.Tensor) -> None:
    """``x *= g`` in place (float32 product, one rounding) with ``g`` a one-element device tensor; every
    program returns at once when ``g == 1``, so the common case costs one launch and no pass over ``x``."""
    numel = x.numel()
    if numel == 0:
        return
    block = 4096
    n_blocks = triton.cdiv(numel, block)
    if _interpreted(x):
        n_programs = min(n_blocks, 4)
    else:
        n_programs = min(n_blocks, 8 * _program_slots(x.device.index or 0))
    _scale_kernel[(n_programs,)](x, numel, n_blocks, g, BLOCK=block, num_warps=8)
