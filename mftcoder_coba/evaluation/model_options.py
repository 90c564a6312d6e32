"""How eval-code loads and runs a model: the options both generation engines (transformers in
``code_run``, vLLM in ``vllm_engine``) read, in a module of their own so neither engine imports the other's."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelOptions:
    """How the model is loaded and run: one bundle, as the command passes its options through unchanged."""

    dtype: str
    """Weights' dtype name for :func:`~mftcoder_coba.evaluation.targets.load_model`."""
    device: str | None
    """Device to generate on (None: the best available)."""
    task: str | None
    """Task whose adapter / CGC gate generates (per-task models only)."""
    workers: int
    """Sandboxed processes running completions at once."""
    trust_remote_code: bool
    """Let transformers (or vLLM) run the model's own code."""
    engine: str = "auto"
    """``--engine``: ``transformers``, ``vllm`` or ``auto`` (see
    :func:`~mftcoder_coba.evaluation.vllm_engine.choose_engine`)."""
