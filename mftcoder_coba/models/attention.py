"""Attention on packed rows: every token attends only to earlier tokens of its own packed sample.

The data reader restarts ``position_ids`` at 0 at each packed sample (padding forms its own segment), so
the sample boundaries are exactly the places where a position is not its predecessor plus one. Two ways
turn that into confined attention, both driven by the position ids alone:

* ``sdpa`` / ``eager`` / ``flex_attention``: transformers' mask builder (``masking_utils.create_causal_mask``)
  detects packed rows from ``position_ids`` when no 2-D attention mask and no KV cache are given, and builds a
  block-diagonal causal mask (a 4-D boolean / additive mask, or a document-causal ``BlockMask`` for flex).
  :func:`mftcoder_coba.models.forward.hidden_states` calls the decoder that way.
* ``flash_attention_2``: transformers only infers varlen boundaries for a batch of one row, so the batch is
  flattened into one row and the cumulative sample lengths computed here are passed explicitly; flash-attn's
  varlen kernel then never looks across a boundary, and nothing of size L×L is built.
"""
from __future__ import annotations

import importlib.util

import torch

from mftcoder_coba.errors import UserError

FLASH = "flash_attention_2"


def flash_attn_available() -> bool:
    """True when the optional ``flash-attn`` package is importable and a CUDA device is present."""
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def resolve_attn_implementation(requested: str, dtype: torch.dtype) -> str:
    """The transformers ``attn_implementation`` to build the model with; errors name the config field.

    ``auto``: flash-attn's varlen kernels when installed (bf16); else FlexAttention on a GPU, whose
    document-causal BlockMask skips the blocks across samples (44.0k vs 36.5k tokens/s for SDPA's dense
    block-diagonal mask on the 1B benchmark, H100, benchmarks/train/); else SDPA (CPU: FlexAttention has no
    CPU backward)."""
    if requested == "auto":
        if flash_attn_available() and dtype == torch.bfloat16:
            return FLASH
        return "flex_attention" if torch.cuda.is_available() else "sdpa"
    if requested == FLASH:
        if not flash_attn_available():
            raise UserError(
                "config field 'model.attn_implementation': 'flash_attention_2' needs the flash-attn package "
                "(pip install 'mftcoder-coba[flash-attn]') and a CUDA device; 'auto' falls back to "
                "flex_attention (GPU) or sdpa (CPU)"
            )
        if dtype != torch.bfloat16:
            raise UserError("config field 'model.attn_implementation': 'flash_attention_2' needs model.dtype 'bf16'")
    return requested


def varlen_kwargs(position_ids: torch.Tensor) -> dict[str, torch.Tensor | int]:
    """flash-attn varlen arguments for ``position_ids`` (B, L) flattened into one row of B·L tokens.

    A sample starts at every row start and wherever a position is not the previous one plus one, so a
    sample that happens to end a row never merges with the next row's first sample.
    """
    batch, length = position_ids.shape
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    boundaries = starts.reshape(-1).nonzero().view(-1).to(torch.int32)
    total = torch.tensor([batch * length], dtype=torch.int32, device=position_ids.device)
    cu_seqlens = torch.cat([boundaries, total])
    max_length = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
    return {
        "cu_seq_lens_q": cu_seqlens,
        "cu_seq_lens_k": cu_seqlens,
        "max_length_q": max_length,
        "max_length_k": max_length,
    }
