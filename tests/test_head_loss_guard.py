"""The probe guard (issue 25, item 2): a model whose own ``forward(labels=...)`` loss this project does not
reproduce is refused in one line naming its model type and the difference, before the first step and in
``eval``; ``train.check_model_loss: false`` overrides. The real case today: a MoE model whose forward adds its
config attribute naming a transform the model's own forward does not apply (this project would apply it)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import run_config

from mftcoder_coba.config_io import build
from mftcoder_coba.errors import UserError
from mftcoder_coba.models import ModelConfig, build_model
from mftcoder_coba.training.loss_guard import check_own_loss, probe_losses

VOCAB = 64
# LlamaForCausalLM ignores final_logit_softcapping; models.head reads it from any config
CAPPED_LLAMA = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
                "num_key_value_heads": 2, "intermediate_size": 48, "max_position_embeddings": 64,
                "final_logit_softcapping": 1.0}
COHERE = {"model_type": "cohere", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
          "num_key_value_heads": 2, "intermediate_size": 48, "max_position_embeddings": 64, "logit_scale": 0.0625}


def _model(model_config: dict) -> torch.nn.Module:
    data = {"model_config": model_config, "dtype": "fp32", "attn_implementation": "sdpa"}
    return build_model(build(ModelConfig, data, prefix="model."), VOCAB, 1)


@pytest.mark.parametrize("fused", [True, False])
def test_a_model_whose_loss_is_reproduced_passes(fused: bool) -> None:
    model = _model(COHERE).train()
    ours, own = probe_losses(model, fused_linear=fused, impl="torch")
    assert ours == pytest.approx(own, rel=1e-5)
    check_own_loss(model, fused_linear=fused, impl="torch", override="x")
    assert model.training and all(m.training for m in model.modules()), "train/eval flags must be restored"


def test_the_trainer_probe_of_a_cpu_model_takes_a_gpu_runs_impl(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer passes the resolved kernel impl (``triton`` on a GPU) while the model is still on the CPU."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as on a GPU machine: Triton would refuse CPU tensors
    check_own_loss(_model(COHERE), fused_linear=True, impl="triton", override="x")


def test_a_forward_with_an_extra_loss_term_is_refused_in_one_line() -> None:
    model = _model(CAPPED_LLAMA)
    with pytest.raises(UserError, match=r"model type 'llama': .* differs .* set train.check_model_loss: false") as e:
        check_own_loss(model, fused_linear=True, impl="torch", override="train.check_model_loss: false")
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_train_refuses_before_the_first_step_and_the_option_overrides(prepared: Path, tmp_path: Path) -> None:
    from mftcoder_coba.training import train

    model = {"model_config": dict(CAPPED_LLAMA), "dtype": "fp32", "attn_implementation": "sdpa"}
    with pytest.raises(UserError, match="model type 'llama'"):
        train(run_config(prepared, tmp_path / "refused", model=model, train={"max_steps": 1}))
    assert not (tmp_path / "refused" / "metrics.jsonl").exists()
    run = train(run_config(prepared, tmp_path / "forced", model=model, train={"max_steps": 1,
                                                                             "check_model_loss": False}))
    assert (run / "metrics.jsonl").exists()
