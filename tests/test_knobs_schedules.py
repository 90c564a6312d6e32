"""LR schedules ``linear`` and warmup-stable-decay beside cosine/constant, and ``optim.warmup_ratio``
(issue 23, item 7), against the schedules written out by hand."""
from __future__ import annotations

from pathlib import Path

import pytest

from mftcoder_coba import config_io
from mftcoder_coba.config import OptimConfig, RunConfig
from mftcoder_coba.errors import ConfigError
from mftcoder_coba.training.ds_config import lr_factor


def _factors(max_steps: int = 20, **optim: object) -> list[float]:
    cfg = config_io.build(OptimConfig, {"min_lr_ratio": 0.1, **optim}, prefix="optim.")
    return [lr_factor(s, cfg, max_steps) for s in range(max_steps)]


def test_warmup_ratio_then_linear_decay() -> None:
    got = _factors(warmup_ratio=0.1, schedule="linear")  # 2 warm-up steps of 20
    want = [0.5, 1.0] + [0.1 + 0.9 * (1 - (s - 2) / 17) for s in range(2, 20)]
    assert got == pytest.approx(want, rel=1e-12)
    assert got[-1] == pytest.approx(0.1)


def test_warmup_stable_decay() -> None:
    got = _factors(warmup_steps=2, schedule="wsd", decay_ratio=0.25)  # the last 5 of 20 steps decay
    want = [0.5] + [1.0] * 14 + [0.1 + 0.9 * (1 - (s - 15) / 4) for s in range(15, 20)]
    assert got == pytest.approx(want, rel=1e-12)


def test_warmup_steps_and_ratio_together_are_refused(tmp_path: Path) -> None:
    data = {"run_dir": str(tmp_path / "r"), "data": {"train": str(tmp_path / "t")},
            "model": {"model_config": {"model_type": "llama"}}, "optim": {"warmup_steps": 3, "warmup_ratio": 0.1}}
    with pytest.raises(ConfigError, match=r"^config field 'optim.warmup_ratio': set either warmup_steps"):
        config_io.build(RunConfig, data)
