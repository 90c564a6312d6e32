"""The run's ``auto`` settings, decided once for this machine: :class:`Resolved` and the rules behind it.

Why a module of its own: preflight decides these settings and the DeepSpeed config builder takes them (and
decides them itself when called without, as tests and benchmarks do); both import this module, so the
dependencies point one way (preflight -> ds_config -> resolved) instead of the two importing each other.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mftcoder_coba.config import RunConfig
from mftcoder_coba.models.attention import resolve_attn_implementation
from mftcoder_coba.models.build import torch_dtype
from mftcoder_coba.training import threads


@dataclass(frozen=True)
class Resolved:
    """Every ``auto`` setting of the run, decided once here for this machine; the trainer, the model build,
    the loss and the DeepSpeed config take these values and decide nothing again. Why: a run should say what
    it actually did (logged at start, written to ``run_dir/resolved.yaml`` beside config.yaml)."""

    attention: str
    """transformers ``attn_implementation`` the model is built with (``model.attn_implementation``)."""
    fused_linear_ce: bool
    """LM head fused into the per-task CE (``train.fused_linear_ce``; ``auto``: on unless ZeRO-3)."""
    kernel_impl: str
    """Per-task CE backend, ``triton`` or ``torch`` (``train.kernel_impl``; ``auto``: triton on CUDA)."""
    grad_sums: str
    """dtype gradients are summed in over micro-batches (``train.grad_accum_dtype``; fp32/fp16 models: their own)."""
    fused_adamw: bool
    """``torch.optim.AdamW(fused=True)`` (``optim.fused``; ``auto``: on CUDA; false with stochastic rounding,
    whose optimizer is the project's own)."""
    cpu_threads: int | None
    """Intra-op threads per rank on CPU (``train.cpu_threads``); null on a GPU, where torch's default stays."""
    cpu_threads_from: str | None
    """Where ``cpu_threads`` came from (the config field, OMP_NUM_THREADS, or cores / local ranks)."""
    zero_stage: int
    """The ZeRO stage in effect (``train.zero_stage``, else the DeepSpeed file's, else 0)."""
    inputs: dict[str, str] = field(default_factory=dict)
    """Each input path the run reads, by config field, absolute (relative ones were taken from the folder the
    config was loaded in): what export, eval and resume of this run directory use from any folder."""

    def line(self) -> str:
        """``resolved: attention=sdpa fused_linear_ce=true ...``: the one log line at start."""
        def text(value: Any) -> str:
            return str(value).lower() if isinstance(value, bool) else "-" if value is None else str(value)
        return "resolved: " + " ".join(f"{name}={text(value)}" for name, value in [
            ("attention", self.attention), ("fused_linear_ce", self.fused_linear_ce), ("kernel", self.kernel_impl),
            ("grad_sums", self.grad_sums), ("fused_adamw", self.fused_adamw), ("cpu_threads", self.cpu_threads),
            ("zero_stage", self.zero_stage)])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve(cfg: RunConfig, stage: int, on_cuda: bool) -> Resolved:
    """The ``auto`` settings of ``cfg`` for ZeRO ``stage`` on this machine (CUDA or not)."""
    t, o = cfg.train, cfg.optim
    cpu = None if on_cuda else threads.resolve(t.cpu_threads)
    return Resolved(
        attention=resolve_attn_implementation(cfg.model.attn_implementation, torch_dtype(cfg.model)),
        fused_linear_ce=stage != 3 if t.fused_linear_ce == "auto" else bool(t.fused_linear_ce),
        kernel_impl=("triton" if on_cuda else "torch") if t.kernel_impl == "auto" else t.kernel_impl,
        grad_sums=grad_accum_dtype(cfg, stage) if cfg.model.dtype == "bf16" else cfg.model.dtype,
        fused_adamw=not uses_stochastic_rounding(cfg) and (on_cuda if o.fused == "auto" else bool(o.fused)),
        cpu_threads=None if cpu is None else cpu.threads,
        cpu_threads_from=None if cpu is None else cpu.reason,
        zero_stage=stage,
        inputs=input_paths(cfg),
    )


def grad_accum_dtype(cfg: RunConfig, stage: int) -> str:
    """``train.grad_accum_dtype`` resolved for ZeRO ``stage``: ``auto`` is fp32 with ZeRO 1-3 and fp32 masters,
    else bf16."""
    if cfg.train.grad_accum_dtype != "auto":
        return cfg.train.grad_accum_dtype
    return "fp32" if cfg.optim.master_weights == "fp32" and stage >= 1 else "bf16"


def uses_stochastic_rounding(cfg: RunConfig) -> bool:
    """True when the run trains bf16 masters with :class:`StochasticRoundingAdamW` instead of PyTorch's AdamW."""
    return cfg.optim.master_weights == "bf16" and cfg.optim.stochastic_rounding


def input_paths(cfg: RunConfig) -> dict[str, str]:
    """``{config field: absolute path}`` of every input ``cfg`` names (shards, eval split, base model, DeepSpeed
    file); :meth:`RunConfig.validate` has already made them absolute."""
    named = {"data.train": cfg.data.train, "data.valid": cfg.data.valid, "eval.data": cfg.eval.data,
             "model.path": cfg.model.path, "train.deepspeed_config": cfg.train.deepspeed_config}
    return {name: str(path) for name, path in named.items() if path is not None}
