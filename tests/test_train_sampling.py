"""Which rows a step and a held-out measurement read: the same global batch for any world size, epochs that
wrap, and per-task held-out rows in rotation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from train_fixtures import prepared  # noqa: F401  (fixture)

from mftcoder_coba.data import PackedDataset
from mftcoder_coba.training.sampling import DataPosition, GlobalBatches, HeldOutRotation


def test_global_batch_is_the_same_for_any_world_size_and_epochs_wrap(prepared: Path) -> None:  # noqa: F811
    dataset = PackedDataset(prepared / "train")
    steps_per_epoch = len(dataset) // 8
    one = GlobalBatches(dataset, 8, 2, rank=0, world_size=1, seed=3)
    ranks = [GlobalBatches(dataset, 8, 2, rank=r, world_size=2, seed=3) for r in range(2)]
    seen = []
    for _ in range(steps_per_epoch + 1):
        whole = one.next_global_batch()
        micro = one.micro_batches(whole)
        assert [len(m) for m in micro] == [2, 2, 2, 2]
        per_rank = []
        for sampler in ranks:
            np.testing.assert_array_equal(sampler.next_global_batch(), whole)
            per_rank.append(np.concatenate(sampler.micro_batches(whole)))
        np.testing.assert_array_equal(np.concatenate(per_rank), np.concatenate(micro))
        seen.append(whole)
    first_epoch = np.concatenate(seen[:steps_per_epoch])
    assert len(np.unique(first_epoch)) == len(first_epoch)  # no row twice within an epoch
    assert one.position == DataPosition(epoch=1, index=8)
    np.testing.assert_array_equal(seen[-1], dataset.rank_order(1, 0, 1, 3)[:8])
    resumed = GlobalBatches(dataset, 8, 2, rank=0, world_size=1, seed=3, position=DataPosition(1, 8))
    np.testing.assert_array_equal(resumed.next_global_batch(), one.next_global_batch())


def test_held_out_rows_are_stratified_and_rotate(prepared: Path) -> None:  # noqa: F811
    valid = PackedDataset(prepared / "valid")
    rotation = HeldOutRotation(valid, seed=0)
    tasks_of = {int(r): int(valid.rows(np.array([r]))["task_ids"].max()) for r in range(len(valid))}
    for update in range(1, 6):
        rows = rotation.sample(update, 2)
        assert sorted(tasks_of[int(r)] for r in rows) == sorted(t for t in range(len(valid.tasks)) for _ in range(2))
    for t, rows in enumerate(rotation.task_rows):  # over enough updates every row of every task is read
        read = np.concatenate([rotation.sample(u, 1) for u in range(1, len(rows) + 1)])
        assert set(rows.tolist()) <= set(read.tolist())
    assert len(rotation.initial(None)) == len(valid) and len(rotation.initial(1)) == len(valid.tasks)
