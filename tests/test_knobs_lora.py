"""DoRA and rsLoRA reach peft (issue 23, item 7): ``model.lora.use_dora`` adds the magnitude vectors,
``use_rslora`` scales the update by alpha / sqrt(r); both survive a run's reload."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from train_helpers import run_config

from mftcoder_coba.models import build_model, causal_lm, load_trained
from mftcoder_coba.training import train


def _lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in causal_lm(model).modules() if hasattr(m, "lora_A") and "default" in m.lora_A]


def test_dora_and_rslora_options_build_peft_adapters(prepared: Path, tmp_path: Path) -> None:
    for use_dora, use_rslora in ((False, False), (True, False), (False, True)):
        cfg = run_config(prepared, tmp_path / "run", model={"adapter": "lora",
                                                            "lora": {"r": 4, "alpha": 8.0, "use_dora": use_dora,
                                                                     "use_rslora": use_rslora}})
        layers = _lora_layers(build_model(cfg.model, 128, 1))
        assert layers
        for layer in layers:
            assert ("default" in layer.lora_magnitude_vector) is use_dora
            assert layer.scaling["default"] == pytest.approx(8.0 / (math.sqrt(4) if use_rslora else 4))


@pytest.mark.slow
def test_a_dora_run_reloads_with_its_magnitudes(prepared: Path, tmp_path: Path) -> None:
    cfg = run_config(prepared, tmp_path / "run", model={"adapter": "lora", "lora": {"use_dora": True}},
                     balancer={"name": "uniform", "options": {}}, train={"max_steps": 1, "tensorboard": False})
    run_dir = train(cfg)
    model = load_trained(run_dir, run_dir / "checkpoints" / "step-00000001" / "model")
    assert all("default" in layer.lora_magnitude_vector for layer in _lora_layers(model))
