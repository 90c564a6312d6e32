"""The project's loss equals each model's own ``forward(labels=...)`` loss (issue 25, items 1 and 4).

Tiny random fp32 models from transformers' configs, built the way a run builds them (``build_model``). The
transform-bearing configs use values that show at random init: a soft cap of 1.0 (real Gemma uses 30), Cohere's
0.0625 and a Granite ``logits_scaling`` of 8. One sample per row, so the model's own causal loss (its labels are
the inputs, shifted inside) and this project's (labels shifted by the data pipeline) see the same tokens; the
per-task coefficient 1/n makes the project's loss a token mean too. Fused and unfused heads, PyTorch kernels
(the Triton kernels are checked against float64 with the same transforms in ``test_kernels_transform.py``).
"""
from __future__ import annotations

import pytest
import torch

from mftcoder_coba.config_io import build
from mftcoder_coba.models import ModelConfig, build_model, causal_lm
from mftcoder_coba.training.objective import batch_loss

VOCAB = 64
BASE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 48, "max_position_embeddings": 64, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
ZOO = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 8},
    "mistral": {},
    "gemma2": {"head_dim": 8, "final_logit_softcapping": 1.0},
    "gemma3_text": {"head_dim": 8, "final_logit_softcapping": 1.0},
    "starcoder2": {},
    "phi3": {},
    "granite": {"logits_scaling": 8.0},
    "cohere": {"logit_scale": 0.0625},
}


def _model(model_type: str) -> torch.nn.Module:
    data = {"model_config": {"model_type": model_type, **BASE, **ZOO[model_type]}, "dtype": "fp32",
            "attn_implementation": "eager" if model_type == "gemma2" else "sdpa"}  # gemma2 has no sdpa
    torch.manual_seed(0)
    return build_model(build(ModelConfig, data, prefix="model."), VOCAB, 1)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("model_type", sorted(ZOO))
def test_loss_equals_the_models_own(model_type: str, fused: bool) -> None:
    model = _model(model_type).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (1, 16), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1)
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(16)[None],
             "task_ids": torch.zeros_like(ids)}
    with torch.no_grad():
        own = causal_lm(model)(input_ids=ids, labels=ids, use_cache=False).loss.double()
        ours, _, _ = batch_loss(model, batch, torch.tensor([1.0 / 15]), fused_linear=fused, impl="torch")
    torch.testing.assert_close(ours.double(), own, rtol=2e-6, atol=0)
