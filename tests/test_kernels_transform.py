"""The models' logit transforms inside the kernels (issue 25, item 1): Cohere's ``logit_scale``, Granite's
``1 / logits_scaling`` and Gemma 2/3's ``final_logit_softcapping``, in the per-task and the fused linear kernels,
losses and gradients against float64 PyTorch. float32 arithmetic over a few hundred terms: ``rtol = 1e-5``; tanh
is formed from one exp2 in the Triton kernels, an absolute error of about one float32 ulp of the cap."""
from __future__ import annotations

import os

import pytest
import torch

from mftcoder_coba.kernels.api import linear_task_cross_entropy, task_cross_entropy
from mftcoder_coba.kernels.task_ce_torch import reference_task_cross_entropy

IMPLS = ["torch", "triton"] if os.environ.get("TRITON_INTERPRET") == "1" else ["torch"]
N, V, H, T = 11, 301, 16, 3
TRANSFORMS = {
    "cohere": {"logit_scale": 0.0625},
    "granite": {"logit_scale": 1 / 8},
    "gemma_cap1": {"softcap": 1.0},
    "gemma_cap30": {"softcap": 30.0},
    "scale_and_cap": {"logit_scale": 0.5, "softcap": 5.0},
}


def make(seed: int):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (N,), generator=g)
    tasks = torch.randint(0, T, (N,), generator=g)
    labels[-2:], tasks[-2:] = -100, -1
    return g, labels, tasks, torch.rand(T, generator=g) + 0.5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_transformed_logits_match_float64(impl, name):
    kw = TRANSFORMS[name]
    g, labels, tasks, scale = make(0)
    logits = torch.randn(N, V, generator=g) * 20  # past the cap of 30 for some: tanh's saturated part too
    x = logits.clone().requires_grad_(True)
    loss, sums, _ = task_cross_entropy(x, labels, tasks, scale, impl=impl, **kw)
    loss.backward()
    xd = logits.double().requires_grad_(True)
    ref_loss, ref_sums, _ = reference_task_cross_entropy(xd, labels, tasks, scale, **kw)
    ref_loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-8)
    with torch.no_grad():  # the read-only path applies it too
        torch.testing.assert_close(task_cross_entropy(logits, labels, tasks, scale, impl=impl, **kw)[1], sums)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_fused_linear_transform_matches_float64(impl, name):
    kw = TRANSFORMS[name]
    g, labels, tasks, scale = make(1)
    hidden, weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 2
    bias = torch.randn(V, generator=g)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss, sums, _ = linear_task_cross_entropy(*leaves[:2], labels, tasks, scale, bias=leaves[2], impl=impl,
                                              chunk_bytes=4 * V * 4, **kw)
    loss.backward()
    ref = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
    ref_loss, ref_sums, _ = reference_task_cross_entropy(ref[0] @ ref[1].t() + ref[2], labels, tasks, scale, **kw)
    ref_loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-5, atol=1e-6)
    for got, want in zip(leaves, ref):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-6)


def test_bad_transform_values_are_one_line():
    g, labels, tasks, scale = make(2)
    logits = torch.randn(N, V, generator=g)
    with pytest.raises(ValueError, match="logit_scale must be a finite number > 0"):
        task_cross_entropy(logits, labels, tasks, scale, logit_scale=0.0)
    with pytest.raises(ValueError, match="softcap must be None or a finite number >= 0"):
        task_cross_entropy(logits, labels, tasks, scale, softcap=-1.0)
