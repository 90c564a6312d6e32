"""What a checkpoint's trainer_state.json and rng files carry: each component's ``state_dict()`` under its
name, collected and restored by :mod:`mftcoder_coba.training.checkpoint`, and checkpoints written before a
component existed still resume (without a GPU, engine or process group)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from mftcoder_coba.balancers import build_balancer
from mftcoder_coba.data import PackedDataset
from mftcoder_coba.errors import ConfigError
from mftcoder_coba.training import checkpoint
from mftcoder_coba.training.best import MetricWatch
from mftcoder_coba.training.rng import ProcessRNG
from mftcoder_coba.training.sampling import GlobalBatches, HeldOutSample


def _components(prepared: Path, held_out: str = "fixed") -> dict:
    return {"data_position": GlobalBatches(PackedDataset(prepared / "train"), 8, 2, rank=0, world_size=1, seed=1),
            "balancer": build_balancer("coba", 3, {"history_length": 4, "warmup_steps": 1}),
            "held_out": HeldOutSample(PackedDataset(prepared / "valid"), 0, held_out, rows_per_task=2),
            "keep_best": MetricWatch("valid.mean"), "early_stopping": None}


def test_components_round_trip_through_trainer_state_json(prepared: Path) -> None:
    saved = _components(prepared)
    for _ in range(3):
        saved["data_position"].next_global_batch()
    for step in range(4):
        saved["balancer"].observe(step, losses=[2.0 - 0.1 * step, 1.5, 1.0 + 0.05 * step])
    saved["keep_best"].observe(2, 1.25)
    state = json.loads(json.dumps(checkpoint.trainer_state(4, saved, {"skipped_steps": 1})))
    assert state["step"] == 4 and state["skipped_steps"] == 1 and state["early_stopping"] is None
    assert state["data_position"] == {"epoch": 0, "index": 24} and state["held_out"]["mode"] == "fixed"

    resumed = _components(prepared)
    checkpoint.restore(state, resumed)
    np.testing.assert_array_equal(resumed["data_position"].next_global_batch(),
                                  saved["data_position"].next_global_batch())
    np.testing.assert_array_equal(resumed["balancer"].weights(), saved["balancer"].weights())
    np.testing.assert_array_equal(resumed["held_out"].sample(5), saved["held_out"].sample(5))
    assert resumed["keep_best"] == saved["keep_best"]


def test_a_checkpoint_from_before_the_held_out_modes_and_watches_still_resumes(prepared: Path) -> None:
    """trainer_state.json as the trainer wrote it before ``held_out``, ``keep_best`` and ``early_stopping``
    (and the counters of ``train.nonfinite``) existed: the sample rotates as it did then, the watch starts fresh."""
    balancer = build_balancer("coba", 3, {"history_length": 4, "warmup_steps": 1})
    balancer.observe(0, losses=[2.0, 1.5, 1.0])
    old = {"step": 6, "data_position": {"epoch": 1, "index": 16}, "balancer": balancer.state_dict(),
           "update_weights": [1.0, 1.0, 1.0], "world_size": 2, "tasks": ["a", "b", "c"]}
    parts = _components(prepared, held_out="rotate")
    checkpoint.restore(old, parts)
    assert parts["data_position"].state_dict() == {"epoch": 1, "index": 16}
    assert parts["held_out"].state_dict() == {"mode": "rotate", "rows": None}
    assert parts["keep_best"] == MetricWatch("valid.mean")
    np.testing.assert_array_equal(parts["balancer"].weights(), balancer.weights())
    with pytest.raises(ConfigError, match="'balancer.held_out'.*'rotate'.*'fixed'"):
        checkpoint.restore(old, _components(prepared, held_out="fixed"))


def test_process_rng_state_restores_every_generator() -> None:
    rng = ProcessRNG()
    rng.seed(7)
    state = json.loads(json.dumps(rng.state_dict()))
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    rng.seed(8)
    rng.load_state_dict(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first
