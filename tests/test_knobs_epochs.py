"""``train.num_epochs`` (issue 23, item 7): the steps are counted from the training rows when the run starts
and recorded as ``max_steps``; every step line says the epoch."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import yaml
from train_helpers import read_metrics, run_config

from mftcoder_coba.data import PackedDataset
from mftcoder_coba.training import preflight, train


def test_num_epochs_sets_max_steps_from_the_rows(prepared: Path, tmp_path: Path) -> None:
    rows = len(PackedDataset(prepared / "train"))
    cfg = run_config(prepared, tmp_path / "run", train={"num_epochs": 1.5, "global_batch_size": 4})
    preflight.run(cfg, world_size=1, resume=None, on_cuda=False)
    assert cfg.train.max_steps == math.ceil(1.5 * rows / 4)


@pytest.mark.slow
def test_an_epoch_run_logs_the_epoch_and_records_its_steps(prepared: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    rows = len(PackedDataset(prepared / "train"))
    epochs = 8 / (rows / 4)  # 8 steps of 4 rows
    cfg = run_config(prepared, tmp_path / "run", balancer={"name": "uniform", "options": {}},
                     train={"num_epochs": epochs, "global_batch_size": 4, "tensorboard": False})
    with caplog.at_level(logging.INFO):
        run_dir = train(cfg)
    assert [r["step"] for r in read_metrics(run_dir) if r["step"] > 0] == list(range(1, 9))
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["max_steps"] == 8
    lines = [m for m in caplog.messages if m.startswith("step 8/8 epoch ")]
    assert lines and lines[0].split()[3] == f"{8 * 4 / rows:.2f}"
