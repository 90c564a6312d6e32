"""Kernel numerics at the edges (issue 25, item 5): masked vocabulary blocks, large logits, size-0 vocabularies
and arguments of the wrong kind, against float64.

The interpreter's Triton launch streams the vocabulary in 128-wide blocks, so masking columns [0, 128) makes a
row's *first* block all ``-inf`` (or ``finfo.min``, what ``masked_fill`` usually writes): the online
log-sum-exp then starts from a block without a finite maximum. Tolerances as in ``test_kernels.py``: float32
arithmetic over a few hundred terms, ``rtol = 1e-5``.
"""
from __future__ import annotations

import os

import pytest
import torch

from mftcoder_coba.kernels.api import linear_task_cross_entropy, task_cross_entropy
from mftcoder_coba.kernels.task_ce_torch import reference_task_cross_entropy

IMPLS = ["torch", "triton"] if os.environ.get("TRITON_INTERPRET") == "1" else ["torch"]
N, V, H, T = 9, 301, 16, 3
MASKED = 128  # one interpreter block: the whole first block of every row


def make(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g) * 3
    labels = torch.randint(MASKED, V, (N,), generator=g)
    tasks = torch.randint(0, T, (N,), generator=g)
    labels[-1], tasks[-1] = -100, -1  # an ignored (padding) row
    return logits, labels, tasks, torch.rand(T, generator=g) + 0.5


def reference(logits, labels, tasks, scale):
    x = logits.double().requires_grad_(True)
    loss, sums, counts = reference_task_cross_entropy(x, labels, tasks, scale)
    loss.backward()
    return loss.detach(), sums, counts, x.grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fill", ["-inf", "finfo.min"])
def test_masked_first_block_matches_float64(impl, fill):
    logits, labels, tasks, scale = make()
    value = float("-inf") if fill == "-inf" else torch.finfo(torch.float32).min
    logits[:, :MASKED] = value
    logits[-1] = value  # the ignored row masked whole, as a padding row often is
    ref_loss, ref_sums, ref_counts, ref_grad = reference(logits[:-1], labels[:-1], tasks[:-1], scale)
    x = logits.clone().requires_grad_(True)
    loss, sums, counts = task_cross_entropy(x, labels, tasks, scale, impl=impl)
    loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-5, atol=0)
    assert torch.equal(counts, ref_counts)
    torch.testing.assert_close(x.grad[:-1].double(), ref_grad, rtol=1e-5, atol=1e-9)
    assert torch.equal(x.grad[-1], torch.zeros(V)), "an ignored row's gradient must be exactly 0"


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_with_minus_inf_bias_on_masked_columns(impl):
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.5
    _, labels, tasks, scale = make(1)
    bias = torch.randn(V, generator=g)
    bias[:MASKED] = float("-inf")
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, sums, _ = linear_task_cross_entropy(h, w, labels, tasks, scale, bias=bias, impl=impl, chunk_bytes=4 * V * 4)
    loss.backward()
    hd, wd = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    ref_loss, ref_sums, _ = reference_task_cross_entropy(hd @ wd.t() + bias.double(), labels, tasks, scale)
    ref_loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-5, atol=0)
    torch.testing.assert_close(h.grad.double(), hd.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), wd.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_large_logits_keep_the_loss_digits(impl):
    """Logits shifted by 1e4: float32 spacing there is ~1e-3, so a stored log-sum-exp minus the label's logit
    loses ~1e-3 per token; ``(m - x_label) + log d`` keeps float32's relative precision of each term."""
    logits, labels, tasks, scale = make(2)
    logits += 1e4
    ref_loss, ref_sums, _, ref_grad = reference(logits, labels, tasks, scale)
    x = logits.clone().requires_grad_(True)
    loss, sums, _ = task_cross_entropy(x, labels, tasks, scale, impl=impl)
    loss.backward()
    torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("impl", IMPLS)
def test_vocabulary_of_size_zero_is_one_line(impl):
    labels, tasks, scale = torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), torch.ones(1)
    with pytest.raises(ValueError, match="vocabulary of size 0"):
        task_cross_entropy(torch.zeros(4, 0), labels, tasks, scale, impl=impl)
    with pytest.raises(ValueError, match="vocabulary of size 0"):
        linear_task_cross_entropy(torch.zeros(4, 8), torch.zeros(0, 8), labels, tasks, scale, impl=impl)


def test_arguments_of_the_wrong_kind_are_one_line():
    logits, labels, tasks, scale = make(3)
    cases = [
        (TypeError, "labels must be a torch.Tensor", (logits, labels.tolist(), tasks, scale)),
        (TypeError, "task_ids must be a torch.Tensor", (logits, labels, tasks.tolist(), scale)),
        (TypeError, "task_scale must be a torch.Tensor", (logits, labels, tasks, scale.tolist())),
        (TypeError, "logits must be a torch.Tensor", (logits.tolist(), labels, tasks, scale)),
        (ValueError, "task_scale must be a floating tensor", (logits, labels, tasks, torch.ones(T, dtype=torch.long))),
        (ValueError, "labels must be an integer tensor", (logits, labels >= 0, tasks, scale)),
        (ValueError, "logits must be a floating tensor", (logits.long(), labels, tasks, scale)),
    ]
    for error, message, args in cases:
        with pytest.raises(error, match=message):
            task_cross_entropy(*args)
    hidden, weight = torch.randn(N, H), torch.randn(V, H)
    with pytest.raises(ValueError, match="hidden must be a floating tensor"):
        linear_task_cross_entropy(hidden.long(), weight.long(), labels, tasks, scale)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        linear_task_cross_entropy(hidden, weight.tolist(), labels, tasks, scale)
