"""Run configuration: typed loading, overrides, the DeepSpeed config and LR schedule built from it, and bad
configs refused by the CLI with one line before any process group or model exists."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from train_helpers import TINY_LLAMA, run_data, write_config

from mftcoder_coba import cli, config_io
from mftcoder_coba.config import DS_CONFIGS, RunConfig, load_run_config
from mftcoder_coba.errors import ConfigError
from mftcoder_coba.training import ds_config


def _minimal(tmp_path: Path) -> dict:
    return {"run_dir": str(tmp_path / "run"), "data": {"train": str(tmp_path / "train")},
            "model": {"model_config": dict(TINY_LLAMA)}}


def test_load_with_overrides_and_defaults(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_minimal(tmp_path)))
    cfg = load_run_config(path, ["train.max_steps=7", "optim.betas=[0.8, 0.9]", "balancer.options.tau=2.5",
                                 "train.fused_linear_ce=false"])
    assert cfg.train.max_steps == 7 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.balancer.name == "coba" and cfg.balancer.options == {"tau": 2.5}
    assert cfg.train.fused_linear_ce is False and cfg.train.zero_stage is None
    assert cfg.data.train == tmp_path / "train" and cfg.data.valid is None
    again = config_io.build(RunConfig, json.loads(json.dumps(config_io.to_dict(cfg))))
    assert again == cfg


@pytest.mark.parametrize(("override", "field"), [
    ("train.bogus=1", "train.bogus"),
    ("train.global_batch_size=6", "train.global_batch_size"),   # micro_batch_size 4 does not divide it
    ("train.zero_stage=4", "train.zero_stage"),
    ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio"),
    ("balancer.update_interval=0", "balancer.update_interval"),
    ("train.fused_linear_ce=maybe", "train.fused_linear_ce"),
    ("train.deepspeed_config=/nonexistent.json", "train.deepspeed_config"),
])
def test_bad_fields_name_the_field(tmp_path: Path, override: str, field: str) -> None:
    path = write_config(tmp_path / "run.json", _minimal(tmp_path))
    with pytest.raises(ConfigError, match=f"config field '{field}'"):
        load_run_config(path, ["train.micro_batch_size=4", "train.global_batch_size=8", override])


def test_lr_schedule_warmup_cosine_floor(tmp_path: Path) -> None:
    optim = config_io.build(RunConfig, {**_minimal(tmp_path), "optim": {"warmup_steps": 2, "min_lr_ratio": 0.1}}).optim
    factors = [ds_config.lr_factor(s, optim, max_steps=7) for s in range(7)]
    assert factors[:2] == [0.5, 1.0]
    # cosine over steps 2..6: progress 0, 1/4, 1/2, 3/4, 1
    expected = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)) for p in (0, 0.25, 0.5, 0.75, 1.0)]
    assert factors[2:] == pytest.approx(expected, rel=1e-12)
    assert factors[-1] == pytest.approx(0.1)


def test_deepspeed_config_from_file_with_run_config_overriding(tmp_path: Path) -> None:
    data = {**_minimal(tmp_path), "train": {"micro_batch_size": 2, "global_batch_size": 16,
                                            "deepspeed_config": "zero2"},
            "optim": {"max_grad_norm": 0.5}, "model": {"model_config": dict(TINY_LLAMA), "dtype": "fp32"}}
    cfg = config_io.build(RunConfig, data)
    ds = ds_config.build(cfg, world_size=2, on_cuda=False)
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["reduce_scatter"] is True
    batch = (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"])
    assert batch == (16, 2, 4)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is False
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["torch_adam"] is True
    assert "fused" not in ds["optimizer"]["params"]
    cfg.train.zero_stage = 1
    assert ds_config.build(cfg, world_size=1, on_cuda=False)["zero_optimization"]["stage"] == 1
    assert "bf16_master_weights_and_grads" not in ds_config.build(cfg, world_size=1, on_cuda=False)["bf16"]
    cfg.optim.master_weights, cfg.model.dtype = "bf16", "bf16"
    bf16 = ds_config.build(cfg, world_size=1, on_cuda=False)["bf16"]
    assert bf16 == {"enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}
    stochastic = ds_config.build(cfg, world_size=1, on_cuda=False)  # the default: the project's bf16 AdamW
    assert "optimizer" not in stochastic and stochastic["zero_allow_untested_optimizer"] is True
    assert type(ds_config.client_optimizer(cfg, [{"params": [torch.nn.Parameter(torch.ones(2))]}])).__name__ \
        == "StochasticRoundingAdamW"
    cfg.optim.stochastic_rounding = False
    assert ds_config.build(cfg, world_size=1, on_cuda=False)["optimizer"]["type"] == "AdamW"
    assert ds_config.client_optimizer(cfg, []) is None


@pytest.mark.parametrize(("stage", "master", "requested", "resolved"), [
    (0, "fp32", "auto", "bf16"),   # DeepSpeed 0.19: no fp32 accumulation for bf16 models at ZeRO-0
    (1, "fp32", "auto", "fp32"),
    (2, "fp32", "auto", "fp32"),
    (1, "bf16", "auto", "bf16"),   # bf16 masters keep bf16 gradients
    (1, "fp32", "bf16", "bf16"),
])
def test_gradient_accumulation_dtype_of_bf16_models(tmp_path: Path, stage: int, master: str, requested: str,
                                                    resolved: str) -> None:
    data = {**_minimal(tmp_path), "model": {"model_config": dict(TINY_LLAMA), "dtype": "bf16"},
            "optim": {"master_weights": master}, "train": {"zero_stage": stage, "grad_accum_dtype": requested}}
    ds = ds_config.build(config_io.build(RunConfig, data), world_size=1, on_cuda=False)
    assert ds["data_types"]["grad_accum_dtype"] == resolved
    assert ds["bf16"].get("immediate_grad_update", False) is (resolved == "fp32")
    data["model"]["dtype"] = "fp32"
    assert "data_types" not in ds_config.build(config_io.build(RunConfig, data), world_size=1, on_cuda=False)
    for stage in range(4):
        on_disk = json.loads((DS_CONFIGS / f"zero{stage}.json").read_text())
        assert on_disk["zero_optimization"]["stage"] == stage and "scheduler" not in on_disk


def _no_expensive_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the trainer gets as far as the process group or the model."""
    from mftcoder_coba.training import distributed, trainer

    def too_late(*args, **kwargs):
        raise AssertionError("bad config reached expensive work")

    monkeypatch.setattr(distributed, "init", too_late)
    monkeypatch.setattr(trainer, "build_model", too_late)


@pytest.mark.parametrize(("sections", "env", "message"), [
    ({"data": {"train": "/nonexistent/train"}}, {}, "config field 'data.train': /nonexistent/train: no prepared split"),
    ({"model": {"model_config": {**TINY_LLAMA, "vocab_size": 16}}}, {}, "config field 'model.model_config.vocab_size'"),
    ({"balancer": {"name": "static", "options": {"weights": {"no_such_task": 1.0}}}}, {},
     "config field 'balancer.options.weights': task(s) no_such_task not in the shards"),
    ({"balancer": {"name": "nope"}}, {}, "config field 'balancer.name': unknown balancer 'nope'"),
    ({"balancer": {"options": {"bogus": 1}}}, {}, "config field 'balancer.options.bogus'"),
    ({}, {"WORLD_SIZE": "3", "RANK": "0"}, "config field 'train.global_batch_size': 4 rows do not split over 3 ranks"),
    ({"data": {"valid": None}}, {}, "config field 'data.valid'"),
    ({"balancer": {"name": "gradnorm", "options": {}}, "train": {"zero_stage": 3}}, {},
     "config field 'balancer.name': 'gradnorm' needs per-task gradients of the LM head, which ZeRO-3 partitions"),
    ({"model": {"compile": True}, "train": {"zero_stage": 3}}, {},
     "config field 'model.compile': not supported with ZeRO-3"),
    ({"optim": {"master_weights": "bf16"}}, {}, "config field 'optim.master_weights': 'bf16' needs model.dtype 'bf16'"),
    ({"optim": {"master_weights": "bf16"}, "model": {"dtype": "bf16"}, "train": {"zero_stage": 0}}, {},
     "config field 'optim.master_weights': 'bf16' needs model.dtype 'bf16' and ZeRO stage 1, 2 or 3"),
    ({"model": {"gradient_checkpointing": "partial"}}, {}, "config field 'model.gradient_checkpointing'"),
    ({"model": {"dtype": "bf16"}, "train": {"grad_accum_dtype": "fp32", "zero_stage": 0}}, {},
     "config field 'train.grad_accum_dtype': 'fp32' needs ZeRO stage 1-3 for a bf16 model"),
    ({"model": {"dtype": "bf16"}, "optim": {"master_weights": "bf16"},
      "train": {"grad_accum_dtype": "fp32", "zero_stage": 1}}, {},
     "config field 'train.grad_accum_dtype': 'fp32' cannot go with optim.master_weights 'bf16'"),
])
def test_cli_refuses_bad_config_in_one_line(prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch, sections: dict, env: dict,
                                            message: str) -> None:
    _no_expensive_work(monkeypatch)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    data = run_data(prepared, tmp_path / "run", **sections)
    config = write_config(tmp_path / "run.json", data)
    assert cli.main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mftcoder-coba: error: ") and message in err[0], err
    assert not (tmp_path / "run").exists()


def test_static_weights_by_task_name_follow_task_order(prepared: Path, tmp_path: Path) -> None:
    from mftcoder_coba.data import PackedDataset
    from mftcoder_coba.training.preflight import balancer_options

    tasks = PackedDataset(prepared / "train").tasks
    options = balancer_options({"weights": {t: float(i + 1) for i, t in enumerate(reversed(tasks))}}, tasks)
    assert options["weights"] == [float(len(tasks) - i) for i in range(len(tasks))]
    with pytest.raises(ConfigError, match=f"no entry for task\\(s\\) {tasks[0]}"):
        balancer_options({"weights": {t: 1.0 for t in tasks[1:]}}, tasks)


@pytest.mark.parametrize(("override", "field"), [
    ("optim.lr=.inf", "optim.lr"),
    ("optim.lr=.nan", "optim.lr"),
    ("optim.betas=[0.9, .inf]", r"optim.betas\[1\]"),
    ("optim.eps=-.inf", "optim.eps"),
    ("balancer.options.tau=.inf", "balancer.options.tau"),
    ("balancer.options.weights={a: [1, .nan]}", r"balancer.options.weights.a\[1\]"),
])
def test_non_finite_numbers_are_refused_anywhere(tmp_path: Path, override: str, field: str) -> None:
    path = write_config(tmp_path / "run.json", _minimal(tmp_path))
    with pytest.raises(ConfigError, match=rf"config field '{field}': must be a finite number, got "):
        load_run_config(path, [override])
    data = _minimal(tmp_path)
    data["optim"] = {"lr": float("inf")}  # JSON's Infinity
    (tmp_path / "inf.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="config field 'optim.lr': must be a finite number, got inf"):
        load_run_config(tmp_path / "inf.json")


def test_divergence_and_thread_fields(tmp_path: Path) -> None:
    path = write_config(tmp_path / "run.json", _minimal(tmp_path))
    cfg = load_run_config(path)
    assert (cfg.train.nonfinite, cfg.train.max_skipped_steps, cfg.train.cpu_threads) == ("stop", 10, "auto")
    cfg = load_run_config(path, ["train.nonfinite=skip", "train.max_skipped_steps=3", "train.cpu_threads=4"])
    assert (cfg.train.nonfinite, cfg.train.max_skipped_steps, cfg.train.cpu_threads) == ("skip", 3, 4)
    for override, field in (("train.nonfinite=ignore", "train.nonfinite"),
                            ("train.max_skipped_steps=0", "train.max_skipped_steps"),
                            ("train.cpu_threads=0", "train.cpu_threads")):
        with pytest.raises(ConfigError, match=f"config field '{field}'"):
            load_run_config(path, [override])


@pytest.mark.parametrize(("override", "message"), [
    ("train.max_steps=0", "config field 'train.max_steps': must be >= 1, got 0"),
    ("train.cpu_threads=0", "config field 'train.cpu_threads': must be >= 1 or 'auto', got 0"),
    ("train.zero_stage=4", "config field 'train.zero_stage': must be in [0, 3] or null, got 4"),
    ("optim.lr=0", "config field 'optim.lr': must be > 0, got 0.0"),
    ("optim.betas=[0.9, 1.0]", "config field 'optim.betas': each must be in [0, 1), got (0.9, 1.0)"),
    ("optim.min_lr_ratio=-0.5", "config field 'optim.min_lr_ratio': must be in [0, 1], got -0.5"),
    ("eval.micro_batch_size=0", "config field 'eval.micro_batch_size': must be >= 1 or null, got 0"),
    ("train.early_stopping={metric: valid.mean, patience: 0}",
     "config field 'train.early_stopping.patience': must be >= 1, got 0"),
])
def test_declared_ranges_are_enforced_with_one_line_naming_the_field(tmp_path: Path, override: str,
                                                                      message: str) -> None:
    path = write_config(tmp_path / "run.json", {**_minimal(tmp_path), "data": {"train": "t", "valid": "v"}})
    with pytest.raises(ConfigError) as caught:
        load_run_config(path, [override])
    assert str(caught.value) == message


def test_bounded_fields_check_any_config_class() -> None:
    from dataclasses import dataclass

    @dataclass
    class Knobs:
        rate: float = config_io.bounded(0.5, gt=0, lt=1)
        """A rate strictly between 0 and 1."""
        limit: int | None = config_io.bounded(None, le=10)
        """At most 10, or null."""

    assert config_io.build(Knobs, {"limit": None}) == Knobs()
    assert config_io.build(Knobs, {"rate": 0.25, "limit": -3}) == Knobs(0.25, -3)
    with pytest.raises(ConfigError, match=r"^config field 'knobs.rate': must be in \(0, 1\), got 1.0$"):
        config_io.build(Knobs, {"rate": 1}, prefix="knobs.")
    with pytest.raises(ConfigError, match=r"^config field 'limit': must be <= 10 or null, got 11$"):
        config_io.check_ranges(Knobs(limit=11))
    with pytest.raises(TypeError, match="at least one of"):
        config_io.bounded(1)
