"""Per-task held-out loss: forward only, per-task sums and counts from the loss kernel, all-reduced.

Used for CoBa's reference losses L_k(0) and each update's sample, for FAMO's post-step re-evaluation, and by
ColD Fusion to score fused models. The rows are split over the ranks (rank r takes every W-th row); the sums
and counts are added over ranks, so the result does not depend on the world size.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from mftcoder_coba.data import PackedDataset
from mftcoder_coba.training import distributed
from mftcoder_coba.training.objective import batch_loss, to_device


def is_partitioned(model: torch.nn.Module) -> bool:
    """True when ZeRO-3 has partitioned the parameters (each one carries a DeepSpeed id)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


@torch.no_grad()
def evaluate_per_task(model: torch.nn.Module, dataset: PackedDataset, rows: np.ndarray,
                      micro_batch_size: int, impl: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """``(loss_sum (K,), token_count (K,))`` float64 over ``rows`` of ``dataset``, summed over all ranks.

    Every rank must call it with the same ``rows``. Under ZeRO-3 every forward is a collective, so a rank
    that has run out of rows runs one more forward on a row whose result it discards.
    """
    world = distributed.world_from_env() if torch.distributed.is_initialized() else None
    rank, size = (world.rank, world.size) if world else (0, 1)
    device = next(model.parameters()).device
    num_tasks = len(dataset.tasks)
    partitioned = is_partitioned(model)
    mine = np.asarray(rows, dtype=np.int64)[rank::size]
    rounds = math.ceil(math.ceil(len(rows) / size) / micro_batch_size)
    sums = torch.zeros(num_tasks, dtype=torch.float64, device=device)  # read back once, after the loop
    counts = torch.zeros(num_tasks, dtype=torch.float64, device=device)
    scale = torch.zeros(num_tasks, dtype=torch.float32, device=device)
    was_training = model.training
    model.eval()
    try:
        for i in range(rounds):
            chunk = mine[i * micro_batch_size:(i + 1) * micro_batch_size]
            if len(chunk) == 0 and not partitioned:
                break
            batch = to_device(dataset.rows(chunk if len(chunk) else np.asarray(rows[:1])), device)
            _, task_sum, task_count = batch_loss(model, batch, scale, fused_linear=not partitioned, impl=impl)
            if len(chunk):
                sums += task_sum.double()
                counts += task_count.double()
    finally:
        model.train(was_training)
    both = torch.cat([sums, counts]).cpu().numpy()
    if world is None:
        return both[:num_tasks], both[num_tasks:]
    both = distributed.all_reduce_sum(both, world)
    return both[:num_tasks], both[num_tasks:]
