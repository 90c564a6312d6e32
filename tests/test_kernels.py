"""Per-task cross-entropy kernels against a float64 PyTorch reference, on CPU (Triton runs interpreted).

Shapes are odd on purpose: V = 301 spans three 128-wide vocabulary blocks with a partial last one, and
N = 37 rows are shared unevenly by the 4 programs of the interpreted persistent grid.

Tolerances, per element (``|got - ref| <= atol + rtol * |ref|``), from what one rounding can cost:
- float32 logits/gradients: everything is float32 arithmetic over at most 301 terms, so ``rtol = 1e-5``.
- float16 gradients: one round-to-nearest to an 11-bit significand, ``2**-11``, plus float16's subnormal
  spacing ``2**-24`` as ``atol``.
- bfloat16 gradients: an 8-bit significand; the Triton *interpreter* truncates float32 -> bfloat16
  (a GPU rounds to nearest), so one rounding costs up to ``2**-7``.
- a non-unit upstream gradient adds a second rounding of the stored gradient: twice those bounds.
Losses and per-task sums are float32 accumulations of a few dozen terms: ``rtol = 1e-5``.
"""
from __future__ import annotations

import os

import pytest
import torch

from mftcoder_coba.errors import UserError
from mftcoder_coba.kernels import task_ce_torch
from mftcoder_coba.kernels.api import linear_task_cross_entropy, task_cross_entropy
from mftcoder_coba.kernels.task_ce_torch import reference_task_cross_entropy

# Triton on CPU tensors needs its interpreter (conftest sets it on machines without CUDA)
IMPLS = ["torch", "triton"] if os.environ.get("TRITON_INTERPRET") == "1" else ["torch"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROUNDING = {torch.float32: (1e-5, 1e-9), torch.float16: (2.0**-11 + 1e-5, 2.0**-24),
            torch.bfloat16: (2.0**-7 + 1e-5, 1e-9)}
N, V, T = 37, 301, 5


def make(n=N, v=V, t=T, dtype=torch.float32, seed=0, ignored=0.25, task_dtype=torch.int64):
    """Fresh random inputs; ignored tokens carry task id -1 like the packed data's padding."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * 3).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    tasks = torch.randint(0, t, (n,), generator=g)
    drop = torch.rand(n, generator=g) < ignored
    labels[drop] = -100
    tasks[drop] = -1
    scale = torch.rand(t, generator=g) + 0.25
    return logits, labels, tasks.to(task_dtype), scale


def reference(logits, labels, tasks, scale, upstream=1.0):
    x = logits.double().requires_grad_(True)
    loss, sums, counts = reference_task_cross_entropy(x, labels, tasks, scale)
    (loss * upstream).backward()
    return loss.detach(), sums, counts, x.grad


def close(got, ref, rtol, atol):
    torch.testing.assert_close(got.double(), ref.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_outputs_and_gradient_match_float64(impl, dtype):
    logits, labels, tasks, scale = make(dtype=dtype, seed=1)
    ref_loss, ref_sums, ref_counts, ref_grad = reference(logits, labels, tasks, scale)
    x = logits.clone().requires_grad_(True)
    loss, sums, counts = task_cross_entropy(x, labels, tasks, scale, impl=impl)
    assert loss.dtype == torch.float32 and loss.shape == () and sums.dtype == torch.float32
    assert counts.dtype == torch.int64 and not sums.requires_grad and not counts.requires_grad
    close(loss, ref_loss, 1e-5, 1e-6)
    close(sums, ref_sums, 1e-5, 1e-6)
    assert torch.equal(counts, ref_counts)
    loss.backward()
    close(x.grad, ref_grad, *ROUNDING[dtype])
    assert torch.equal(x.detach(), logits), "the logits must not change outside in-place mode"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_unit_upstream_gradient_is_folded_in(impl, dtype):
    logits, labels, tasks, scale = make(dtype=dtype, seed=2)
    *_, ref_grad = reference(logits, labels, tasks, scale, upstream=-2.75)
    x = logits.clone().requires_grad_(True)
    loss, _, _ = task_cross_entropy(x, labels, tasks, scale, impl=impl)
    (loss * -2.75).backward()
    rtol, atol = ROUNDING[dtype]
    close(x.grad, ref_grad, 2 * rtol, 2 * atol)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_tasks_all_ignored_and_int32_task_ids(impl):
    logits, labels, tasks, scale = make(t=7, seed=3, task_dtype=torch.int32)
    tasks = torch.where(labels == -100, tasks, tasks % 3)  # tasks 3..6 have no tokens
    ref_loss, ref_sums, ref_counts, ref_grad = reference(logits, labels, tasks, scale)
    x = logits.clone().requires_grad_(True)
    loss, sums, counts = task_cross_entropy(x, labels, tasks, scale, impl=impl)
    loss.backward()
    assert torch.equal(counts[3:], torch.zeros(4, dtype=torch.int64)) and torch.equal(sums[3:], torch.zeros(4))
    close(loss, ref_loss, 1e-5, 1e-6)
    close(sums, ref_sums, 1e-5, 1e-6)
    close(x.grad, ref_grad, *ROUNDING[torch.float32])

    x = logits.clone().requires_grad_(True)
    ignored = torch.full_like(labels, -7)
    loss, sums, counts = task_cross_entropy(x, ignored, torch.full_like(tasks, -1), scale, ignore_index=-7, impl=impl)
    loss.backward()
    assert loss.item() == 0.0 and not sums.any() and not counts.any()
    assert torch.equal(x.grad, torch.zeros_like(logits)), "ignored rows must get an explicit zero gradient"


@pytest.mark.parametrize("impl", IMPLS)
def test_no_grad_only_reads(impl):
    logits, labels, tasks, scale = make(dtype=torch.bfloat16, seed=4)
    ref_loss, ref_sums, ref_counts, _ = reference(logits, labels, tasks, scale)
    x = logits.clone().requires_grad_(True)
    with torch.no_grad():
        loss, sums, counts = task_cross_entropy(x, labels, tasks, scale, impl=impl, inplace=True)
    assert not loss.requires_grad and x.grad is None and torch.equal(x.detach(), logits)
    close(loss, ref_loss, 1e-5, 1e-6)
    close(sums, ref_sums, 1e-5, 1e-6)
    assert torch.equal(counts, ref_counts)


@pytest.mark.parametrize("impl", IMPLS)
def test_inplace_mode_writes_the_gradient_over_the_logits(impl):
    logits, labels, tasks, scale = make(dtype=torch.float16, seed=5)
    ref_loss, _, _, ref_grad = reference(logits, labels, tasks, scale, upstream=0.5)
    leaf = logits.clone().requires_grad_(True)
    x = leaf * 1  # a non-leaf, like an LM head's output
    loss, _, _ = task_cross_entropy(x, labels, tasks, scale, impl=impl, inplace=True)
    close(loss, ref_loss, 1e-5, 1e-6)
    (loss * 0.5).backward()
    rtol, atol = ROUNDING[torch.float16]
    close(leaf.grad, ref_grad, 2 * rtol, 2 * atol)
    close(x.detach(), ref_grad, 2 * rtol, 2 * atol)  # the storage now holds the gradient


@pytest.mark.parametrize("impl", IMPLS)
def test_second_backward_raises(impl):
    logits, labels, tasks, scale = make(seed=6)
    x = logits.clone().requires_grad_(True)
    loss, _, _ = task_cross_entropy(x, labels, tasks, scale, impl=impl)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_checking_mode_names_the_token(monkeypatch):
    logits, labels, tasks, scale = make(seed=7)
    first = int((labels != -100).nonzero()[0, 0])
    bad = labels.clone()
    bad[first] = V + 3
    with pytest.raises(UserError, match=rf"token {first}: label {V + 3} is outside the vocabulary \[0, {V}\)"):
        task_cross_entropy(logits, bad, tasks, scale, check=True)
    bad_tasks = tasks.clone()
    bad_tasks[first] = T
    with pytest.raises(UserError, match=rf"token {first}: task id {T} is outside \[0, {T}\)"):
        task_cross_entropy(logits, labels, bad_tasks, scale, check=True)
    monkeypatch.setenv("MFTCODER_COBA_CHECK_IDS", "1")
    with pytest.raises(UserError, match="1 such token"):
        linear_task_cross_entropy(torch.randn(N, 8), torch.randn(V, 8), bad, tasks, scale)
    # padding: task id -1 under ignore_index is fine even when checking
    task_cross_entropy(logits, labels, tasks, scale)


@pytest.mark.parametrize("impl", IMPLS)
def test_unchecked_out_of_range_tokens_are_left_out(impl):
    logits, labels, tasks, scale = make(seed=8)
    live = (labels != -100).nonzero()[:, 0]
    bad_labels, bad_tasks = labels.clone(), tasks.clone()
    bad_labels[live[0]] = V
    bad_labels[live[1]] = -5
    bad_tasks[live[2]] = T + 1
    kept_labels = labels.clone()
    kept_labels[live[:3]] = -100
    ref_loss, ref_sums, ref_counts, ref_grad = reference(logits, kept_labels, tasks, scale)
    x = logits.clone().requires_grad_(True)
    loss, sums, counts = task_cross_entropy(x, bad_labels, bad_tasks, scale, impl=impl, check=False)
    loss.backward()
    close(loss, ref_loss, 1e-5, 1e-6)
    close(sums, ref_sums, 1e-5, 1e-6)
    assert torch.equal(counts, ref_counts)
    close(x.grad, ref_grad, *ROUNDING[torch.float32])


def test_torch_path_chunks_rows_without_changing_results():
    logits, labels, tasks, scale = make(dtype=torch.bfloat16, seed=9)
    _, ref_sums, _, ref_grad = reference(logits, labels, tasks, scale)
    row_ce = torch.empty(N)
    grad = torch.empty_like(logits)
    task_ce_torch.task_ce_rows(logits, labels, tasks, scale, -100, row_ce, grad, chunk_bytes=4 * V * 5)
    _, sums, _ = task_ce_torch.task_reduce(row_ce, labels, tasks, scale, -100, V)
    close(sums, ref_sums, 1e-5, 1e-6)
    close(grad, ref_grad, *ROUNDING[torch.bfloat16])


@pytest.mark.skipif("triton" not in IMPLS, reason="needs Triton (CUDA or TRITON_INTERPRET=1)")
def test_explicit_launch_gives_the_default_results():
    """A launch configuration passed as an argument (what the benchmark sweep does) changes only how a row is
    cut into blocks (here 5 blocks of 64 or one masked block of 512 instead of the default's 3 of 128), not
    the results: the same float64-reference agreement as the default launch."""
    from mftcoder_coba.kernels.task_ce_triton import RowsLaunch, task_ce_rows, task_reduce

    logits, labels, tasks, scale = make(seed=13)
    ref_loss, ref_sums, ref_counts, ref_grad = reference(logits, labels, tasks, scale)
    for launch in (None, RowsLaunch(block_v=64, num_warps=4, programs_per_sm=2, split=2),
                   RowsLaunch(block_v=512, num_warps=8)):
        row_ce, grad = torch.empty(N), torch.empty_like(logits)
        task_ce_rows(logits, labels, tasks, scale, -100, row_ce, grad, launch=launch)
        loss, sums, counts = task_reduce(row_ce, labels, tasks, scale, -100, V)
        close(loss, ref_loss, 1e-5, 1e-6)
        close(sums, ref_sums, 1e-5, 1e-6)
        assert torch.equal(counts, ref_counts)
        close(grad, ref_grad, *ROUNDING[torch.float32])
    with pytest.raises(ValueError, match="RowsLaunch.block_v must be a power of two"):
        RowsLaunch(block_v=100, num_warps=4)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_logits(impl):
    logits, labels, tasks, scale = make(seed=10)
    ref_loss, _, _, ref_grad = reference(logits, labels, tasks, scale)
    x = logits.t().contiguous().requires_grad_(True)
    loss, _, _ = task_cross_entropy(x.t(), labels, tasks, scale, impl=impl)
    loss.backward()
    close(loss, ref_loss, 1e-5, 1e-6)
    close(x.grad.t(), ref_grad, *ROUNDING[torch.float32])


def test_bad_arguments_are_rejected():
    logits, labels, tasks, scale = make(seed=11)
    with pytest.raises(ValueError, match="impl must be one of"):
        task_cross_entropy(logits, labels, tasks, scale, impl="cuda")
    with pytest.raises(ValueError, match="labels and task_ids must be"):
        task_cross_entropy(logits, labels[:-1], tasks, scale)
    with pytest.raises(ValueError, match="task_scale must be"):
        task_cross_entropy(logits, labels, tasks, scale[:0])
    with pytest.raises(ValueError, match="inplace=True needs"):
        task_cross_entropy(logits.t().contiguous().t().requires_grad_(True), labels, tasks, scale, inplace=True)


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    """The Triton path is registered as custom ops with fake implementations: a compiled graph holds it
    whole (no graph break) and gives the eager numbers, gradient included."""
    impl = IMPLS[-1]
    logits, labels, tasks, scale = make(seed=12)

    def objective(x, labels, tasks, scale):
        loss, sums, counts = task_cross_entropy(x, labels, tasks, scale, impl=impl)
        return loss * 2, sums, counts

    compiled = torch.compile(objective, fullgraph=True)
    x_eager, x_comp = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    got, want = compiled(x_comp, labels, tasks, scale), objective(x_eager, labels, tasks, scale)
    got[0].backward()
    want[0].backward()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=0)
    torch.testing.assert_close(x_comp.grad, x_eager.grad, rtol=1e-6, atol=1e-9)
