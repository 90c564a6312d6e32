"""Resume on another number of ranks under ZeRO 1-3 (``training/universal.py``): a run of 2 ranks resumed on 1,
and a run of 1 rank resumed on 2, from the checkpoint of step 2, train steps 3-4 with the losses, held-out losses
and weights of the uninterrupted run; the conversion is cached in the checkpoint, verified and logged.

Tolerance: rel 1e-5 on losses (1e-3 on CoBa's weights), the one used between 1- and 2-rank runs elsewhere
(``test_launchers``): the same global batch is summed over another split into ranks, so float32 sums round
differently (~1e-7 relative per step), and CoBa's slope fit and softmax amplify that in the weights."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from train_helpers import (
    REPO,
    assert_same_run,
    cpu_env,
    read_metrics,
    run_config,
    run_data,
    single_thread,
    write_config,
)

from mftcoder_coba.training import train
from mftcoder_coba.training.checkpoint import checkpoint_problem

SECTIONS = {"train": {"max_steps": 4, "save_every": 2, "keep_last": 2, "micro_batch_size": 1,
                      "global_batch_size": 4, "tensorboard": False},
            "balancer": {"name": "coba", "update_interval": 1}}


def _sections(zero: int) -> dict:
    return {**SECTIONS, "train": {**SECTIONS["train"], "zero_stage": zero}}


def _two_ranks(config: Path, *args: str) -> str:
    proc = subprocess.run(["bash", str(REPO / "launch" / "single_node.sh"), "2", "--config", str(config), *args],
                          cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout + proc.stderr


def _resumable_copy(run_dir: Path, copy: Path) -> None:
    """``run_dir`` as it was after step 2: its step-2 checkpoint newest (the later one dropped)."""
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "checkpoints" / "step-00000004")


@pytest.mark.distributed
@pytest.mark.parametrize("zero", [1, 2, 3])
def test_resume_on_another_world_size(prepared: Path, tmp_path: Path, zero: int) -> None:
    # 2 -> 1: the 2-rank run is the reference; its step-2 checkpoint resumed in one process
    two = tmp_path / "two"
    _two_ranks(write_config(tmp_path / "two.json", run_data(prepared, two, **_sections(zero))))
    _resumable_copy(two, tmp_path / "two_to_one")
    with single_thread():
        train(run_config(prepared, tmp_path / "two_to_one", **_sections(zero)), resume="auto")
    universal = tmp_path / "two_to_one" / "checkpoints" / "step-00000002" / "universal"
    assert (universal / "files.json").is_file() and checkpoint_problem(universal) is None
    assert_same_run(read_metrics(tmp_path / "two_to_one"), read_metrics(two), rel=1e-5, weights_rel=1e-3)

    # 1 -> 2: the 1-rank run is the reference; its step-2 checkpoint resumed on 2 ranks
    one = tmp_path / "one"
    with single_thread():
        train(run_config(prepared, one, **_sections(zero)))
    _resumable_copy(one, tmp_path / "one_to_two")
    config = write_config(tmp_path / "one_to_two.json", run_data(prepared, tmp_path / "one_to_two", **_sections(zero)))
    output = _two_ranks(config, "--resume", "auto")
    assert "resuming 1-rank ZeRO state on 2 ranks: converted with DeepSpeed's ds_to_universal" in output
    assert_same_run(read_metrics(tmp_path / "one_to_two"), read_metrics(one), rel=1e-5, weights_rel=1e-3)
