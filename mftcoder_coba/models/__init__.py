"""Model building: transformers causal LMs (full fine-tuning, LoRA, QLoRA, CGC-LoRA) and packed attention.

``build_model`` makes the model a run trains; ``hidden_states`` and ``lm_head`` are the two views the loss
needs; ``save_trainable`` / ``load_trained`` move trained weights to and from a run directory.

The configs (``ModelConfig``, ``LoraOptions``, :mod:`.cgc_config`) import neither torch nor transformers,
so reading a run config stays fast and works where torch is broken. The other names are imported on first
use (module ``__getattr__``): ``from mftcoder_coba.models import build_model`` works as before, but
``import mftcoder_coba.models.config`` no longer pays for torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mftcoder_coba.models.config import LoraOptions, ModelConfig

if TYPE_CHECKING:
    from mftcoder_coba.models.build import build_model, check_model
    from mftcoder_coba.models.forward import causal_lm, hidden_states, lm_head
    from mftcoder_coba.models.persist import latest_checkpoint, load_trained, save_base_model, save_trainable

_LAZY = {
    "build_model": "build",
    "check_model": "build",
    "causal_lm": "forward",
    "hidden_states": "forward",
    "lm_head": "forward",
    "latest_checkpoint": "persist",
    "load_trained": "persist",
    "save_base_model": "persist",
    "save_trainable": "persist",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


__all__ = [
    "LoraOptions",
    "ModelConfig",
    "build_model",
    "causal_lm",
    "check_model",
    "hidden_states",
    "latest_checkpoint",
    "lm_head",
    "load_trained",
    "save_base_model",
    "save_trainable",
]
