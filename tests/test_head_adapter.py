"""An adapter on ``lm_head`` (peft LoRA, CGC-LoRA) is trained by the fused loss path exactly as by the unfused
one (issue 25, item 5): the fused path used to read the frozen base weight, so the adapter got no gradient."""
from __future__ import annotations

import pytest
import torch

from mftcoder_coba.config_io import build
from mftcoder_coba.errors import UserError
from mftcoder_coba.models import ModelConfig, build_model
from mftcoder_coba.training.head_grads import HeadGradNorms
from mftcoder_coba.training.objective import batch_loss

VOCAB = 50
TINY = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 48, "max_position_embeddings": 64}
ADAPTERS = {
    "lora": {"adapter": "lora", "lora": {"r": 4, "dropout": 0.0, "target_modules": ["q_proj", "lm_head"]}},
    "cgc_lora": {"adapter": "cgc_lora", "cgc_lora": {"dropout": 0.0, "target_modules": ["q_proj", "lm_head"]}},
}


def _model(adapter: str) -> torch.nn.Module:
    data = {"model_config": TINY, "dtype": "fp32", **ADAPTERS[adapter]}
    model = build_model(build(ModelConfig, data, prefix="model."), VOCAB, 3)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move adapters off their zero init, which would hide a missing gradient path
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 10), generator=g)
    labels = torch.randint(0, VOCAB, (2, 10), generator=g)
    labels[1, 7:] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]] * 2),
            "task_ids": torch.tensor([[0] * 5 + [1] * 5, [2] * 7 + [-1] * 3])}


def _grads(model: torch.nn.Module, fused: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss, _, _ = batch_loss(model, _batch(), torch.tensor([0.2, 0.3, 0.5]), fused_linear=fused, impl="torch")
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_fused_path_trains_the_head_adapter(adapter: str) -> None:
    model = _model(adapter)
    head_params = [n for n in _grads(model, False)[1] if "lm_head" in n]
    assert head_params, "the adapter must sit on lm_head for this test"
    loss_unfused, unfused = _grads(model, False)
    loss_fused, fused = _grads(model, True)
    torch.testing.assert_close(loss_fused, loss_unfused, rtol=1e-6, atol=0)
    for name in head_params:
        assert unfused[name].abs().max() > 0
        torch.testing.assert_close(fused[name], unfused[name], rtol=1e-5, atol=1e-7)


def test_head_gradient_balancer_refuses_a_head_adapter() -> None:
    with pytest.raises(UserError, match="adapter on lm_head"):
        HeadGradNorms(_model("lora"), 3, "torch")
