"""Which rows each rank reads at each optimizer step, and which held-out rows each balancer update reads.

Training order: one global shuffled order of all rows per epoch (a permutation seeded by ``train.seed`` and
the epoch). Step ``s`` takes the next ``global_batch_size`` rows of it;
rank ``r`` of ``W`` takes the r-th contiguous slice, cut into micro-batches. The global batch of a step is
therefore the same for any world size, which is what lets a 2-rank run reproduce a 1-rank run exactly (and a
run resume on a different number of ranks). The rows left over at the end of an epoch (fewer than a global
batch) are skipped; the position (epoch, index) is part of the checkpoint.

Held-out samples (``balancer.held_out``): for each task, its held-out rows in a fixed seeded order
(stratified: every task is measured at every update). ``rotate`` reads that order in rotation
(``valid_rows_per_task`` per update; over time every row is used); ``fixed`` reads the first
``valid_rows_per_task`` rows of each task at every update; ``all`` reads every held-out row. The reference
losses L_k(0) come from the same rows as the later observations: the fixed rows, every row, or for
``rotate`` the rows it cycles through (all, or the first ``initial_rows_per_task`` of each task's order as a
cheaper estimate of their mean). Why ``fixed``: with the same rows at every update, ``L_k(s) - L_k(s')`` is the
model's change alone, while a rotating sample adds the difference between samples to every slope CoBa fits.
The fixed rows are part of the checkpoint, so a resumed run measures the same rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mftcoder_coba.data import PackedDataset
from mftcoder_coba.errors import ConfigError

HELD_OUT_MODES = ("rotate", "fixed", "all")


@dataclass
class DataPosition:
    """Where the next global batch starts: epoch number and row index within that epoch's order."""

    epoch: int = 0
    index: int = 0


class GlobalBatches:
    """The rows of successive global batches, sliced for one rank and cut into micro-batches."""

    def __init__(self, dataset: PackedDataset, global_batch_size: int, micro_batch_size: int,
                 rank: int, world_size: int, seed: int) -> None:
        if len(dataset) < global_batch_size:
            raise ValueError(f"{len(dataset)} rows cannot fill one global batch of {global_batch_size}")
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.position = DataPosition()
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset)).astype(np.int64)
            self._order_epoch = epoch
        return self._order

    def next_global_batch(self) -> np.ndarray:
        """Row indices of the next step's whole global batch (the same on every rank); advances the position."""
        if self.position.index + self.global_batch_size > len(self.dataset):
            self.position = DataPosition(self.position.epoch + 1, 0)
        start = self.position.index
        batch = self._epoch_order(self.position.epoch)[start:start + self.global_batch_size]
        self.position = DataPosition(self.position.epoch, start + self.global_batch_size)
        return batch

    def micro_batches(self, global_batch: np.ndarray) -> list[np.ndarray]:
        """This rank's contiguous slice of ``global_batch``, cut into micro-batches."""
        per_rank = self.global_batch_size // self.world_size
        mine = global_batch[self.rank * per_rank:(self.rank + 1) * per_rank]
        return [mine[i:i + self.micro_batch_size] for i in range(0, per_rank, self.micro_batch_size)]

    def state_dict(self) -> dict[str, int]:
        """The data position (``{"epoch", "index"}``): where the next global batch starts."""
        return {"epoch": self.position.epoch, "index": self.position.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a :meth:`state_dict` (any world size: the global order does not depend on it)."""
        self.position = DataPosition(int(state["epoch"]), int(state["index"]))


class HeldOutRotation:
    """Stratified held-out samples: per task a fixed seeded order of its rows, read in rotation."""

    def __init__(self, dataset: PackedDataset, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.dataset = dataset
        self.task_rows = [rng.permutation(dataset.task_rows(t)) for t in range(len(dataset.tasks))]

    def initial(self, rows_per_task: int | None) -> np.ndarray:
        """Rows for the reference losses L_k(0): the first ``rows_per_task`` of each task (all if None)."""
        return np.concatenate([rows[:rows_per_task] for rows in self.task_rows]).astype(np.int64)

    def sample(self, update: int, rows_per_task: int) -> np.ndarray:
        """Rows of update number ``update`` (1, 2, ...): the next ``rows_per_task`` of each task, wrapping
        (never more than a task has)."""
        picked = []
        for rows in self.task_rows:
            if len(rows):
                count = min(rows_per_task, len(rows))
                start = (update - 1) * count
                picked.append(rows[np.arange(start, start + count) % len(rows)])
        return np.concatenate(picked).astype(np.int64) if picked else np.empty(0, dtype=np.int64)


class HeldOutSample:
    """The held-out rows of L_k(0) and of each update under one ``balancer.held_out`` mode."""

    def __init__(self, dataset: PackedDataset, seed: int, mode: str, rows_per_task: int,
                 initial_rows_per_task: int | None = None) -> None:
        if mode not in HELD_OUT_MODES:
            raise ValueError(f"held-out mode must be one of {HELD_OUT_MODES}, got {mode!r}")
        if mode != "rotate" and initial_rows_per_task is not None:
            raise ValueError("initial_rows_per_task applies to the rotate mode only")
        self.mode = mode
        self.rows_per_task = rows_per_task
        self.rotation = HeldOutRotation(dataset, seed)
        self._initial = self.rotation.initial(initial_rows_per_task if mode == "rotate" else None)
        self.fixed = self.rotation.initial(rows_per_task) if mode == "fixed" else None

    def initial(self) -> np.ndarray:
        """Rows of the reference losses L_k(0): the same rows the updates observe (see the module docstring)."""
        return self.fixed if self.fixed is not None else self._initial

    def sample(self, update: int) -> np.ndarray:
        """Rows of update number ``update`` (1, 2, ...)."""
        if self.mode == "rotate":
            return self.rotation.sample(update, self.rows_per_task)
        return self.initial()

    def state_dict(self) -> dict[str, Any]:
        """Mode and, for ``fixed``, the rows (plain JSON data for the checkpoint)."""
        return {"mode": self.mode, "rows": None if self.fixed is None else self.fixed.tolist()}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Measure what the checkpoint's run measured; ``None`` (a checkpoint from before the modes) is ``rotate``.

        A different mode is refused: L_k(0) and the observations so far came from the checkpoint's rows."""
        state = state or {"mode": "rotate", "rows": None}
        if state["mode"] != self.mode:
            raise ConfigError(f"config field 'balancer.held_out': the checkpoint measured held-out loss with "
                              f"{state['mode']!r}, the config asks for {self.mode!r} (set "
                              f"balancer.held_out={state['mode']} to resume)")
        if state["rows"] is not None:
            self.fixed = np.asarray(state["rows"], dtype=np.int64)
