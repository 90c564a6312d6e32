"""What a causal LM's ``forward`` does to the head's output before its loss: the logit transform.

The trainer never calls the model's own ``forward`` (the loss kernels take the last hidden state and the head),
so every step a ``...ForCausalLM.forward`` takes between ``lm_head`` and the cross-entropy must be repeated
here, or full fine-tuning optimises a different function than the model was trained with. transformers 5.25
defines three, all read from the (text) config:

- ``logit_scale`` (Cohere, Cohere 2): ``logits * logit_scale``;
- ``logits_scaling`` (Granite, GraniteMoE): ``logits / logits_scaling``;
- ``final_logit_softcapping`` (Gemma 2, Gemma 3): ``cap * tanh(logits / cap)``.

A transform a new release adds is not known here: the probe guard (``training.loss_guard``) compares this
project's loss with the model's own and refuses the run instead of training the wrong objective.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mftcoder_coba.models.forward import causal_lm


@dataclass(frozen=True)
class LogitTransform:
    """``z = scale * x``, then ``z = softcap * tanh(z / softcap)`` when ``softcap`` is set: the kernels'
    ``logit_scale`` / ``softcap`` arguments."""

    scale: float = 1.0
    softcap: float | None = None

    def kernel_kwargs(self) -> dict[str, float | None]:
        """The keyword arguments of ``task_cross_entropy`` / ``linear_task_cross_entropy``."""
        return {"logit_scale": self.scale, "softcap": self.softcap}


def logit_transform(model: nn.Module) -> LogitTransform:
    """The logit transform of ``model``'s own forward (identity for most model types)."""
    config = causal_lm(model).config.get_text_config()
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:
        scale /= float(config.logits_scaling)
    cap = getattr(config, "final_logit_softcapping", None)
    return LogitTransform(scale=scale, softcap=float(cap) if cap else None)
