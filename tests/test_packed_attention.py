"""Packed rows: attention is confined to each sample, so a packed row's per-token losses (and gradients) are
exactly those of its samples run one by one, on every attention path that runs on a CPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mftcoder_coba.config_io import build
from mftcoder_coba.models import ModelConfig, build_model, hidden_states, lm_head
from mftcoder_coba.models.attention import flash_attn_available, varlen_kwargs

VOCAB = 61
SAMPLES = [7, 5, 1, 9, 4]  # one row of 26 tokens: several samples, one of a single token
TINY = {
    "llama": {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 48, "max_position_embeddings": 64},
    "qwen2": {"model_type": "qwen2", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 48, "max_position_embeddings": 64},
    # FlexAttention's compiled CUDA kernels need a head dimension of at least 16.
    "llama_hd16": {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "intermediate_size": 96, "max_position_embeddings": 64},
}


def _model(arch: str, attn: str, dtype: str = "fp32", device: str = "cpu"):
    cfg = build(ModelConfig, {"model_config": TINY[arch], "dtype": dtype, "attn_implementation": attn})
    return build_model(cfg, VOCAB, num_tasks=1).to(device).eval()


def _packed_row(seed: int = 0, samples: list[int] = SAMPLES) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    total = sum(samples)
    ids = torch.randint(0, VOCAB, (1, total), generator=g)
    labels = torch.randint(0, VOCAB, (1, total), generator=g)
    positions = torch.cat([torch.arange(n) for n in samples]).unsqueeze(0)
    return ids, labels, positions


def _token_losses(model, ids: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy in float64 from the hidden states and the head (the trainer's two views)."""
    h = hidden_states(model, ids, positions)
    weight, bias = lm_head(model)
    logits = F.linear(h.double(), weight.double(), None if bias is None else bias.double())
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")


def _one_by_one(model, ids, labels) -> torch.Tensor:
    losses, start = [], 0
    for n in SAMPLES:
        piece = slice(start, start + n)
        positions = torch.arange(n).unsqueeze(0)
        losses.append(_token_losses(model, ids[:, piece], positions, labels[:, piece]))
        start += n
    return torch.cat(losses)


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa")])
def test_packed_losses_and_gradients_equal_samples_run_alone(arch: str, attn: str) -> None:
    model = _model(arch, attn)
    ids, labels, positions = _packed_row()
    packed = _token_losses(model, ids, positions, labels)
    packed_grads = torch.autograd.grad(packed.sum(), list(model.parameters()))
    alone = _one_by_one(model, ids, labels)
    alone_grads = torch.autograd.grad(alone.sum(), list(model.parameters()))
    torch.testing.assert_close(packed, alone, rtol=0, atol=2e-5)
    for got, want in zip(packed_grads, alone_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-6)


@pytest.mark.slow
def test_flex_attention_block_mask_forward_matches_samples_run_alone() -> None:
    # FlexAttention has no CPU backward; its document-causal BlockMask forward is checked here.
    model = _model("llama", "flex_attention")
    ids, labels, positions = _packed_row(seed=1)
    with torch.no_grad():
        torch.testing.assert_close(_token_losses(model, ids, positions, labels), _one_by_one(model, ids, labels),
                                   rtol=0, atol=2e-5)


def test_without_sample_boundaries_losses_differ() -> None:
    """Guards the test above: one long causal sequence (no restarts) gives different losses."""
    model = _model("llama", "sdpa")
    ids, labels, _ = _packed_row()
    with torch.no_grad():
        running = torch.arange(ids.shape[1]).unsqueeze(0)
        leaked = _token_losses(model, ids, running, labels)
        alone = _one_by_one(model, ids, labels)
    first = SAMPLES[0]
    torch.testing.assert_close(leaked[:first], alone[:first], rtol=0, atol=2e-5)
    assert (leaked[first:] - alone[first:]).abs().max() > 1e-3


def test_batch_of_packed_rows_matches_each_row_alone() -> None:
    model = _model("llama", "sdpa")
    rows = [_packed_row(2), _packed_row(3, samples=[20, 6])]
    ids, labels, positions = (torch.cat([r[i] for r in rows]) for i in range(3))
    with torch.no_grad():
        batched = _token_losses(model, ids, positions, labels).view(2, -1)
        for i, (row_ids, row_labels, row_positions) in enumerate(rows):
            torch.testing.assert_close(batched[i], _token_losses(model, row_ids, row_positions, row_labels),
                                       rtol=0, atol=2e-5)


def test_varlen_boundaries_from_position_ids() -> None:
    # Row 0: samples of 3 and 2 tokens; row 1 continues a sample (positions 5, 6) then starts one of 3.
    positions = torch.tensor([[0, 1, 2, 0, 1], [5, 6, 0, 1, 2]])
    kwargs = varlen_kwargs(positions)
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 3, 5, 7, 10]
    assert kwargs["cu_seq_lens_q"].dtype == torch.int32
    assert kwargs["cu_seq_lens_k"] is kwargs["cu_seq_lens_q"]
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 3


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["flash_attention_2", "flex_attention"])
def test_gpu_backends_confine_attention_to_each_sample(attn: str) -> None:
    """flash-attn varlen (batch flattened, boundaries from the position ids) and FlexAttention's BlockMask on a
    batch of two differently packed rows, in bf16: each row's losses match its samples run alone."""
    if attn == "flash_attention_2" and not flash_attn_available():
        pytest.skip("flash-attn is not installed")
    model = _model("llama_hd16", attn, dtype="bf16", device="cuda")
    layouts = [SAMPLES, [20, 6]]
    rows = [_packed_row(seed, samples) for seed, samples in zip((4, 5), layouts)]
    ids, labels, positions = (torch.cat([r[i] for r in rows]).cuda() for i in range(3))
    with torch.no_grad():
        packed = _token_losses(model, ids, positions, labels).view(2, -1)
        for row, samples in enumerate(layouts):
            start = 0
            for n in samples:
                piece = slice(start, start + n)
                alone = _token_losses(model, ids[row:row + 1, piece], torch.arange(n, device="cuda")[None],
                                      labels[row:row + 1, piece])
                torch.testing.assert_close(packed[row, piece], alone, rtol=0, atol=3e-2)
                start += n
