"""The two views of a model the trainer's loss needs: the final hidden states of packed rows, and the LM head.

The loss kernels take the hidden states and the head weight separately (the fused linear cross-entropy
never materialises logits), so the trainer never calls the causal LM's own ``forward``. These helpers see
through the wrappers a model may carry (DeepSpeed engine or DDP, peft) to the transformers model.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from mftcoder_coba.models.attention import FLASH, varlen_kwargs
from mftcoder_coba.models.cgc_lora import cgc_layers, set_task_ids


def causal_lm(model: nn.Module) -> PreTrainedModel:
    """The transformers causal LM inside ``model`` (unwrapping DeepSpeed/DDP ``.module`` and peft)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    get_base_model = getattr(model, "get_base_model", None)
    if callable(get_base_model):  # peft.PeftModel
        model = get_base_model()
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"expected a transformers model (optionally wrapped), got {type(model).__name__}")
    return model


def hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    task_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, L, H) output of the decoder's final norm for packed rows ``input_ids`` (B, L).

    ``position_ids`` restart at 0 at every packed sample; attention is confined to each sample (see
    :mod:`mftcoder_coba.models.attention`). ``task_ids`` (B, L) feed CGC-LoRA's gates when the model has
    CGC layers; they stay set after the call so a gradient-checkpointed backward recomputes with them.
    """
    return decoder_outputs(model, input_ids, position_ids, task_ids)[0]


def decoder_outputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    task_ids: torch.Tensor | None = None,
    *,
    router_logits: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """:func:`hidden_states` and, with ``router_logits`` (a MoE model), each layer's router logits."""
    lm = causal_lm(model)
    if task_ids is not None and cgc_layers(lm):
        set_task_ids(lm, task_ids)
    batch, length = input_ids.shape
    extra: dict = {}
    if lm.config._attn_implementation == FLASH:
        extra = varlen_kwargs(position_ids)
        input_ids, position_ids = input_ids.reshape(1, -1), position_ids.reshape(1, -1)
    if router_logits:
        extra["output_router_logits"] = True
    out = lm.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False, **extra)
    return out[0].reshape(batch, length, -1), (out.router_logits if router_logits else None)


def head_has_adapter(model: nn.Module) -> bool:
    """Whether the output projection computes more than ``hidden @ weight.T + bias``: a peft LoRA layer or a
    CGC-LoRA layer on ``lm_head`` holds its base layer and adapter as submodules, a plain head has none. Its
    ``.weight`` is then the frozen base weight alone, so a loss built from it would leave the adapter untrained."""
    return any(True for _ in causal_lm(model).get_output_embeddings().children())


def lm_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output projection's ``(V, H)`` weight and its bias (None for the usual bias-free heads).

    Raises ``ValueError`` for a head with an adapter (:func:`head_has_adapter`): its weight is not what it computes.
    """
    if head_has_adapter(model):
        raise ValueError("the LM head carries an adapter: its weight alone is not what it computes")
    head = causal_lm(model).get_output_embeddings()
    return head.weight, getattr(head, "bias", None)
