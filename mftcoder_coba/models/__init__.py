"""Model building: transformers causal LMs (full fine-tuning, LoRA, QLoRA, CGC-LoRA) and packed attention.

``build_model`` makes the model a run trains; ``hidden_states`` and ``lm_head`` are the two views the loss
needs; ``save_trainable`` / ``load_trained`` move trained weights to and from a run directory.
"""
from mftcoder_coba.models.build import build_model, check_model
from mftcoder_coba.models.config import LoraOptions, ModelConfig
from mftcoder_coba.models.forward import causal_lm, hidden_states, lm_head
from mftcoder_coba.models.persist import latest_checkpoint, load_trained, save_base_model, save_trainable

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
