"""The DeepSpeed engine configuration and learning-rate schedule built from a RunConfig.

``train.deepspeed_config`` (e.g. ``zero2``, the packaged ``mftcoder_coba/ds_configs/zero2.json``) may supply
engine details: ZeRO bucket sizes, overlap, offload, communication options. These keys are then always set
from the RunConfig, overriding the file: ``train_batch_size`` (global_batch_size),
``train_micro_batch_size_per_gpu`` (micro_batch_size),
``gradient_accumulation_steps`` (global / (micro x world)), ``gradient_clipping`` (optim.max_grad_norm),
``bf16`` (enabled when model.dtype is bf16; master-weight precision from optim.master_weights),
``data_types.grad_accum_dtype`` (train.grad_accum_dtype, for bf16 models),
``zero_optimization.stage`` (train.zero_stage when set) and ``optimizer`` (PyTorch AdamW via ``torch_adam``:
no DeepSpeed C++ op is compiled; with bf16 master weights and stochastic rounding the section is dropped and
:func:`client_optimizer` is passed to the engine instead). A ``scheduler`` section in the file is refused: the
schedule is :func:`lr_factor`, given to the engine as a LambdaLR.
"""
from __future__ import annotations

import json
import math
from typing import Any

import torch

from mftcoder_coba.config import OptimConfig, RunConfig
from mftcoder_coba.errors import ConfigError
from mftcoder_coba.training.bf16_adamw import StochasticRoundingAdamW
from mftcoder_coba.training.resolved import Resolved, resolve, uses_stochastic_rounding


def load_file(cfg: RunConfig) -> dict[str, Any]:
    """The user's DeepSpeed JSON (empty without one); errors name the file."""
    path = cfg.train.deepspeed_config
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config field 'train.deepspeed_config': cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config field 'train.deepspeed_config': {path} must hold a JSON object")
    if "scheduler" in data:
        raise ConfigError(f"config field 'train.deepspeed_config': {path} has a 'scheduler' section; the "
                          "schedule comes from the run config's 'optim' section")
    return data


def zero_stage(cfg: RunConfig) -> int:
    """The ZeRO stage in effect: train.zero_stage, else the file's, else 0."""
    if cfg.train.zero_stage is not None:
        return cfg.train.zero_stage
    return int(load_file(cfg).get("zero_optimization", {}).get("stage", 0))


def build(cfg: RunConfig, world_size: int, on_cuda: bool, resolved: Resolved | None = None) -> dict[str, Any]:
    """The complete DeepSpeed config dict for this run and world size. ``resolved``: the run's settings as
    preflight decided them (the trainer passes them: the ZeRO stage, gradient-sum dtype and fused AdamW are
    then taken, not decided again); without it they are resolved here for ``on_cuda`` (tests, benchmarks)."""
    if resolved is None:
        resolved = resolve(cfg, zero_stage(cfg), on_cuda)
    ds = load_file(cfg)
    t, o, stage = cfg.train, cfg.optim, resolved.zero_stage
    ds["train_batch_size"] = t.global_batch_size
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["gradient_accumulation_steps"] = t.global_batch_size // (t.micro_batch_size * world_size)
    ds["gradient_clipping"] = o.max_grad_norm
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": cfg.model.dtype == "bf16"}
    if cfg.model.dtype == "fp16":  # dynamic loss scaling (loss_scale 0): halved on overflow, that step skipped
        ds["fp16"] = {"loss_scale": 0, "initial_scale_power": 16, **ds.get("fp16", {}), "enabled": True}
    if o.master_weights == "bf16":
        ds["bf16"].update(bf16_master_weights_and_grads=True, bf16_optimizer_states=True)
    if cfg.model.dtype == "bf16":
        accum = resolved.grad_sums
        ds["data_types"] = {**ds.get("data_types", {}), "grad_accum_dtype": accum}
        if accum == "fp32":  # add each gradient into the fp32 copy in backward and free it (DeepSpeed's bf16 optimizer)
            ds["bf16"].setdefault("immediate_grad_update", True)
    ds["zero_optimization"] = {**ds.get("zero_optimization", {}), "stage": stage}
    if uses_stochastic_rounding(cfg):
        ds.pop("optimizer", None)  # initialize() passes client_optimizer(); ZeRO wraps it like its own
        ds["zero_allow_untested_optimizer"] = True
    else:
        params: dict[str, Any] = {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
                                  "torch_adam": True}
        if resolved.fused_adamw:
            params["fused"] = True
        ds["optimizer"] = {"type": "AdamW", "params": params}
    ds.setdefault("steps_per_print", 10**9)  # the trainer logs; keep DeepSpeed's own step lines out
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def client_optimizer(cfg: RunConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer | None:
    """The optimizer object the trainer hands DeepSpeed, or None when the config's ``optimizer`` section builds it."""
    if not uses_stochastic_rounding(cfg):
        return None
    o = cfg.optim
    return StochasticRoundingAdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                                   seed=cfg.train.seed)


def initialize(cfg: RunConfig, module: torch.nn.Module, world_size: int, on_cuda: bool,
               resolved: Resolved | None = None) -> tuple[Any, Any]:
    """``(engine, lr_scheduler)``: DeepSpeed's engine for ``module`` with this run's config, its parameters in
    weight-decay groups, the optimizer :func:`client_optimizer` gives (else the config's section builds one) and
    the :func:`lr_factor` schedule. The trainer and ``bench-memory`` both build their engine here."""
    import deepspeed

    groups = parameter_groups(module, cfg.optim.weight_decay)
    client = client_optimizer(cfg, groups)
    engine, _, _, scheduler = deepspeed.initialize(
        model=module,
        model_parameters=groups if client is None else None,
        optimizer=client,
        config=build(cfg, world_size, on_cuda, resolved),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, cfg.optim, cfg.train.max_steps)),
    )
    _undo_state_warm_up(engine.optimizer)
    return engine, scheduler


def _undo_state_warm_up(optimizer: Any) -> None:
    """Return the optimizer to 'no step taken yet' after DeepSpeed's bf16/fp16 wrapper of ZeRO-0 warmed it up.

    Why: ``FP16_UnfusedOptimizer`` (bf16 or fp16 models without ZeRO) runs ``initialize_optimizer_states()`` while
    it is built: one AdamW step on zero gradients. Adam's step count is then 1 before the first real step (whose
    bias correction is that of step 2: 26 % too small with betas 0.9/0.95) and the fp32 masters are decayed once
    at the unscheduled LR, so ZeRO-0 trained differently from ZeRO 1-3. Clearing the state lets AdamW create it
    at the first real step; the masters are copied again from the untouched 16-bit weights they were made from."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if not isinstance(optimizer, FP16_UnfusedOptimizer):
        return
    optimizer.optimizer.state.clear()
    with torch.no_grad():
        for low, masters in zip(optimizer.fp16_groups, optimizer.fp32_groups):
            for weight, master in zip(low, masters):
                master.copy_(weight)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: matrices decay, vectors (norms, biases) do not."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Multiplier of optim.lr for the optimizer step with 0-based index ``step``.

    Linear warm-up (step+1)/warmup (``optim.warmup(max_steps)`` steps), then from 1 to min_lr_ratio at the last
    step: cosine, linear, or (``wsd``) 1 until the last ``decay_ratio`` of the steps and linear over those; or
    constant.
    """
    warmup = optim.warmup(max_steps)
    if step < warmup:
        return (step + 1) / warmup
    if optim.schedule == "constant":
        return 1.0
    start = warmup
    if optim.schedule == "wsd":
        start = max(warmup, max_steps - max(1, round(optim.decay_ratio * max_steps)))
        if step < start:
            return 1.0
    progress = min(1.0, (step - start) / max(1, max_steps - 1 - start))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if optim.schedule == "cosine" else 1.0 - progress
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * shape
