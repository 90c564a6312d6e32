"""Per-task gradient norms at the last shared layer, for balancers that need them (GradNorm).

Every task shares the whole decoder and the LM head, so the last shared layer is the LM head: ``W`` (V, H).
For each task k the trainer needs ``||dL_k/dW||`` of the *unweighted* task loss ``L_k`` (token mean over the
global batch). Per micro-batch, with the hidden states of the training forward detached, one
``linear_task_cross_entropy`` per task (coefficient ``1/n_k`` on task k's tokens, 0 elsewhere) gives that
task's contribution to ``dL_k/dW``; contributions are summed over micro-batches and all-reduced over ranks
before the norm, so the norms are those of the global batch.

Extra cost per micro-batch: K forward+backward passes of the LM head alone (no logits materialised), no
pass through the decoder. Extra memory: a K x V x H float32 buffer, and one all-reduce of it per step. Not
available under ZeRO-3 (the head weight is partitioned); the preflight refuses that combination.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from mftcoder_coba.data import IGNORE_INDEX
from mftcoder_coba.errors import UserError
from mftcoder_coba.kernels.api import linear_task_cross_entropy
from mftcoder_coba.models import lm_head
from mftcoder_coba.models.forward import head_has_adapter
from mftcoder_coba.models.head import logit_transform


class HeadGradNorms:
    """Accumulates per-task LM-head gradients over one step's micro-batches."""

    def __init__(self, model: torch.nn.Module, num_tasks: int, impl: str) -> None:
        if head_has_adapter(model):
            raise UserError("balancer needs per-task gradients at the LM head weight, which an adapter on lm_head "
                            "replaces: leave lm_head out of model.lora.target_modules / model.cgc_lora targets")
        weight, bias = lm_head(model)
        self.weight = weight
        self.bias = bias
        self.num_tasks = num_tasks
        self.impl = impl
        self.transform = logit_transform(model).kernel_kwargs()
        self.total = torch.zeros((num_tasks, *weight.shape), dtype=torch.float32, device=weight.device)

    def add(self, hidden: torch.Tensor, batch: dict[str, torch.Tensor], counts: np.ndarray) -> None:
        """Add one micro-batch's per-task head gradients; ``counts`` are the step's global token counts."""
        hidden = hidden.detach().reshape(-1, hidden.shape[-1])
        labels = batch["labels"].reshape(-1)
        task_ids = batch["task_ids"].reshape(-1)
        weight = self.weight.detach().requires_grad_(True)
        bias = None if self.bias is None else self.bias.detach()
        for k in np.flatnonzero(counts > 0):
            scale = torch.zeros(self.num_tasks, dtype=torch.float32, device=hidden.device)
            scale[k] = 1.0 / counts[k]
            loss, _, _ = linear_task_cross_entropy(hidden, weight, labels, task_ids, scale, bias=bias,
                                                   ignore_index=IGNORE_INDEX, impl=self.impl, **self.transform)
            (grad,) = torch.autograd.grad(loss, weight)
            self.total[k] += grad.float()

    def norms(self, world_size: int) -> np.ndarray:
        """Per-task ``||dL_k/dW||`` over the whole global batch (NaN for absent tasks); resets the buffer."""
        if world_size > 1:
            dist.all_reduce(self.total)
        norms = self.total.flatten(1).norm(dim=1).double().cpu().numpy()
        norms[norms == 0] = np.nan
        self.total.zero_()
        return norms
