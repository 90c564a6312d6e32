"""Per-task token loss and perplexity of a model over every row of a prepared split.

:func:`evaluate_split` is the library entry (the trainer can call it on a test split during training): it
runs :func:`mftcoder_coba.training.validation.evaluate_per_task`, the held-out loss the balancers use, so
the numbers come from the same per-task loss kernel, the same packed-row attention and the same rank
split (under ``torch.distributed`` each rank takes every W-th row and the sums are all-reduced).
:func:`evaluate_target` adds what the ``eval`` command needs: a target whose tasks use different adapters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from mftcoder_coba.data import PackedDataset
from mftcoder_coba.errors import UserError
from mftcoder_coba.evaluation.targets import Target, is_cgc, run_tasks, use_task
from mftcoder_coba.models import causal_lm
from mftcoder_coba.training.loss_guard import check_own_loss
from mftcoder_coba.training.validation import evaluate_per_task


@dataclass(frozen=True)
class TaskLosses:
    """Summed token losses and token counts per task (float64, task-id order of the split)."""

    tasks: list[str]
    sums: np.ndarray
    counts: np.ndarray

    def mean(self, task: int) -> float | None:
        """Token-mean loss of task ``task``; None when the split has no loss tokens of it."""
        return float(self.sums[task] / self.counts[task]) if self.counts[task] > 0 else None

    def to_json(self) -> dict:
        """``{"tasks": {name: {loss, perplexity, tokens}}, "mean_loss", "token_loss"}``.

        ``mean_loss`` weighs the tasks equally (as the multitask objective does); ``token_loss`` weighs
        every token equally, so large tasks dominate it.
        """
        per_task = {}
        for k, name in enumerate(self.tasks):
            loss = self.mean(k)
            per_task[name] = {"loss": loss, "perplexity": None if loss is None else _perplexity(loss),
                              "tokens": int(self.counts[k])}
        present = [v["loss"] for v in per_task.values() if v["loss"] is not None]
        total = float(self.counts.sum())
        return {"tasks": per_task, "mean_loss": float(np.mean(present)) if present else None,
                "token_loss": float(self.sums.sum() / total) if total else None}


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def evaluate_split(model: torch.nn.Module, dataset: PackedDataset, rows: np.ndarray | None = None, *,
                   micro_batch_size: int = 8, impl: str = "auto") -> TaskLosses:
    """Per-task loss sums and token counts of ``model`` over ``rows`` of ``dataset`` (all rows by default).

    Every rank of a distributed job must call it with the same ``rows``; the result is the same on each.
    """
    rows = np.arange(len(dataset), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    sums, counts = evaluate_per_task(model, dataset, rows, micro_batch_size, impl=impl)
    return TaskLosses(list(dataset.tasks), np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.float64))


def evaluate_target(model: torch.nn.Module, target: Target, dataset: PackedDataset, *, micro_batch_size: int = 8,
                    impl: str = "auto", check_model_loss: bool = True) -> TaskLosses:
    """:func:`evaluate_split` of a loaded target; with task adapters, each task's tokens are scored by the
    model with that task's adapter, on the rows that hold them. ``check_model_loss``: first refuse a model
    whose own ``forward(labels=...)`` loss this project's loss does not reproduce (``training.loss_guard``)."""
    check_compatible(model, target, dataset)
    if check_model_loss:
        check_own_loss(model, fused_linear=False, override="check_model_loss=False (evaluate_target)")
    if not target.task_adapters:
        return evaluate_split(model, dataset, micro_batch_size=micro_batch_size, impl=impl)
    missing = [t for t in dataset.tasks if t not in target.task_adapters]
    if target.kind == "export-1+N" and missing:
        raise UserError(f"{target.path}: no adapter for the task(s) {', '.join(missing)} of {dataset.path}")
    sums = np.zeros(len(dataset.tasks))
    counts = np.zeros(len(dataset.tasks))
    for k, task in enumerate(dataset.tasks):
        use_task(model, target, task)
        part = evaluate_split(model, dataset, dataset.task_rows(k), micro_batch_size=micro_batch_size, impl=impl)
        sums[k], counts[k] = part.sums[k], part.counts[k]
    return TaskLosses(list(dataset.tasks), sums, counts)


def check_compatible(model: torch.nn.Module, target: Target, dataset: PackedDataset) -> None:
    """Refuse data the model cannot score: token ids past its vocabulary, or a CGC-LoRA run's tasks in
    another order (its gates are chosen by task id)."""
    vocab = causal_lm(model).get_input_embeddings().num_embeddings
    if dataset.vocab_size > vocab:
        raise UserError(f"{dataset.path}: prepared with a {dataset.vocab_size}-token vocabulary, but the model has "
                        f"{vocab} embeddings (another tokenizer?)")
    trained = run_tasks(target)
    if is_cgc(model) and trained is not None and trained != list(dataset.tasks):
        raise UserError(f"{dataset.path}: tasks {list(dataset.tasks)} differ from the CGC-LoRA run's {trained}; its "
                        "gates are per task id, so evaluate data prepared with the run's tasks")
