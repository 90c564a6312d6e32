"""Defaults a user expects (issue 23, item 6): periodic checkpoints, and ``model.dtype: auto`` that trains bf16
only where the device computes in it (fp32 on CPU), recorded as the concrete dtype the run used."""
from __future__ import annotations

from pathlib import Path

import torch
from train_helpers import run_config

from mftcoder_coba import config_io
from mftcoder_coba.config import RunConfig
from mftcoder_coba.models.build import torch_dtype
from mftcoder_coba.models.config import concrete_dtype
from mftcoder_coba.training import preflight


def test_defaults_checkpoint_periodically_and_pick_the_dtype(tmp_path: Path) -> None:
    cfg = config_io.build(RunConfig, {"run_dir": str(tmp_path / "run"), "data": {"train": str(tmp_path / "t")},
                                      "model": {"model_config": {"model_type": "llama"}}})
    assert cfg.train.save_every > 0 and cfg.train.save_every < cfg.train.max_steps * 10
    assert cfg.model.dtype == "auto"
    assert concrete_dtype("auto", on_cuda=False) == "fp32"
    assert concrete_dtype("bf16", on_cuda=False) == "bf16" and concrete_dtype("fp32", on_cuda=True) == "fp32"
    expected = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    assert concrete_dtype("auto", on_cuda=True) == expected
    assert torch_dtype(cfg.model) == {"bf16": torch.bfloat16, "fp32": torch.float32}[
        concrete_dtype("auto", torch.cuda.is_available())]


def test_a_cpu_run_with_dtype_auto_trains_and_records_fp32(prepared: Path, tmp_path: Path) -> None:
    cfg = run_config(prepared, tmp_path / "run", model={"dtype": "auto"}, balancer={"name": "uniform", "options": {}})
    preflight.run(cfg, world_size=1, resume=None, on_cuda=False)
    assert cfg.model.dtype == "fp32"  # what config.yaml and the DeepSpeed config then see
