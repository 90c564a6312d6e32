"""What the console shows (issue 23, item 5): readable parameter counts, a gradient norm with sensible digits,
and a compact per-task held-out / eval line at each measurement."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
from train_helpers import run_config

from mftcoder_coba.models.build import readable_count
from mftcoder_coba.training import train
from mftcoder_coba.training.metrics import measurement_line, step_line


def test_parameter_counts_keep_three_digits_at_every_size() -> None:
    assert [readable_count(n) for n in (512, 20_480, 4_560_000, 1_234_567_890)] == ["512", "20.5K", "4.56M", "1.23B"]


def test_step_and_measurement_lines() -> None:
    record = {"step": 7, "loss": 2.345678, "lr": 3e-4, "grad_norm": 0.12345678901234, "tokens_per_s": 1234.5,
              "weights": {"a": 0.25, "b": 0.75}}
    assert step_line(record, 10, steps_per_epoch=2.5) == \
        "step 7/10 epoch 2.80 loss 2.3457 lr 0.0003 grad_norm 0.1235 tokens/s 1234 weights a=0.250 b=0.750"
    assert measurement_line(record) is None
    record |= {"valid_loss": {"a": 1.5, "b": None}, "eval_loss": {"a": 2.0, "b": 3.0}, "eval_mean": 2.5,
               "eval_worst": 3.0}
    assert measurement_line(record) == \
        "step 7 valid a=1.5000 b=- | eval a=2.0000 b=3.0000 (mean 2.5000, worst 3.0000)"


@pytest.mark.slow
def test_a_lora_run_prints_its_counts_and_each_held_out_measurement(prepared: Path, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    cfg = run_config(prepared, tmp_path / "run", model={"adapter": "lora"},
                     balancer={"name": "coba", "options": {"warmup_steps": 1, "history_length": 4},
                               "update_interval": 2},
                     train={"max_steps": 2, "tensorboard": False})
    with caplog.at_level(logging.INFO):
        train(cfg)
    counts = [m for m in caplog.messages if m.startswith("model: ")]
    assert counts and "0.00M" not in counts[0] and "K trainable" in counts[0], counts
    measured = [m for m in caplog.messages if " valid " in m and m.startswith("step ")]
    assert [m.split()[1] for m in measured] == ["0", "2"], measured
