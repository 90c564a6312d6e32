"""NEFTune (Jain et al. 2023, arXiv 2310.05914): uniform noise on the input embeddings while training.

Why: instruction fine-tuning overfits the exact token embeddings of a small SFT set; noise of scale
``alpha / sqrt(L * d)`` (L: sequence length, d: hidden size) on the embeddings during training only regularises
it, and helped chat-style SFT in the paper. It is a forward hook on the embedding layer: off in ``eval()`` mode
(held-out and eval losses, generation), drawn from torch's generator (seeded and checkpointed by the trainer, so
a resumed run draws what an uninterrupted one would).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def add_neftune(embeddings: nn.Module, alpha: float) -> torch.utils.hooks.RemovableHandle:
    """Register the noise hook on ``embeddings`` (the model's input embedding layer); returns its handle."""
    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        scale = alpha / math.sqrt(output.shape[-2] * output.shape[-1])
        return output + torch.empty_like(output).uniform_(-scale, scale)

    return embeddings.register_forward_hook(hook)
