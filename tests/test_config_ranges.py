"""Single-field ranges of the model, CGC-LoRA and ColD Fusion configs are declared once with
``config_io.bounded``: the loader refuses a value out of range with one line naming the field, and a config
built in code is refused the same way when it is validated (``apply_cgc_lora``, ``run_cold_fusion``)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mftcoder_coba import config_io
from mftcoder_coba.config_io import RANGE
from mftcoder_coba.errors import ConfigError
from mftcoder_coba.fusion import FusionConfig
from mftcoder_coba.models.cgc_config import CgcLoraConfig
from mftcoder_coba.models.config import LoraOptions, ModelConfig

MODEL = {"model_config": {"model_type": "llama"}}


@pytest.mark.parametrize(("section", "message"), [
    ({"lora": {"r": 0}}, "config field 'model.lora.r': must be > 0, got 0"),
    ({"lora": {"alpha": -1.0}}, "config field 'model.lora.alpha': must be > 0, got -1.0"),
    ({"lora": {"dropout": 1.0}}, "config field 'model.lora.dropout': must be in [0, 1), got 1.0"),
    ({"cgc_lora": {"num_common_experts": -1}},
     "config field 'model.cgc_lora.num_common_experts': must be >= 0, got -1"),
    ({"cgc_lora": {"rank_budget": 0}}, "config field 'model.cgc_lora.rank_budget': must be >= 1, got 0"),
    ({"cgc_lora": {"expert_rank": 0}},
     "config field 'model.cgc_lora.expert_rank': must be >= 1 or null, got 0"),
    ({"cgc_lora": {"dropout": 1.5}}, "config field 'model.cgc_lora.dropout': must be in [0, 1), got 1.5"),
    ({"cgc_lora": {"task_embedding_dim": 0}},
     "config field 'model.cgc_lora.task_embedding_dim': must be >= 1, got 0"),
])
def test_model_ranges_name_the_field(section: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_io.build(ModelConfig, {**MODEL, **section}, prefix="model.")
    assert str(caught.value) == message


def test_ranges_are_declared_on_the_fields() -> None:
    ranged = {f"{cls.__name__}.{f.name}" for cls in (LoraOptions, CgcLoraConfig, FusionConfig)
              for f in dataclasses.fields(cls) if RANGE in f.metadata}
    assert ranged == {"LoraOptions.r", "LoraOptions.alpha", "LoraOptions.dropout",
                      "CgcLoraConfig.num_common_experts", "CgcLoraConfig.num_task_experts",
                      "CgcLoraConfig.rank_budget", "CgcLoraConfig.expert_rank", "CgcLoraConfig.alpha",
                      "CgcLoraConfig.dropout", "CgcLoraConfig.task_embedding_dim",
                      "FusionConfig.iterations", "FusionConfig.unseen_steps", "FusionConfig.eval_rows_per_task",
                      "FusionConfig.eval_micro_batch_size"}


def test_a_cgc_config_built_in_code_is_range_checked_when_validated() -> None:
    with pytest.raises(ConfigError, match=r"^config field 'model.cgc_lora.alpha': must be > 0, got 0$"):
        CgcLoraConfig(alpha=0).validate()
    with pytest.raises(ConfigError, match="num_common_experts \\+ num_task_experts >= 1"):  # a rule between fields
        CgcLoraConfig(num_common_experts=0, num_task_experts=0).validate()


def _fusion(tmp_path: Path, **fields) -> dict:
    return {"run_dir": str(tmp_path / "run"), "template": {}, **fields,
            "contributors": [{"name": "a", "train": str(tmp_path / "a"), "valid": str(tmp_path / "a")}]}


@pytest.mark.parametrize(("fields", "message"), [
    ({"iterations": 0}, "config field 'iterations': must be >= 1, got 0"),
    ({"unseen_steps": 0}, "config field 'unseen_steps': must be >= 1, got 0"),
    ({"eval_rows_per_task": 0}, "config field 'eval_rows_per_task': must be >= 1 or null, got 0"),
    ({"eval_micro_batch_size": 0}, "config field 'eval_micro_batch_size': must be >= 1, got 0"),
    ({"contributors_per_iteration": 2}, "config field 'contributors_per_iteration': must be between 1 and the 1 "
                                        "contributors, or null; got 2"),
])
def test_fusion_ranges_name_the_field(tmp_path: Path, fields: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_io.build(FusionConfig, _fusion(tmp_path, **fields))
    assert str(caught.value) == message
    built = config_io.build(FusionConfig, _fusion(tmp_path))
    with pytest.raises(ConfigError) as again:  # built in code, checked by run_cold_fusion's validate()
        dataclasses.replace(built, **fields).validate()
    assert str(again.value) == message
