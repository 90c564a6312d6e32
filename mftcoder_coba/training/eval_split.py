"""The ``eval:`` split of a run: every row scored per task during training, as the training tasks.

A test split may hold only some of the training tasks (prepared from fewer files), so its own task ids need
not be the training ids. :class:`EvalSplit` maps each of its rows' task ids to the training task of the same
name before the model sees them (CGC-LoRA chooses its gates by task id) and reports losses in training-task
order, NaN for tasks it has no tokens of. The scoring is :func:`mftcoder_coba.training.validation.evaluate_per_task`,
which ``mftcoder-coba eval`` runs too: under several ranks each takes every W-th row and the sums are all-reduced.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mftcoder_coba.data import PackedDataset
from mftcoder_coba.training.objective import per_task_mean
from mftcoder_coba.training.validation import evaluate_per_task


class EvalSplit:
    """A prepared split whose rows carry training task ids (the reader interface ``evaluate_per_task`` uses)."""

    def __init__(self, dataset: PackedDataset, train_tasks: list[str]) -> None:
        self.dataset = dataset
        self.tasks = list(train_tasks)
        self._train_id = np.asarray([train_tasks.index(task) for task in dataset.tasks], dtype=np.int64)

    @property
    def path(self) -> Path:
        return self.dataset.path

    def __len__(self) -> int:
        return len(self.dataset)

    def rows(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        batch = self.dataset.rows(idx)
        ids = batch["task_ids"]  # -1 on padding stays -1
        batch["task_ids"] = np.where(ids >= 0, self._train_id[np.maximum(ids, 0)], ids)
        return batch

    def losses(self, model: torch.nn.Module, micro_batch_size: int, impl: str) -> np.ndarray:
        """Per-task token-mean loss of ``model`` over every row (collective: every rank calls it)."""
        rows = np.arange(len(self), dtype=np.int64)
        sums, counts = evaluate_per_task(model, self, rows, micro_batch_size, impl=impl)  # type: ignore[arg-type]
        return per_task_mean(np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.float64))
