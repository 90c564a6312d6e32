"""How each decoder layer runs: gradient checkpointing (full or selective) and regional ``torch.compile``.

Activations fill much of a 1B model's training memory at 4096-token rows: eager transformers Llama layers
keep about 117 KB per token per layer for backward (hidden 2048, MLP 8192, bf16), i.e. 14.3 GiB for 16 layers
x 8192 tokens. Three knobs trade that against compute:

* ``gradient_checkpointing: full``: keep only each layer's input and recompute the whole layer in backward
  (4 KB per token per layer, about a third more compute);
* ``gradient_checkpointing: selective``: keep the outputs of the matrix products and of attention, recompute
  only the cheap element-wise work between them (norms, rotary embedding, SwiGLU); under ``compile`` the
  recomputation fuses into the backward kernels, so it costs little time;
* ``compile``: ``torch.compile`` of every decoder layer (regional compilation: one graph shared by all layers,
  compiled once), fusing the element-wise work; inductor's partitioner also saves less than eager does.

``mftcoder-coba bench-memory`` measures the bytes each choice keeps (on any device, the CPU too).
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from mftcoder_coba.errors import UserError

_aten = torch.ops.aten
# Outputs worth keeping: each costs a matrix product (or attention) to recompute and is no larger than the
# hidden state or the MLP's intermediate activation.
_SAVED_OPS: set[Any] = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.higher_order.flex_attention,
}
# flash-attn >= 2.6 registers its kernels as torch ops; keep their outputs too when they exist.
for _name in ("_flash_attn_forward", "_flash_attn_varlen_forward"):
    try:
        _SAVED_OPS.add(getattr(torch.ops.flash_attn, _name).default)
    except (AttributeError, RuntimeError):
        pass


def _save_products(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Selective-checkpointing policy: keep matrix-product and attention outputs, recompute the rest."""
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder blocks of a transformers model (the classes it names in ``_no_split_modules``)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer class (_no_split_modules)")
    return layers


def checkpointing_kwargs(mode: bool | str) -> dict[str, Any] | None:
    """``torch.utils.checkpoint`` arguments for ``model.gradient_checkpointing`` (None: off)."""
    if mode is False:
        return None
    if mode not in (True, "full", "selective"):
        raise ValueError(f"gradient checkpointing mode must be false, true, 'full' or 'selective', got {mode!r}")
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _save_products)
    return kwargs


def enable_checkpointing(model: nn.Module, kwargs: dict[str, Any]) -> None:
    """Turn on transformers' per-layer checkpointing with ``kwargs`` (its newer name where it exists)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:  # transformers >= 5.2x; the old name warns and goes in v6
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def compile_layers(model: nn.Module, checkpointed: bool = False) -> int:
    """``torch.compile`` every decoder layer in place (parameter names unchanged); returns how many.

    Compiling the layer's call keeps transformers' checkpointing wrapper inside the graph, which is what lets
    inductor fuse a selective checkpoint's recomputation into backward; ``checkpointed`` layers that are
    checkpointed from outside their call (older transformers, some remote-code models) are refused.
    """
    layers = decoder_layers(model)
    if checkpointed and not all(_checkpoints_inside(layer) for layer in layers):
        raise UserError(
            f"config field 'model.compile': {type(layers[0]).__name__} is checkpointed from outside the layer (not a "
            "transformers GradientCheckpointingLayer; transformers >= 4.52 models are), so compile and "
            "gradient_checkpointing cannot be combined for this model; turn one of them off"
        )
    if checkpointed:
        _allow_idempotent_side_effects_under_checkpoint()
    for layer in layers:
        layer.compile()
    return len(layers)


def _allow_idempotent_side_effects_under_checkpoint() -> None:
    """Let dynamo trace a checkpointed layer whose forward sets a context variable.

    Hugging Face ``kernels`` (a transformers >= 5.25 dependency) wraps attention forwards in a decorator that sets a
    context variable (its table of hub-kernel routes) on every call. Inside ``torch.utils.checkpoint`` dynamo
    refuses that side effect and breaks the graph, so a checkpointed layer silently ran eagerly: no fusion and
    selective checkpointing saving nothing less. The route table is set to the same value on every call, so not
    replaying it in the recomputation is exact; dynamo's flag says just that (absent in old torch, which had no
    such HOP check)."""
    config = torch._dynamo.config
    if hasattr(config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        config.skip_fwd_side_effects_in_bwd_under_checkpoint = True


def _checkpoints_inside(layer: nn.Module) -> bool:
    """True when transformers checkpoints ``layer`` inside its own call (so compiling the call covers it)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return False
    return isinstance(layer, GradientCheckpointingLayer)
