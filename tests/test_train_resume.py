"""A run killed by SIGKILL after a checkpoint appeared, resumed with ``--resume auto``, logs the same per-step
losses, held-out losses and CoBa weights as one uninterrupted run."""
from __future__ import annotations

from pathlib import Path

import pytest
from train_helpers import (
    assert_same_run,
    cli,
    kill_once_written,
    read_metrics,
    run_config,
    run_data,
    single_thread,
    write_config,
)

from mftcoder_coba.training import train


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_metrics(prepared: Path, tmp_path: Path) -> None:
    sections = {"train": {"max_steps": 24, "save_every": 3, "keep_last": 2, "tensorboard": False},
                "balancer": {"update_interval": 2}}
    data = run_data(prepared, tmp_path / "killed", **sections)
    config = write_config(tmp_path / "run.json", data)

    first = tmp_path / "killed" / "checkpoints" / "step-00000003"
    kill_once_written(cli("train", "--config", str(config)), first)
    assert first.is_dir() and not (tmp_path / "killed" / "checkpoints" / "step-00000024").exists()

    resumed = cli("train", "--config", str(config), "--resume", "auto")
    output, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, output[-2000:]
    assert "resumed from" in output

    with single_thread():
        straight = train(run_config(prepared, tmp_path / "straight", **sections))
    assert_same_run(read_metrics(tmp_path / "killed"), read_metrics(straight), rel=1e-6)
