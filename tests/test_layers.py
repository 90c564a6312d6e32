"""Decoder-layer options: full and selective gradient checkpointing and regional torch.compile keep the
model's function and gradients, keep parameter names, and do save less for backward."""
from __future__ import annotations

import pytest
import torch

from mftcoder_coba.bench_memory import saved_bytes
from mftcoder_coba.config_io import build
from mftcoder_coba.errors import ConfigError, UserError
from mftcoder_coba.models import ModelConfig, build_model, hidden_states, lm_head
from mftcoder_coba.models.layers import checkpointing_kwargs, compile_layers, decoder_layers

VOCAB = 64
TINY = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 80, "max_position_embeddings": 64}


def _cfg(**fields) -> ModelConfig:
    data = {"model_config": TINY, "dtype": "fp32", "attn_implementation": "sdpa", "cgc_lora": {"dropout": 0.0}}
    data.update(fields)
    return build(ModelConfig, data, prefix="model.")


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 16), generator=g)
    positions = torch.tensor([list(range(7)) + list(range(9)), list(range(16))])
    tasks = torch.randint(0, 3, (2, 16), generator=g)
    return ids, positions, tasks


def _loss_and_grads(model: torch.nn.Module, seed: int, tasks: bool = False) -> tuple[torch.Tensor, dict]:
    ids, positions, task_ids = _batch(seed)
    h = hidden_states(model, ids, positions, task_ids if tasks else None)
    loss = (h.double() @ lm_head(model)[0].double().T).logsumexp(-1).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("checkpointing,compiled", [
    (True, False), ("full", False), ("selective", False), (False, True), ("selective", True),
])
def test_layer_options_keep_loss_and_gradients(checkpointing: bool | str, compiled: bool) -> None:
    torch._dynamo.reset()
    reference = build_model(_cfg(), VOCAB, 1)
    model = build_model(_cfg(gradient_checkpointing=checkpointing, compile=compiled), VOCAB, 1)
    assert list(model.state_dict()) == list(reference.state_dict())  # checkpoints stay interchangeable
    assert model.is_gradient_checkpointing == (checkpointing is not False)
    for seed in (0, 1):  # a second batch runs the cached compiled graph
        want_loss, want = _loss_and_grads(reference, seed)
        got_loss, got = _loss_and_grads(model, seed)
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=0)
        assert got.keys() == want.keys() and len(got) == len(list(model.parameters()))
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("adapter", ["lora", "cgc_lora"])
@pytest.mark.slow
def test_compiled_adapters_match_eager(adapter: str) -> None:
    """Adapters under compile: peft LoRA, and CGC-LoRA, whose gates read task ids set outside the compiled
    layers (a new batch's ids must be used, not those seen when the graph was compiled)."""
    torch._dynamo.reset()
    eager = build_model(_cfg(adapter=adapter, lora={"dropout": 0.0}), VOCAB, 3)
    compiled = build_model(_cfg(adapter=adapter, lora={"dropout": 0.0}, compile=True), VOCAB, 3)
    with torch.no_grad():
        for p in eager.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    compiled.load_state_dict(eager.state_dict())
    for seed in (0, 1, 2):
        want_loss, want = _loss_and_grads(eager, seed, tasks=True)
        got_loss, got = _loss_and_grads(compiled, seed, tasks=True)
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=0)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_selective_checkpointing_saves_less_under_compile() -> None:
    """Also: no graph break (a checkpointed layer that breaks the graph silently runs eagerly; Hugging Face
    ``kernels``' attention decorator did that under transformers 5.25)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    saved = {}
    for checkpointing, compiled in ((False, False), (False, True), ("selective", True), (True, False)):
        model = build_model(_cfg(gradient_checkpointing=checkpointing, compile=compiled), VOCAB, 1)
        saved_bytes(model, 32)
        saved[checkpointing, compiled] = saved_bytes(model, 32)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert saved[True, False] < saved["selective", True] < saved[False, True] <= saved[False, False]


def test_decoder_layers_and_bad_modes() -> None:
    model = build_model(_cfg(), VOCAB, 1)
    assert decoder_layers(model) == list(model.model.layers)
    with pytest.raises(ValueError, match="no decoder layer class"):
        decoder_layers(torch.nn.Linear(2, 2))
    assert checkpointing_kwargs(False) is None
    assert checkpointing_kwargs(True) == {"use_reentrant": False} == checkpointing_kwargs("full")
    assert "context_fn" in checkpointing_kwargs("selective")
    outside = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    outside._no_split_modules = ["Linear"]  # layers that transformers would checkpoint from outside their call
    with pytest.raises(UserError, match="'model.compile': Linear is checkpointed from outside the layer"):
        compile_layers(outside, checkpointed=True)
    with pytest.raises(ConfigError, match="'model.gradient_checkpointing'"):
        _cfg(gradient_checkpointing="sometimes")
    with pytest.raises(ConfigError, match="'model.compile'"):
        _cfg(compile=True, adapter="qlora", path="somewhere", model_config=None)


def test_compiled_layers_share_one_graph_across_layers_and_packings() -> None:
    """Regional compilation must give one graph for all layers and not recompile when the packing changes;
    otherwise a deep model would hit dynamo's recompile limit and silently run its later layers eagerly."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = build_model(_cfg(model_config={**TINY, "num_hidden_layers": 10}, compile=True), VOCAB, 1)
    for seed in (0, 1, 2):
        ids, _, _ = _batch(seed)
        cut = 3 + 4 * seed
        positions = torch.tensor([list(range(cut)) + list(range(16 - cut)), list(range(16))])
        hidden_states(model, ids, positions).sum().backward()
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.slow
def test_engine_bytes_per_parameter() -> None:
    """A real DeepSpeed engine on a bf16 model, bytes per parameter between steps / after the last backward:
    ZeRO-0 (bf16 gradient sums) 2 weights + 4 fp32 master + 8 Adam, + 2 gradients; ZeRO-1 with fp32 gradient
    sums, each gradient added into a kept fp32 buffer in backward: 2 + 4 + 8 + 4 at both points; bf16 masters
    with the stochastic-rounding AdamW: 2 + 2 + 4, + 2."""
    from mftcoder_coba.bench_memory import measure_engine

    shape = {k: v for k, v in TINY.items() if k != "num_hidden_layers"}
    rows = [measure_engine(shape, "bf16", stage, master) for stage, master in ((0, "fp32"), (1, "fp32"), (1, "bf16"))]
    assert [r.grad_accum_dtype for r in rows] == ["bf16", "fp32", "bf16"]
    measured = [(r.bytes_per_param_between_steps, r.bytes_per_param_at_boundary) for r in rows]
    for got, want in zip(measured, [(14.0, 16.0), (18.0, 18.0), (8.0, 10.0)]):
        assert got == pytest.approx(want, rel=0.02), measured
