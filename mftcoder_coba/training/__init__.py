"""The trainer: DeepSpeed engine, exact global multitask objective, balancer wiring, checkpoints, metrics.

``train(cfg, resume=None) -> run_dir`` is the entry point (``mftcoder-coba train`` calls it); modules:
``preflight`` (config checks before any expensive work), ``sampling`` (which rows each step and each
held-out sample reads), ``objective`` (per-task coefficients of the exact global loss), ``validation``
(``evaluate_per_task``), ``head_grads`` (per-task gradient norms for GradNorm), ``ds_config`` (DeepSpeed
config and LR schedule), ``checkpoint``, ``metrics``, ``distributed`` and ``trainer`` (the loop).
"""
from mftcoder_coba.training.trainer import train

__all__ = ["train"]
