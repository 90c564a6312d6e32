"""The resume policy: lengths, cadences and reporting may change on resume; model, adapter, data, balancer and
optimizer fields may not, and are refused in one line naming the field before config.yaml is rewritten."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from train_helpers import read_metrics, run_config

from mftcoder_coba import config_io
from mftcoder_coba.errors import ConfigError
from mftcoder_coba.training import resume_policy, train

UNIFORM = {"name": "uniform", "options": {}}


def _recorded(prepared: Path, run_dir: Path) -> None:
    """run_dir/config.yaml as a first start of the default test run writes it."""
    run_dir.mkdir(parents=True)
    data = config_io.to_dict(run_config(prepared, run_dir, balancer=UNIFORM))
    (run_dir / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


@pytest.mark.parametrize(("sections", "field"), [
    ({"optim": {"lr": 0.5}}, "optim.lr"),
    ({"optim": {"betas": [0.9, 0.99]}}, "optim.betas"),
    ({"model": {"adapter": "lora"}}, "model.adapter"),
    ({"model": {"model_config": {"hidden_size": 64}}}, "model.model_config.hidden_size"),
    ({"balancer": {"name": "coba", "options": {}}}, "balancer.name"),
    ({"train": {"global_batch_size": 8}}, "train.global_batch_size"),
    ({"train": {"seed": 4}}, "train.seed"),
])
def test_a_fixed_field_changed_on_resume_is_refused_naming_it(prepared: Path, tmp_path: Path, sections: dict,
                                                              field: str) -> None:
    run_dir = tmp_path / "run"
    _recorded(prepared, run_dir)
    merged = {"balancer": UNIFORM, **sections}
    if "model" in sections:  # keep the rest of the test model; only the named field changes
        model = run_config(prepared, run_dir).model
        base = config_io.to_dict(model)
        extra = sections["model"]
        merged["model"] = {**base, **extra, "model_config": {**base["model_config"], **extra.get("model_config", {})}}
    cfg = run_config(prepared, run_dir, **merged)
    with pytest.raises(ConfigError) as caught:
        resume_policy.check(cfg, run_dir / "checkpoints" / "step-00000002")
    message = str(caught.value)
    assert message.startswith(f"config field '{field}':") and "\n" not in message
    assert "step-00000002" in message


def test_lengths_cadences_trackers_and_a_moved_run_dir_may_change(prepared: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _recorded(prepared, run_dir)
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    cfg = run_config(prepared, moved, balancer=UNIFORM, eval={"every": 2},
                     train={"max_steps": 40, "save_every": 5, "log_every": 2, "keep_last": 5, "micro_batch_size": 1,
                            "report_to": ["tensorboard"], "save_every_minutes": 1.5})
    assert resume_policy.changed_fields(yaml.safe_load((moved / "config.yaml").read_text()), cfg) == []
    resume_policy.check(cfg, moved / "checkpoints" / "step-00000002")


@pytest.mark.slow
def test_resume_refuses_a_new_lr_and_keeps_config_yaml_describing_what_ran(prepared: Path, tmp_path: Path) -> None:
    """`--resume auto optim.lr=0.5` used to train on near the old LR while config.yaml said 0.5."""
    run_dir = train(run_config(prepared, tmp_path / "run", balancer=UNIFORM,
                               train={"max_steps": 2, "save_every": 1, "tensorboard": False}))
    before = (run_dir / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"^config field 'optim\.lr': 0\.5 differs from 0\.003"):
        train(run_config(prepared, run_dir, balancer=UNIFORM, optim={"lr": 0.5},
                         train={"max_steps": 3, "save_every": 1, "tensorboard": False}), resume="auto")
    assert (run_dir / "config.yaml").read_text() == before
    train(run_config(prepared, run_dir, balancer=UNIFORM, train={"max_steps": 3, "save_every": 1,
                                                                 "tensorboard": False}), resume="auto")
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["max_steps"] == 3
    assert [r["step"] for r in read_metrics(run_dir) if r["step"] > 0] == [1, 2, 3]
