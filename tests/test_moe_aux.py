"""MoE router auxiliary loss (issue 25, item 3): with ``output_router_logits: true`` the training loss adds
``router_aux_loss_coef`` x the load-balancing loss exactly as the model's own forward does (loss equal to
``model(input_ids, labels=...)``), both in ``batch_loss`` (eval, probe guard) and in the engine's ``TaskLoss``,
so every parameter (routers included) gets the model's own gradient; per-task sums stay pure cross-entropy."""
from __future__ import annotations

import pytest
import torch

from mftcoder_coba.config_io import build
from mftcoder_coba.models import ModelConfig, build_model, causal_lm
from mftcoder_coba.training.objective import TaskLoss, batch_loss

VOCAB = 64
BASE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "num_experts_per_tok": 2, "output_router_logits": True,
        "router_aux_loss_coef": 0.5}
MOE = {
    "mixtral": {**BASE, "intermediate_size": 48, "num_local_experts": 4},
    "qwen3_moe": {**BASE, "intermediate_size": 48, "moe_intermediate_size": 16, "num_experts": 4, "head_dim": 8,
                  "decoder_sparse_step": 1},
}


def _setup(model_type: str):
    data = {"model_config": {"model_type": model_type, **MOE[model_type]}, "dtype": "fp32",
            "attn_implementation": "sdpa"}
    torch.manual_seed(0)
    model = build_model(build(ModelConfig, data, prefix="model."), VOCAB, 1).eval()
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1)
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(16)[None],
             "task_ids": torch.zeros_like(ids)}
    return model, ids, batch


@pytest.mark.parametrize("model_type", sorted(MOE))
def test_loss_with_router_aux_equals_the_models_own(model_type: str) -> None:
    model, ids, batch = _setup(model_type)
    scale = torch.tensor([1.0 / 15])
    own = causal_lm(model)(input_ids=ids, labels=ids, use_cache=False)
    assert own.aux_loss is not None and float(own.aux_loss) > 0
    with torch.no_grad():
        ours, sums, _ = batch_loss(model, batch, scale, fused_linear=True, impl="torch")
    torch.testing.assert_close(ours.double(), own.loss.double(), rtol=2e-6, atol=0)
    # the per-task sum is the cross-entropy alone: the aux term is its own quantity
    ce = own.loss.double() - MOE[model_type]["router_aux_loss_coef"] * own.aux_loss.double()
    torch.testing.assert_close(sums[0].double() / 15, ce, rtol=2e-6, atol=0)

    own.loss.backward()
    own_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss, _, _, _ = TaskLoss(model, fused_linear=True, impl="torch")(**batch, scale=scale)
    loss.backward()
    torch.testing.assert_close(loss.detach().double(), own.loss.detach().double(), rtol=2e-6, atol=0)
    for name, p in model.named_parameters():  # routers included: the aux term's gradient is the model's own
        torch.testing.assert_close(p.grad, own_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_lora_on_a_moe_model_trains_attention_router_and_fused_experts() -> None:
    """peft's ``all-linear`` on Mixtral adapts attention, the router and the experts' fused parameters (peft's
    parameter targeting); every adapter gets a gradient from the loss with the aux term. Dropout on the fused
    expert parameters is not supported by peft: one line naming the field."""
    from mftcoder_coba.errors import ConfigError

    mc = {"model_type": "mixtral", **MOE["mixtral"]}
    data = {"model_config": mc, "dtype": "fp32", "attn_implementation": "sdpa", "adapter": "lora",
            "lora": {"dropout": 0.0}}
    model = build_model(build(ModelConfig, data, prefix="model."), VOCAB, 1)
    _, _, batch = _setup("mixtral")
    loss, _, _, _ = TaskLoss(model, fused_linear=True, impl="torch")(**batch, scale=torch.tensor([1.0 / 15]))
    loss.backward()
    lora_b = {n: p for n, p in model.named_parameters() if p.requires_grad and ".lora_B." in n}
    for part in ("self_attn.q_proj", "mlp.gate", "mlp.experts"):
        assert any(part in n for n in lora_b), part
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in lora_b.values())
    with pytest.raises(ConfigError, match="model.lora") as e:
        build_model(build(ModelConfig, {**data, "lora": {"dropout": 0.1}}, prefix="model."), VOCAB, 1)
    assert "\n" not in str(e.value).strip()
