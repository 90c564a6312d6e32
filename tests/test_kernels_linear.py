"""Fused LM head + per-task cross-entropy against a float64 reference, on CPU (Triton runs interpreted).

The chunk budget is set so that the 37 rows split into chunks of 5 (the last one partial): gradient
accumulation across chunks is what is under test. Tolerances: float32 inputs give float32 products and
sums (``rtol = 1e-5``); with bfloat16 inputs each gradient is a sum of products of bf16-rounded values
(``d logits`` is rounded once to bf16 -- truncated by the Triton interpreter, up to ``2**-7`` --, then
multiplied and summed in float32), and ``d weight`` is accumulated in bf16 across the 8 chunks (one
rounding, ``2**-8``, per chunk): a relative error norm within ``2**-5`` for that case. The bf16 logits
themselves are rounded (``2**-9`` relative, as in any bf16 LM head), which moves each token's ce by at most
twice that times the largest logit magnitude: losses and sums within ``2**-8`` relative.
"""
from __future__ import annotations

import os

import pytest
import torch

from mftcoder_coba.kernels.api import linear_task_cross_entropy
from mftcoder_coba.kernels.task_ce_torch import reference_task_cross_entropy

N, H, V, T = 37, 24, 301, 4
IMPLS = ["torch", "triton"] if os.environ.get("TRITON_INTERPRET") == "1" else ["torch"]
CHUNK = 5 * V * 4  # 5 rows of float32 logits per chunk


def make(dtype, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    tasks = torch.randint(0, T, (N,), generator=g)
    drop = torch.rand(N, generator=g) < 0.2
    labels[drop], tasks[drop] = -100, -1
    return hidden, weight, b, labels, tasks, torch.rand(T, generator=g) + 0.5


def reference(hidden, weight, b, labels, tasks, scale, upstream=1.0):
    leaves = [t.double().requires_grad_(True) for t in (hidden, weight) + ((b,) if b is not None else ())]
    logits = leaves[0] @ leaves[1].t() + (leaves[2] if b is not None else 0)
    loss, sums, counts = reference_task_cross_entropy(logits, labels, tasks, scale)
    (loss * upstream).backward()
    return loss.detach(), sums, counts, [t.grad for t in leaves]


def rel(got, ref):
    return float((got.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_matches_float64(impl, dtype):
    hidden, weight, b, labels, tasks, scale = make(dtype, seed=1)
    ref_loss, ref_sums, ref_counts, ref_grads = reference(hidden, weight, b, labels, tasks, scale, upstream=1.5)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, b)]
    chunk = CHUNK * hidden.element_size() // 4
    loss, sums, counts = linear_task_cross_entropy(
        leaves[0], leaves[1], labels, tasks, scale, bias=leaves[2], impl=impl, chunk_bytes=chunk
    )
    (loss * 1.5).backward()
    loss_rtol = 1e-5 if dtype == torch.float32 else 2.0**-8
    torch.testing.assert_close(loss.double(), ref_loss, rtol=loss_rtol, atol=1e-6)
    torch.testing.assert_close(sums.double(), ref_sums, rtol=loss_rtol, atol=1e-6)
    assert torch.equal(counts, ref_counts)
    bound = 1e-5 if dtype == torch.float32 else 2.0**-5
    for leaf, ref in zip(leaves, ref_grads):
        assert leaf.grad.dtype == dtype
        assert rel(leaf.grad, ref) < bound


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_frozen_head_and_no_bias(impl):
    hidden, weight, _, labels, tasks, scale = make(torch.float32, seed=2, bias=False)
    ref_loss, _, _, (ref_dh, _) = reference(hidden, weight, None, labels, tasks, scale)
    h = hidden.clone().requires_grad_(True)
    loss, _, _ = linear_task_cross_entropy(h, weight, labels, tasks, scale, impl=impl, chunk_bytes=CHUNK)
    loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    assert rel(h.grad, ref_dh) < 1e-5 and weight.grad is None


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_no_grad_and_all_ignored(impl):
    hidden, weight, b, labels, tasks, scale = make(torch.float32, seed=3)
    ref_loss, ref_sums, ref_counts, _ = reference(hidden, weight, b, labels, tasks, scale)
    w = weight.clone().requires_grad_(True)
    with torch.no_grad():
        loss, sums, counts = linear_task_cross_entropy(hidden, w, labels, tasks, scale, bias=b, impl=impl,
                                                       chunk_bytes=CHUNK)
    assert not loss.requires_grad and w.grad is None
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-5, atol=1e-6)
    assert torch.equal(counts, ref_counts)

    h = hidden.clone().requires_grad_(True)
    loss, sums, counts = linear_task_cross_entropy(h, w, torch.full_like(labels, -100), tasks, scale, bias=b,
                                                   impl=impl, chunk_bytes=CHUNK)
    loss.backward()
    assert loss.item() == 0.0 and not counts.any() and not h.grad.any() and not w.grad.any()
