"""NEFTune (issue 23, item 7): ``model.neftune_alpha`` adds uniform noise of scale alpha / sqrt(L * d) to the
input embeddings in training mode only."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from train_helpers import SEQ_LEN, TINY_LLAMA, run_config

from mftcoder_coba.models import build_model, causal_lm


def test_noise_scale_training_only(prepared: Path, tmp_path: Path) -> None:
    cfg = run_config(prepared, tmp_path / "run", model={"neftune_alpha": 5.0})
    plain = run_config(prepared, tmp_path / "run", model={"neftune_alpha": 0.0})
    noisy = causal_lm(build_model(cfg.model, 128, 1)).get_input_embeddings()
    clean = causal_lm(build_model(plain.model, 128, 1)).get_input_embeddings()
    ids = torch.randint(0, 128, (2, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        delta = noisy(ids) - clean(ids)  # same init seed: the same weights, so the difference is the noise
        scale = 5.0 / math.sqrt(SEQ_LEN * TINY_LLAMA["hidden_size"])
        assert delta.abs().max() <= scale * (1 + 1e-6) and delta.abs().max() > 0.9 * scale
        assert abs(delta.pow(2).mean().item() - scale ** 2 / 3) < 0.1 * scale ** 2 / 3  # uniform's variance
        noisy.eval()
        assert torch.equal(noisy(ids), clean(ids))
