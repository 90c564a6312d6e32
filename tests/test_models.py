"""Model building: config checks, trainable-parameter sets per adapter, save/load round trips, clear errors."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from mftcoder_coba.config_io import build, to_dict
from mftcoder_coba.errors import ConfigError, UserError
from mftcoder_coba.models import (
    ModelConfig,
    build_model,
    causal_lm,
    check_model,
    hidden_states,
    latest_checkpoint,
    lm_head,
    load_trained,
    save_base_model,
    save_trainable,
)

VOCAB = 50
TINY = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 48, "max_position_embeddings": 64}


def _cfg(**fields) -> ModelConfig:
    data = {"model_config": TINY, "dtype": "fp32", "lora": {"dropout": 0.0}, "cgc_lora": {"dropout": 0.0}}
    data.update(fields)
    return build(ModelConfig, data, prefix="model.")


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]] * 2)
    tasks = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3, [2] * 5 + [0] * 4 + [-1] * 3])
    return ids, positions, tasks


def _perturb_trainable(model: torch.nn.Module) -> None:
    """Move trained weights away from their init (LoRA's B starts at zero, which would hide a lost adapter)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)


@pytest.mark.parametrize("fields,field", [
    ({"path": "somewhere"}, "model.path"),
    ({"model_config": None}, "model.path"),
    ({"model_config": {"hidden_size": 8}}, "model.model_config.model_type"),
    ({"adapter": "qlora"}, "model.adapter"),
    ({"lora": {"r": 0}}, "model.lora.r"),
    ({"dtype": "fp8"}, "model.dtype"),
    ({"attn_implementation": "flash"}, "model.attn_implementation"),
])
def test_config_errors_name_the_field(fields: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"'{field}'"):
        _cfg(**fields)


def test_tokenizer_larger_than_embeddings_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model_config.vocab_size.*tokenizer has 50 tokens.*only 40 rows"):
        check_model(_cfg(model_config={**TINY, "vocab_size": 40}), VOCAB)
    saved = tmp_path / "small"
    build_model(_cfg(model_config={**TINY, "vocab_size": 40}), 40, 1).save_pretrained(saved)
    with pytest.raises(ConfigError, match=r"'model.path'.*tokenizer has 50 tokens.*only 40 rows"):
        build_model(_cfg(model_config=None, path=str(saved)), VOCAB, 1)
    # A larger embedding table than the tokenizer (padded vocabularies) is fine.
    assert build_model(_cfg(model_config=None, path=str(saved)), 33, 1).get_input_embeddings().num_embeddings == 40


def test_environment_and_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'model.path'.*no config.json"):
        check_model(_cfg(model_config=None, path=str(tmp_path)), VOCAB)
    with pytest.raises(ConfigError, match=r"'model.model_config.model_type'"):
        check_model(_cfg(model_config={"model_type": "no-such-arch"}), VOCAB)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"'model.adapter'.*qlora.*CUDA"):
            check_model(_cfg(model_config=None, path=str(tmp_path), adapter="qlora"), VOCAB)
        with pytest.raises(UserError, match=r"'model.attn_implementation'.*flash-attn"):
            check_model(_cfg(attn_implementation="flash_attention_2"), VOCAB)


def test_random_init_is_seeded_and_keeps_global_rng() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = build_model(_cfg(init_seed=7), VOCAB, 1)
    assert torch.equal(torch.rand(1), expected_next)
    b = build_model(_cfg(init_seed=7), VOCAB, 1)
    c = build_model(_cfg(init_seed=8), VOCAB, 1)
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.config.vocab_size == VOCAB and a.config.use_cache is False and a.training


def test_trainable_parameters_per_adapter() -> None:
    full = build_model(_cfg(), VOCAB, 3)
    assert all(p.requires_grad for p in full.parameters())

    lora = build_model(_cfg(adapter="lora", lora={"r": 4, "dropout": 0.0}), VOCAB, 3)
    trainable = {n: p for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # all-linear: q,k,v,o,gate,up,down of each layer; r * (in + out) parameters each; the head is not adapted.
    h, kv, ff = 32, 16, 48
    per_layer = sum(4 * (i + o) for i, o in [(h, h), (h, kv), (h, kv), (h, h), (h, ff), (h, ff), (ff, h)])
    assert sum(p.numel() for p in trainable.values()) == 2 * per_layer
    assert not any("lm_head" in n for n in trainable)

    targeted = build_model(_cfg(adapter="lora", lora={"r": 2, "target_modules": ["q_proj", "v_proj"]}), VOCAB, 3)
    names = {n for n, p in targeted.named_parameters() if p.requires_grad}
    assert names and all(".q_proj." in n or ".v_proj." in n for n in names)
    with pytest.raises(ConfigError, match="'model.lora.target_modules'"):
        build_model(_cfg(adapter="lora", lora={"target_modules": ["no_such_proj"]}), VOCAB, 3)

    cgc = build_model(_cfg(adapter="cgc_lora"), VOCAB, 3)
    names = {n for n, p in cgc.named_parameters() if p.requires_grad}
    assert names and all(".cgc." in n for n in names)


def test_cgc_task_ids_reach_the_gates() -> None:
    model = build_model(_cfg(adapter="cgc_lora"), VOCAB, 3)
    _perturb_trainable(model)
    ids, positions, tasks = _batch()
    with torch.no_grad():
        h = hidden_states(model, ids, positions, tasks)
        other = hidden_states(model, ids, positions, torch.zeros_like(tasks))
    # Row 0's first sample is task 0 either way; its other samples change with their task id.
    torch.testing.assert_close(h[0, :5], other[0, :5], rtol=0, atol=1e-6)
    assert (h[0, 5:] - other[0, 5:]).abs().max() > 1e-4


def _run_dir(tmp_path: Path, cfg: ModelConfig, model: torch.nn.Module, steps: tuple[int, ...]) -> Path:
    """A run directory laid out as the trainer writes it (config.yaml, base_model/, checkpoints/step-N/model)."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"run_dir": str(run), "model": to_dict(cfg)}))
    if cfg.adapter != "none":
        save_base_model(model, run / "base_model")
    for step in steps:
        save_trainable(model, run / "checkpoints" / f"step-{step:08d}" / "model")
    return run


@pytest.mark.parametrize("adapter", ["none", "lora", "cgc_lora"])
def test_save_and_load_round_trip(tmp_path: Path, adapter: str) -> None:
    cfg = _cfg(adapter=adapter)
    model = build_model(cfg, VOCAB, 3)
    _perturb_trainable(model)
    run = _run_dir(tmp_path, cfg, model, steps=(5,))
    (run / "checkpoints" / "step-00000005.tmp").mkdir()  # an incomplete checkpoint is never picked
    assert latest_checkpoint(run).name == "step-00000005"
    loaded = load_trained(run)
    assert not loaded.training and type(loaded) is type(model)
    model.eval()
    ids, positions, tasks = _batch()
    with torch.no_grad():
        torch.testing.assert_close(hidden_states(loaded, ids, positions, tasks),
                                   hidden_states(model, ids, positions, tasks), rtol=0, atol=1e-6)
    torch.testing.assert_close(lm_head(loaded)[0], lm_head(model)[0], rtol=0, atol=0)
    if adapter == "lora":  # the base written for the run carries no adapter weights under the base's keys
        saved = build_model(_cfg(model_config=None, path=str(run / "base_model")), VOCAB, 1)
        assert set(saved.state_dict()) == set(causal_lm(build_model(_cfg(), VOCAB, 1)).state_dict())


def test_load_picks_the_given_or_newest_checkpoint_and_reports_missing_pieces(tmp_path: Path) -> None:
    cfg = _cfg(adapter="lora")
    model = build_model(cfg, VOCAB, 1)
    run = _run_dir(tmp_path, cfg, model, steps=(2, 10))
    assert latest_checkpoint(run).name == "step-00000010"
    assert load_trained(run, run / "checkpoints" / "step-00000002") is not None
    assert load_trained(run, run / "checkpoints" / "step-00000002" / "model") is not None
    with pytest.raises(UserError, match="not a checkpoint"):
        load_trained(run, tmp_path / "nowhere")
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(UserError, match="no complete checkpoint"):
        load_trained(run)
    save_trainable(model, run / "checkpoints" / "step-00000011" / "model")
    shutil.rmtree(run / "base_model")
    with pytest.raises(UserError, match="base_model: the base model of this lora run is missing"):
        load_trained(run)
