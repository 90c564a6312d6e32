"""Which rows a step and a held-out measurement read: the same global batch for any world size, epochs that
wrap, per-task held-out rows in rotation, and the held-out modes (rotate, fixed, all)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mftcoder_coba.data import PackedDataset
from mftcoder_coba.errors import ConfigError
from mftcoder_coba.training.sampling import DataPosition, GlobalBatches, HeldOutRotation, HeldOutSample


def test_global_batch_is_the_same_for_any_world_size_and_epochs_wrap(prepared: Path) -> None:
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
    epoch_1 = np.random.default_rng([3, 1]).permutation(len(dataset))  # pinned: a checkpoint's position indexes it
    np.testing.assert_array_equal(seen[-1], epoch_1[:8])
    assert one.state_dict() == {"epoch": 1, "index": 8}
    resumed = GlobalBatches(dataset, 8, 2, rank=1, world_size=2, seed=3)  # a position resumes on any world size
    resumed.load_state_dict(json.loads(json.dumps(one.state_dict())))
    np.testing.assert_array_equal(resumed.next_global_batch(), one.next_global_batch())


def test_held_out_rows_are_stratified_and_rotate(prepared: Path) -> None:
    valid = PackedDataset(prepared / "valid")
    rotation = HeldOutRotation(valid, seed=0)
    tasks_of = {int(r): int(valid.rows(np.array([r]))["task_ids"].max()) for r in range(len(valid))}
    for update in range(1, 6):
        rows = rotation.sample(update, 2)
        assert sorted(tasks_of[int(r)] for r in rows) == sorted(t for t in range(len(valid.tasks)) for _ in range(2))
    for rows in rotation.task_rows:  # over enough updates every row of every task is read
        read = np.concatenate([rotation.sample(u, 1) for u in range(1, len(rows) + 1)])
        assert set(rows.tolist()) <= set(read.tolist())
    assert len(rotation.initial(None)) == len(valid) and len(rotation.initial(1)) == len(valid.tasks)


def test_held_out_modes_read_the_same_rows_for_the_reference_and_the_updates(prepared: Path) -> None:
    valid = PackedDataset(prepared / "valid")
    rotation = HeldOutRotation(valid, seed=0)
    fixed = HeldOutSample(valid, 0, "fixed", rows_per_task=2)
    every = HeldOutSample(valid, 0, "all", rows_per_task=2)
    rotate = HeldOutSample(valid, 0, "rotate", rows_per_task=2)
    np.testing.assert_array_equal(fixed.initial(), rotation.initial(2))  # stratified: 2 rows of every task
    for update in range(1, 6):
        np.testing.assert_array_equal(fixed.sample(update), fixed.initial())
        np.testing.assert_array_equal(every.sample(update), np.concatenate(rotation.task_rows))
        np.testing.assert_array_equal(rotate.sample(update), rotation.sample(update, 2))
    np.testing.assert_array_equal(every.initial(), every.sample(1))
    assert sorted(rotate.initial().tolist()) == list(range(len(valid)))  # the population the rotation samples
    np.testing.assert_array_equal(HeldOutSample(valid, 0, "rotate", 2, initial_rows_per_task=3).initial(),
                                  rotation.initial(3))
    assert not np.array_equal(HeldOutSample(valid, 1, "fixed", 2).initial(), fixed.initial())  # seeded
    with pytest.raises(ValueError, match="rotate mode only"):
        HeldOutSample(valid, 0, "fixed", 2, initial_rows_per_task=3)


def test_fixed_rows_come_back_from_the_checkpoint_and_modes_must_match(prepared: Path) -> None:
    valid = PackedDataset(prepared / "valid")
    saved = HeldOutSample(valid, 0, "fixed", rows_per_task=2)
    state = json.loads(json.dumps(saved.state_dict()))
    resumed = HeldOutSample(valid, 5, "fixed", rows_per_task=1)  # another seed and size: the checkpoint wins
    resumed.load_state_dict(state)
    np.testing.assert_array_equal(resumed.sample(7), saved.initial())
    np.testing.assert_array_equal(resumed.initial(), saved.initial())
    with pytest.raises(ConfigError, match="'balancer.held_out'.*'fixed'.*'rotate'"):
        HeldOutSample(valid, 0, "rotate", 2).load_state_dict(state)
    with pytest.raises(ConfigError, match="held_out=rotate to resume"):
        HeldOutSample(valid, 0, "fixed", 2).load_state_dict(None)  # a checkpoint from before the modes
    rotate = HeldOutSample(valid, 0, "rotate", 2)
    rotate.load_state_dict(None)
    np.testing.assert_array_equal(rotate.sample(3), HeldOutRotation(valid, 0).sample(3, 2))


def test_initial_rows_per_task_is_refused_outside_rotate() -> None:
    from mftcoder_coba.config import BalancerConfig

    assert BalancerConfig().held_out == "fixed"  # chosen by benchmarks/coba_signal (README, CoBa section)
    BalancerConfig(held_out="rotate", initial_rows_per_task=3).validate()
    BalancerConfig(held_out="fixed").validate()
    with pytest.raises(ConfigError, match="'balancer.initial_rows_per_task'.*rotate only"):
        BalancerConfig(held_out="fixed", initial_rows_per_task=3).validate()
