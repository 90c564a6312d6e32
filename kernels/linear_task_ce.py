"""LM head + per-task cross-entropy without the (N, V) logits: row chunks, gradients accumulated as we go.

For each chunk of ``C`` rows the head's logits ``hidden[c] @ weight.T (+ bias)`` are formed in a (C, V)
buffer, the cross-entropy row kernel overwrites that buffer with ``d loss / d logits`` in the same sweep, and
three products consume it at once: ``dhidden[c] = g @ weight``, ``dweight += g.T @ hidden[c]`` and
``dbias += g.sum(0)``. The arithmetic is the 6·N·H·V of an unfused head's forward and backward; the extra
memory is one chunk (``chunk_bytes``) instead of the N·V logits, their float32 copy and their gradient.

``dweight`` is accumulated in the weight's dtype (each chunk's product is computed in float32 by the GEMM
and rounded once when added): a float32 accumulator for a bf16 head would cost 4·V·H bytes (2 GiB at
V = 128k, H = 4096), four times this path's whole budget. ``dbias`` is accumulated in float32.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

RowsFn = Callable[..., None]
ReduceFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

DEFAULT_CHUNK_BYTES = 512 * 2**20


def chunk_rows(n_rows: int, n_vocab: int, itemsize: int, chunk_bytes: int) -> int:
    """Rows per chunk: as many as fit in ``chunk_bytes`` of logits, a multiple of 128 when that many fit
    (whole GEMM tiles)."""
    rows = max(1, chunk_bytes // (n_vocab * itemsize))
    if rows >= 128:
        rows -= rows % 128
    return min(rows, max(n_rows, 1))


def linear_task_ce(
    rows_fn: RowsFn,
    reduce_fn: ReduceFn,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    task_ids: torch.Tensor,
    task_scale: torch.Tensor,
    ignore_index: int,
    need_dhidden: bool,
    need_dweight: bool,
    need_dbias: bool,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    logit_scale: float = 1.0,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, task_loss_sum, task_token_count, dhidden, dweight, dbias) for ``loss`` as in
    ``task_cross_entropy`` over ``hidden @ weight.T + bias``. Gradients not asked for come back as empty
    tensors; with none asked for, nothing but the per-chunk logits is written.

    ``logit_scale`` / ``softcap`` (0 = none): the model's logit transform, applied by ``rows_fn`` inside its
    tiles, which writes the gradient of the raw logits, so the three products below need nothing more.

    ``rows_fn`` / ``reduce_fn`` are a backend's ``task_ce_rows`` / ``task_reduce`` (Triton or PyTorch).
    """
    n_rows, _ = hidden.shape
    n_vocab = weight.shape[0]
    device = hidden.device
    want_grad = need_dhidden or need_dweight or need_dbias
    row_ce = torch.empty(n_rows, dtype=torch.float32, device=device)
    dhidden = torch.empty_like(hidden) if need_dhidden else hidden.new_empty(0)
    dweight = torch.empty_like(weight) if need_dweight else weight.new_empty(0)
    dbias32 = torch.zeros(n_vocab, dtype=torch.float32, device=device) if need_dbias else None
    step = chunk_rows(n_rows, n_vocab, hidden.element_size(), chunk_bytes)
    weight_t = weight.t()
    for start in range(0, n_rows, step):
        stop = min(start + step, n_rows)
        h = hidden[start:stop]
        logits = torch.mm(h, weight_t) if bias is None else torch.addmm(bias, h, weight_t)
        rows_fn(logits, labels[start:stop], task_ids[start:stop], task_scale, ignore_index, row_ce[start:stop],
                logits if want_grad else None, logit_scale=logit_scale, softcap=softcap)
        if need_dhidden:
            torch.mm(logits, weight, out=dhidden[start:stop])
        if need_dweight:
            if start == 0:
                torch.mm(logits.t(), h, out=dweight)
            else:
                dweight.addmm_(logits.t(), h)
        if dbias32 is not None:
            dbias32 += logits.sum(dim=0, dtype=torch.float32)
        del logits
    loss, sums, counts = reduce_fn(row_ce, labels, task_ids, task_scale, ignore_index, n_vocab)
    if n_rows == 0 and need_dweight:
        dweight.zero_()
    dbias = dbias32.to(bias.dtype) if dbias32 is not None and bias is not None else hidden.new_empty(0)
    return loss, sums, counts, dhidden, dweight, dbias
