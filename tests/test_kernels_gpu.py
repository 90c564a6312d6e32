"""The compiled Triton kernels on a GPU: float64 references at realistic vocabularies, int64 offsets past
2**31 elements, torch.compile (fullgraph) and CUDA-graph capture. Skipped without CUDA.

On the GPU float32 -> bf16/fp16 conversion rounds to nearest, so one rounding of a gradient costs at most
``2**-9`` (bf16) / ``2**-12`` (fp16) relative, plus fp16's subnormal spacing ``2**-24``; the float32
arithmetic before it (an online sum over V <= 152k exponentials) adds well under ``1e-5``.
"""
from __future__ import annotations

import pytest
import torch

from mftcoder_coba.errors import UserError
from mftcoder_coba.kernels.api import linear_task_cross_entropy, task_cross_entropy
from mftcoder_coba.kernels.task_ce_torch import reference_task_cross_entropy

pytestmark = pytest.mark.gpu
ROUNDING = {torch.float32: (1e-5, 1e-9), torch.float16: (2.0**-11 + 1e-5, 2.0**-24),
            torch.bfloat16: (2.0**-8 + 1e-5, 1e-9)}


def make(n, v, t, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = (torch.randn(n, v, device="cuda", generator=g) * 3).to(dtype)
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    tasks = torch.randint(0, t, (n,), device="cuda", generator=g)
    drop = torch.rand(n, device="cuda", generator=g) < 0.15
    labels[drop], tasks[drop] = -100, -1
    return logits, labels, tasks, torch.rand(t, device="cuda", generator=g) + 0.5


def reference(logits, labels, tasks, scale, upstream=1.0):
    x = logits.double().requires_grad_(True)
    loss, sums, counts = reference_task_cross_entropy(x, labels, tasks, scale)
    (loss * upstream).backward()
    return loss.detach(), sums, counts, x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("v", [32000, 128263])
def test_gpu_matches_float64(dtype, v):
    logits, labels, tasks, scale = make(203, v, 8, dtype, seed=v)
    ref_loss, ref_sums, ref_counts, ref_grad = reference(logits, labels, tasks, scale, upstream=0.75)
    for impl in ("triton", "torch"):
        x = logits.clone().requires_grad_(True)
        loss, sums, counts = task_cross_entropy(x, labels, tasks, scale, impl=impl)
        (loss * 0.75).backward()
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-5, atol=1e-5)
        assert torch.equal(counts, ref_counts)
        rtol, atol = ROUNDING[dtype]
        torch.testing.assert_close(x.grad.double(), ref_grad, rtol=2 * rtol, atol=2 * atol)
        with torch.no_grad():
            nl, ns, nc = task_cross_entropy(logits, labels, tasks, scale, impl=impl)
        torch.testing.assert_close(nl.double(), ref_loss, rtol=1e-5, atol=1e-5)
        assert torch.equal(nc, ref_counts)
        # in-place: the gradient lands in the logits' storage (segments shared by programs at large V)
        leaf = logits.clone().requires_grad_(True)
        y = leaf * 1
        loss, _, _ = task_cross_entropy(y, labels, tasks, scale, impl=impl, inplace=True)
        (loss * 0.75).backward()
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(leaf.grad.double(), ref_grad, rtol=2 * rtol, atol=2 * atol)


@pytest.mark.parametrize("split", [1, 2, 4, 8])
def test_gpu_row_split_configs_agree(split):
    """Every way of sharing a row between programs gives the same gradient (in-place too)."""
    from mftcoder_coba.kernels.task_ce_triton import RowsLaunch, task_ce_rows, task_reduce

    logits, labels, tasks, scale = make(301, 100003, 5, torch.bfloat16, seed=split)
    ref_loss, ref_sums, _, ref_grad = reference(logits, labels, tasks, scale)
    launch = RowsLaunch(block_v=4096, num_warps=8, programs_per_sm=4, split=split)
    for inplace in (False, True):
        row_ce = torch.empty(logits.shape[0], dtype=torch.float32, device="cuda")
        grad = logits.clone() if inplace else torch.empty_like(logits)
        task_ce_rows(grad if inplace else logits, labels, tasks, scale, -100, row_ce, grad, launch=launch)
        loss, sums, _ = task_reduce(row_ce, labels, tasks, scale, -100, logits.shape[1])
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=2.0**-8 + 1e-5, atol=1e-9)


def test_gpu_unit_upstream_gradient_is_one_rounding():
    logits, labels, tasks, scale = make(64, 50257, 3, torch.bfloat16, seed=1)
    *_, ref_grad = reference(logits, labels, tasks, scale)
    x = logits.clone().requires_grad_(True)
    task_cross_entropy(x, labels, tasks, scale)[0].backward()
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=2.0**-8 + 1e-5, atol=1e-9)
    # the true-class entry keeps its float32 value until the one rounding (no bf16 cancellation to 0)
    rows = (labels != -100).nonzero()[:, 0]
    assert (x.grad[rows, labels[rows]] < 0).all()


def test_gpu_offsets_past_2_pow_31():
    n, v = 14200, 151936  # n * v = 2.16e9 elements
    logits, labels, tasks, scale = make(n, v, 4, torch.bfloat16, seed=2)
    labels[:-48] = -100  # only the last rows, whose offsets pass 2**31, carry loss
    tail = slice(n - 48, n)
    ref_loss, ref_sums, ref_counts, ref_grad = reference(logits[tail], labels[tail], tasks[tail], scale)
    x = logits.requires_grad_(True)
    loss, sums, counts = task_cross_entropy(x, labels, tasks, scale)
    loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(counts, ref_counts)
    torch.testing.assert_close(x.grad[tail].double(), ref_grad, rtol=2.0**-8 + 1e-5, atol=1e-9)
    assert not x.grad[:8].any()


def test_gpu_torch_compile_fullgraph_and_cuda_graph():
    logits, labels, tasks, scale = make(512, 32003, 8, torch.bfloat16, seed=3)

    def objective(x, labels, tasks, w):
        counts = torch.zeros_like(w).index_add_(0, tasks.clamp_min(0), (labels != -100).float())
        loss, sums, _ = task_cross_entropy(x, labels, tasks, w / counts.clamp_min(1))
        return loss * 2 + 0 * sums.sum()

    compiled = torch.compile(objective, fullgraph=True)
    x_eager = logits.clone().requires_grad_(True)
    x_comp = logits.clone().requires_grad_(True)
    objective(x_eager, labels, tasks, scale).backward()
    compiled(x_comp, labels, tasks, scale).backward()
    # the compiled graph may round w / counts differently in the last bit: one bf16 rounding apart at most
    torch.testing.assert_close(x_comp.grad.double(), x_eager.grad.double(), rtol=2.0**-8, atol=1e-9)
    with torch.no_grad():
        torch.testing.assert_close(compiled(logits, labels, tasks, scale), objective(logits, labels, tasks, scale))

    static = logits.clone()
    with torch.no_grad():
        task_cross_entropy(static, labels, tasks, scale)  # compile the kernels before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = task_cross_entropy(static, labels, tasks, scale)
        fresh, *_ = make(512, 32003, 8, torch.bfloat16, seed=4)
        static.copy_(fresh)
        graph.replay()
        expected = task_cross_entropy(fresh, labels, tasks, scale)
    for got, want in zip(out, expected):
        assert torch.equal(got, want)


def test_gpu_checking_mode():
    logits, labels, tasks, scale = make(32, 1000, 2, torch.bfloat16, seed=5)
    labels[(labels != -100).nonzero()[0, 0]] = 1000
    with pytest.raises(UserError, match="outside the vocabulary"):
        task_cross_entropy(logits, labels, tasks, scale, check=True)


@pytest.mark.parametrize("bias", [False, True])
def test_gpu_linear_matches_float64(bias):
    n, h, v = 1000, 256, 32007
    g = torch.Generator(device="cuda").manual_seed(6)
    hidden = torch.randn(n, h, device="cuda", generator=g).to(torch.bfloat16)
    weight = (torch.randn(v, h, device="cuda", generator=g) / 8).to(torch.bfloat16)
    b = torch.randn(v, device="cuda", generator=g).to(torch.bfloat16) if bias else None
    _, labels, tasks, scale = make(n, 8, 8, torch.float32, seed=7)
    labels = torch.where(labels == -100, labels, torch.randint(0, v, (n,), device="cuda", generator=g))
    leaves = [t.double().requires_grad_(True) for t in (hidden, weight) + ((b,) if bias else ())]
    ref_loss, ref_sums, ref_counts = reference_task_cross_entropy(
        leaves[0] @ leaves[1].t() + (leaves[2] if bias else 0), labels, tasks, scale)
    ref_loss.backward()
    ours = [t.clone().requires_grad_(True) for t in (hidden, weight) + ((b,) if bias else ())]
    loss, sums, counts = linear_task_cross_entropy(ours[0], ours[1], labels, tasks, scale,
                                                   bias=ours[2] if bias else None, chunk_bytes=300 * v * 2)
    loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=2.0**-8, atol=1e-5)
    assert torch.equal(counts, ref_counts)
    for got, ref in zip(ours, leaves):
        assert float((got.grad.double() - ref.grad).norm() / ref.grad.norm()) < 2.0**-6
