"""The exact global multitask objective of one optimizer step (``docs/coba.md``, "The objective the weights are
applied to").

``L = sum_{k in U} w_k * Lhat_k / sum_{k in U} w_k`` where ``Lhat_k`` is task k's token-mean loss over the
*whole global batch* (every micro-batch on every rank) and U the tasks present in it. Because the per-task
token counts ``n_k`` of the whole step are all-reduced once before the backward passes, each token ``i`` can
carry the coefficient ``w_t / (n_t * sum_U w)`` (``t`` its task) in the per-task kernel, and the gradients
summed over micro-batches and ranks are exactly ``dL/dtheta``; no micro-batch renormalises on its own.

DeepSpeed's engine divides each micro-batch loss by the accumulation steps and averages gradients over the
data-parallel ranks; the trainer passes that product as ``grad_multiplier`` so the two cancel exactly.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from mftcoder_coba.data import IGNORE_INDEX
from mftcoder_coba.kernels.api import linear_task_cross_entropy, task_cross_entropy
from mftcoder_coba.models import causal_lm, lm_head
from mftcoder_coba.models.forward import decoder_outputs, head_has_adapter
from mftcoder_coba.models.head import logit_transform
from mftcoder_coba.training.moe import router_aux


def loss_token_counts(batches: list[dict[str, np.ndarray]], num_tasks: int) -> np.ndarray:
    """Per-task number of loss tokens (label != IGNORE_INDEX) over ``batches``, float64 (K,)."""
    counts = np.zeros(num_tasks, dtype=np.float64)
    for batch in batches:
        mask = (batch["labels"] != IGNORE_INDEX) & (batch["task_ids"] >= 0)
        counts += np.bincount(batch["task_ids"][mask].astype(np.int64), minlength=num_tasks)[:num_tasks]
    return counts


def task_scale(weights: np.ndarray, counts: np.ndarray, grad_multiplier: float = 1.0) -> np.ndarray:
    """Per-token coefficient of each task, ``w_t / (n_t * sum_{k in U} w_k) * grad_multiplier``; 0 if absent.

    ``counts`` are the global counts of the step. If every present task has weight 0 the objective is 0.
    """
    present = counts > 0
    total = float(np.sum(weights[present]))
    scale = np.zeros_like(weights, dtype=np.float64)
    if total > 0:
        scale[present] = weights[present] / (counts[present] * total) * grad_multiplier
    return scale


def per_task_mean(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Token-mean loss per task, NaN where a task has no tokens."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def objective_value(weights: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> float:
    """L of the step from its global per-task sums and counts (the number the backward passes differentiate)."""
    return float(np.sum(task_scale(weights, counts) * sums))


def to_device(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """Reader rows (NumPy) as int64 tensors on ``device``.

    On CUDA the rows go through pinned memory: a copy from pageable memory waits for all queued GPU work,
    which would stall the host once per micro-batch instead of letting it queue the next forward."""
    tensors = {key: torch.as_tensor(np.asarray(value), dtype=torch.long) for key, value in batch.items()}
    if device.type == "cuda":
        tensors = {key: value.pin_memory() for key, value in tensors.items()}
    return {key: value.to(device, non_blocking=True) for key, value in tensors.items()}


def batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], scale: torch.Tensor, *,
               fused_linear: bool, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, task_loss_sum, task_token_count)`` of one micro-batch with per-task coefficients ``scale``;
    ``loss`` includes a MoE model's router auxiliary loss (:mod:`~mftcoder_coba.training.moe`), the sums do not."""
    aux = router_aux(causal_lm(model))
    hidden, router_logits = decoder_outputs(model, batch["input_ids"], batch["position_ids"], batch["task_ids"],
                                            router_logits=aux is not None)
    loss, sums, counts = head_loss(model, hidden, batch, scale, fused_linear=fused_linear, impl=impl)
    return (loss if aux is None else loss + aux(router_logits)), sums, counts


def head_loss(model: torch.nn.Module, hidden: torch.Tensor, batch: dict[str, torch.Tensor], scale: torch.Tensor, *,
              fused_linear: bool, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-task loss from the last hidden state ``hidden`` (B, L, H) of ``batch``.

    ``fused_linear``: the LM head's weight goes into ``linear_task_cross_entropy`` with the hidden state (no
    logits tensor). Otherwise the model's output-embedding module computes the logits, which is what works
    when ZeRO-3 partitions that weight (its hooks gather it for the call). Both apply the model's logit
    transform (:mod:`mftcoder_coba.models.head`: soft-capping, logit scaling) inside the kernel. A head with
    an adapter (LoRA or CGC-LoRA on ``lm_head``) always goes through its module: its base weight alone is not
    what it computes, and the fused path would leave the adapter without a gradient.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = batch["labels"].reshape(-1)
    task_ids = batch["task_ids"].reshape(-1)
    transform = logit_transform(model).kernel_kwargs()
    if fused_linear and not head_has_adapter(model):
        weight, bias = lm_head(model)
        return linear_task_cross_entropy(hidden, weight, labels, task_ids, scale, bias=bias,
                                         ignore_index=IGNORE_INDEX, impl=impl, **transform)
    logits = causal_lm(model).get_output_embeddings()(hidden)
    return task_cross_entropy(logits, labels, task_ids, scale, ignore_index=IGNORE_INDEX, impl=impl, **transform)


class TaskLoss(torch.nn.Module):
    """The model with its per-task loss head: the one module a DeepSpeed engine runs (``engine(**batch, scale=...)``).

    The engine's own ``forward`` must run for every micro-batch (ZeRO-3 counts micro-steps and tracks
    parameters there; calling the inner model directly silently drops accumulated gradients), while the loss
    needs the last hidden state rather than the model's logits. The model is kept as ``.module`` so helpers
    that unwrap ``.module`` (``causal_lm``, ``save_trainable``) see through this wrapper too.
    """

    def __init__(self, model: torch.nn.Module, *, fused_linear: bool, impl: str = "auto") -> None:
        super().__init__()
        self.module = model
        self.fused_linear = fused_linear
        self.impl = impl

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, task_ids: torch.Tensor,
                position_ids: torch.Tensor, scale: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, task_loss_sum, task_token_count, hidden.detach())`` of one micro-batch; a MoE model's router
        auxiliary loss is added to ``loss`` as is (the engine's mean over micro-batches and ranks averages it)."""
        batch = {"labels": labels, "task_ids": task_ids}
        aux = router_aux(causal_lm(self.module))
        hidden, router_logits = decoder_outputs(self.module, input_ids, position_ids, task_ids,
                                                router_logits=aux is not None)
        loss, sums, counts = head_loss(self.module, hidden, batch, scale, fused_linear=self.fused_linear,
                                       impl=self.impl)
        if aux is not None:
            loss = loss + aux(router_logits)
        return loss, sums, counts, hidden.detach()


def accumulate_gradients(engine: Any, micro_batches: list[dict[str, np.ndarray]], weights: np.ndarray,
                         counts: np.ndarray, device: torch.device,
                         on_hidden: Callable[[torch.Tensor, dict[str, torch.Tensor]], None] | None = None
                         ) -> np.ndarray:
    """Forward + ``engine.backward`` over one step's micro-batches on this rank; returns its per-task loss sums.

    ``engine`` runs a :class:`TaskLoss`. ``counts`` are the step's global per-task token counts (all ranks,
    all micro-batches). DeepSpeed divides each backward by the accumulation steps and averages gradients over
    the data-parallel ranks, so the coefficients are multiplied by that product: after the last backward
    (the accumulation boundary) the engine holds exactly dL/dtheta, and the caller's ``engine.step()`` makes
    the optimizer step. ``on_hidden(hidden, batch)`` sees each micro-batch's detached last hidden state.
    """
    undo_engine_mean = engine.gradient_accumulation_steps() * engine.dp_world_size
    scale = torch.tensor(task_scale(weights, counts, undo_engine_mean), dtype=torch.float32, device=device)
    sums = torch.zeros(len(weights), dtype=torch.float64, device=device)  # read back once: no sync per micro-batch
    for i, rows in enumerate(micro_batches):
        if i:  # DeepSpeed's protocol is backward + step per micro-batch; off the boundary step() only counts
            engine.step()
        batch = to_device(rows, device)
        loss, task_sum, _, hidden = engine(**batch, scale=scale)
        if on_hidden is not None:
            on_hidden(hidden, batch)
        engine.backward(loss)
        sums += task_sum.double()
    return sums.cpu().numpy()
