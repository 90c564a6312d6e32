"""The ``auto`` settings are resolved once, in preflight: logged, written to ``run_dir/resolved.yaml``, and the
values the trainer, the model build, the loss kernels and the DeepSpeed config actually use."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
from train_helpers import run_config

from mftcoder_coba.kernels import api as kernel_api
from mftcoder_coba.models import build as model_build
from mftcoder_coba.training import ds_config, preflight, train, trainer

UNIFORM = {"name": "uniform", "options": {}}


def test_a_cpu_run_writes_and_uses_its_resolved_settings(prepared: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    impls: list[str] = []
    backend = kernel_api._backend
    monkeypatch.setattr(kernel_api, "_backend", lambda impl, device: impls.append(impl) or backend(impl, device))
    attentions: list[str | None] = []
    build_model = trainer.build_model

    def spy_build(*args, attention=None, **kwargs):
        attentions.append(attention)
        return build_model(*args, attention=attention, **kwargs)

    monkeypatch.setattr(trainer, "build_model", spy_build)
    cfg = run_config(prepared, tmp_path / "run", train={"max_steps": 1}, balancer=UNIFORM,
                     model={"attn_implementation": "auto"})
    assert (cfg.model.attn_implementation, cfg.train.kernel_impl, cfg.train.fused_linear_ce,
            cfg.train.grad_accum_dtype, cfg.optim.fused, cfg.train.cpu_threads) == ("auto",) * 6
    with caplog.at_level(logging.INFO, logger="mftcoder_coba.training.trainer"):
        run_dir = train(cfg)

    resolved = yaml.safe_load((run_dir / "resolved.yaml").read_text())
    assert resolved == {"attention": "sdpa", "fused_linear_ce": True, "kernel_impl": "torch", "grad_sums": "fp32",
                        "fused_adamw": False, "cpu_threads": 1, "cpu_threads_from": "OMP_NUM_THREADS",
                        "zero_stage": 0, "inputs": {"data.train": str(prepared / "train"),
                                                     "data.valid": str(prepared / "valid")}}
    assert sorted(p.name for p in run_dir.iterdir() if "resolved" in p.name) == ["resolved.yaml"]  # no temp left
    assert ("resolved: attention=sdpa fused_linear_ce=true kernel=torch grad_sums=fp32 fused_adamw=false "
            "cpu_threads=1 zero_stage=0") in caplog.messages
    # the run used them: no 'auto' reached the kernels or the model build
    assert impls and set(impls) == {"torch"}
    assert attentions == ["sdpa"]


def test_resolution_follows_the_device_and_the_zero_stage(prepared: Path, tmp_path: Path) -> None:
    cfg = run_config(prepared, tmp_path / "run", train={"zero_stage": 3}, balancer=UNIFORM)
    on_gpu = preflight.resolve(cfg, 3, on_cuda=True)
    assert (on_gpu.kernel_impl, on_gpu.fused_linear_ce, on_gpu.fused_adamw, on_gpu.cpu_threads,
            on_gpu.zero_stage) == ("triton", False, True, None, 3)
    assert "cpu_threads=- " in on_gpu.line()
    explicit = run_config(prepared, tmp_path / "run", balancer=UNIFORM,
                          train={"kernel_impl": "torch", "fused_linear_ce": False, "cpu_threads": 3},
                          optim={"fused": False})
    on_cpu = preflight.resolve(explicit, 0, on_cuda=False)
    assert (on_cpu.kernel_impl, on_cpu.fused_linear_ce, on_cpu.fused_adamw, on_cpu.cpu_threads,
            on_cpu.cpu_threads_from) == ("torch", False, False, 3, "train.cpu_threads")


def test_the_deepspeed_config_takes_the_resolved_values(prepared: Path, tmp_path: Path) -> None:
    cfg = run_config(prepared, tmp_path / "run", balancer=UNIFORM,
                     model={"dtype": "bf16"}, train={"zero_stage": 1}, optim={"master_weights": "fp32"})
    resolved = preflight.resolve(cfg, 1, on_cuda=False)
    assert resolved.grad_sums == "fp32" and not resolved.fused_adamw
    ds = ds_config.build(cfg, 1, on_cuda=False, resolved=resolved)
    assert ds["data_types"]["grad_accum_dtype"] == "fp32" and "fused" not in ds["optimizer"]["params"]
    # what build uses is the plan's record, not a second decision
    chosen = preflight.Resolved(**{**resolved.to_dict(), "grad_sums": "bf16", "fused_adamw": True})
    ds = ds_config.build(cfg, 1, on_cuda=False, resolved=chosen)
    assert ds["data_types"]["grad_accum_dtype"] == "bf16" and ds["optimizer"]["params"]["fused"] is True


def test_build_model_refuses_an_unresolved_attention() -> None:
    with pytest.raises(ValueError, match="resolved implementation"):
        model_build.build_model(None, 8, 1, attention="auto")  # type: ignore[arg-type]
