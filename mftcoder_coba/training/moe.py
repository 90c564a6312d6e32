"""The router auxiliary (load-balancing) loss of mixture-of-experts models, as their own ``forward`` adds it.

A ``...ForCausalLM.forward`` of Mixtral, Qwen2/3-MoE and their kin with ``output_router_logits: true`` adds
``router_aux_loss_coef * load_balancing_loss_func(router_logits, num_experts, top_k, attention_mask)`` to the
token loss; the trainer computes the loss from the decoder's hidden states (never the model's ``forward``),
so it adds the same term here, with the function of the model's own modeling module (not a copy). Packed
rows carry no padding mask in the model's sense (``attention_mask`` None), which is what the model's own
forward does with packed input too.

Across micro-batches and ranks the term is added to each micro-batch's loss as is: the engine's mean over
accumulation steps and ranks then makes it the mean of the per-micro-batch auxiliary losses, added to the
exact per-task objective (docs/coba.md).
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel


@dataclass(frozen=True)
class RouterAux:
    """What the model's forward uses to form its auxiliary loss."""

    coef: float
    num_experts: int
    top_k: int
    loss_fn: Callable[..., torch.Tensor]

    def __call__(self, router_logits: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """``coef * load_balancing_loss(router_logits)`` as a float32 scalar."""
        return self.coef * self.loss_fn(router_logits, self.num_experts, self.top_k, None).float()


def router_aux(lm: PreTrainedModel) -> RouterAux | None:
    """The auxiliary loss ``lm``'s forward adds, or None (not a MoE model, or ``output_router_logits`` off)."""
    config = lm.config.get_text_config()
    if not getattr(config, "output_router_logits", False):
        return None
    loss_fn = getattr(sys.modules[type(lm).__module__], "load_balancing_loss_func", None)
    num_experts = getattr(lm, "num_experts", None)
    top_k = getattr(lm, "num_experts_per_tok", None)
    if loss_fn is None or num_experts is None or top_k is None:
        return None  # a router loss of another form: the probe guard (loss_guard) refuses the run
    return RouterAux(float(config.router_aux_loss_coef), int(num_experts), int(top_k), loss_fn)
