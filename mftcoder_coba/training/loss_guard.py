"""Refuse to train or evaluate a model whose own loss this project does not reproduce (issue 25, item 2).

The trainer computes the loss from the decoder's last hidden state and the LM head (``objective.head_loss``)
and never calls the causal LM's ``forward``, so anything that ``forward`` does between the head and its loss
(a logit transform :mod:`mftcoder_coba.models.head` does not know, an auxiliary loss term) would silently be
dropped. Before the first step, and in ``eval``, one probe row of seeded random tokens goes through both: the
project's per-task loss (one task, coefficient ``1/n``: a token mean) and ``model(input_ids, labels=...)``.
A difference beyond rounding refuses the run in one line naming the model type and the difference, so a new
transformers release that adds a transform fails loudly instead of training the wrong objective.
"""
from __future__ import annotations

import torch

from mftcoder_coba.errors import UserError
from mftcoder_coba.models import causal_lm
from mftcoder_coba.training.objective import batch_loss

PROBE_TOKENS = 16
"""Length of the probe row (shortened to the model's ``max_position_embeddings``)."""

RTOL = {torch.float32: 1e-5, torch.float64: 1e-9}
"""Relative tolerance per parameter dtype: both losses are float32 (float64) arithmetic over the same logits;
half precision heads round the logits once (``2**-8``) in either path, hence ``HALF_RTOL``."""
HALF_RTOL = 4e-3


def probe_losses(model: torch.nn.Module, *, fused_linear: bool, impl: str = "auto") -> tuple[float, float]:
    """``(project's loss, model's own loss)`` on the probe row, in eval mode (no dropout), without gradients.

    The modules' train/eval flags are restored afterwards. The trainer probes the model as built, before
    DeepSpeed moves it to the GPU: off CUDA the PyTorch kernels run whatever ``impl`` the run resolved.
    """
    lm = causal_lm(model)
    config = lm.config.get_text_config()
    length = min(PROBE_TOKENS, int(getattr(config, "max_position_embeddings", PROBE_TOKENS) or PROBE_TOKENS))
    device = lm.get_input_embeddings().weight.device
    impl = impl if device.type == "cuda" else "torch"
    ids = torch.randint(0, lm.get_input_embeddings().weight.shape[0], (1, length),
                        generator=torch.Generator().manual_seed(0)).to(device)
    labels = torch.cat([ids[:, 1:], torch.full((1, 1), -100, device=device)], dim=1)
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(length, device=device)[None],
             "task_ids": torch.zeros_like(ids)}
    scale = torch.tensor([1.0 / (length - 1)], device=device)
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            ours, _, _ = batch_loss(model, batch, scale, fused_linear=fused_linear, impl=impl)
            # the probe's task ids are still set on CGC-LoRA layers, so the model's own forward gates alike
            own = lm(input_ids=ids, labels=ids, use_cache=False).loss
    finally:
        for module, training in modes.items():
            module.train(training)
    return float(ours), float(own)


def check_own_loss(model: torch.nn.Module, *, fused_linear: bool, impl: str = "auto", override: str) -> None:
    """Raise :class:`UserError` when the project's loss and the model's own differ beyond rounding on the probe.

    ``override`` names the option that skips this check, for the message (``train.check_model_loss: false``).
    """
    ours, own = probe_losses(model, fused_linear=fused_linear, impl=impl)
    lm = causal_lm(model)
    dtype = lm.get_input_embeddings().weight.dtype
    rtol = RTOL.get(dtype, HALF_RTOL)
    diff = abs(ours - own)
    if not diff <= rtol * abs(own):  # NaN fails too
        raise UserError(
            f"model type {lm.config.model_type!r}: this project's loss {ours:.6f} differs from the model's own "
            f"forward(labels=...) loss {own:.6f} by {diff:.3g} ({diff / max(abs(own), 1e-30):.2e} relative, "
            f"tolerance {rtol:g}) on a probe row: its forward transforms the logits or adds a loss term "
            f"(e.g. a router auxiliary loss) that training would drop; set {override} to proceed anyway"
        )
