"""``model.dtype: fp16`` (issue 23, item 7): DeepSpeed's fp16 with dynamic loss scaling and fp32 masters, for
GPUs without bf16; a short run follows the fp32 run of the same model and data (on a GPU: DeepSpeed's CPU
accelerator has no fp16, and a CPU run is refused in one line)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from train_helpers import read_metrics, run_config

from mftcoder_coba.errors import ConfigError
from mftcoder_coba.training import ds_config, preflight, train

UNIFORM = {"name": "uniform", "options": {}}


def test_fp16_config_has_dynamic_loss_scaling(prepared: Path, tmp_path: Path) -> None:
    cfg = run_config(prepared, tmp_path / "run", model={"dtype": "fp16"}, balancer=UNIFORM)
    ds = ds_config.build(cfg, 1, on_cuda=False)
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    assert ds["bf16"]["enabled"] is False and "data_types" not in ds
    with pytest.raises(ConfigError, match=r"^config field 'model.dtype': 'fp16' needs a CUDA GPU"):
        preflight.run(cfg, world_size=1, resume=None, on_cuda=False)


@pytest.mark.gpu
@pytest.mark.slow
def test_fp16_run_follows_the_fp32_run(prepared: Path, tmp_path: Path) -> None:
    losses = {}
    for dtype in ("fp32", "fp16"):
        cfg = run_config(prepared, tmp_path / dtype, model={"dtype": dtype}, balancer=UNIFORM,
                         train={"max_steps": 3, "tensorboard": False})
        losses[dtype] = [r["loss"] for r in read_metrics(train(cfg)) if r["step"] > 0]
    np.testing.assert_allclose(losses["fp16"], losses["fp32"], rtol=1e-2)
