"""Benchmark of the per-task cross-entropy kernels against PyTorch eager, torch.compile, Liger-Kernel and Cut
Cross-Entropy, with the memory-bandwidth and matmul floors, from one run on one GPU.

    python benchmarks/kernels/bench.py [--out DIR] [--quick] [--sweep] [--ours-only]

Objective everywhere: ``L = Σ_t w_t · mean_{i in task t, label != -100} ce_i`` over bf16 logits (N, V), or
over ``hidden (N, H) @ weight (V, H).T`` for the linear rows; this project's functions get the per-token
coefficient ``task_scale[t] = w_t / n_t`` (computed inside the timed step, as the trainer does). Reports the
median milliseconds of forward+backward and of forward-only under ``torch.no_grad()`` (triton's do_bench),
the peak memory beyond the inputs (and beyond the gradients of the previous step, which the step frees),
and the relative error of the loss against a float64 reference. Floors: the bytes that must move (read the
bf16 logits once, write the bf16 gradient once; read once for forward-only) over the measured copy
bandwidth, and 6·N·H·V over the measured bf16 matmul rate. Writes ``kernels_bench.json`` and
``kernels_bench.md`` to ``--out`` (default ``$OUT`` or the working directory).

``--sweep`` also times the row kernel's launch configurations (``RowsLaunch``: block, warps, programs per
SM, programs per row) at V = 128256 by calling the row kernel and the per-task reduce directly with each
one; the library itself always launches with the measured ``default_launch``. It imports the installed
library (``pip install -e .``) and needs a CUDA GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from mftcoder_coba.kernels.api import linear_task_cross_entropy, task_cross_entropy
from mftcoder_coba.kernels.task_ce_triton import RowsLaunch, task_ce_rows, task_reduce

T = 8
IGNORE = -100
DEV = "cuda"


def make_inputs(n: int, v: int, h: int | None, seed: int = 0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    labels = torch.randint(0, v, (n,), device=DEV, generator=g)
    labels[torch.rand(n, device=DEV, generator=g) < 0.1] = IGNORE
    tasks = torch.randint(0, T, (n,), device=DEV, generator=g)
    w = torch.rand(T, device=DEV, generator=g) + 0.5
    if h is None:
        return (torch.randn(n, v, device=DEV, generator=g) * 2).to(torch.bfloat16), labels, tasks, w
    hidden = torch.randn(n, h, device=DEV, generator=g).to(torch.bfloat16)
    weight = (torch.randn(v, h, device=DEV, generator=g) / h**0.5).to(torch.bfloat16)
    return (hidden, weight), labels, tasks, w


def task_scale(labels: torch.Tensor, tasks: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``w_t / n_t``: each token's coefficient in Σ_t w_t · mean_t(ce)."""
    counts = torch.zeros(T, device=DEV).index_add_(0, tasks, (labels != IGNORE).float())
    return w / counts.clamp_min(1)


def grouped(tok_loss, labels, tasks, w):
    valid = labels != IGNORE
    per_task = torch.zeros(T, device=DEV).index_add_(0, tasks, tok_loss.float() * valid)
    counts = torch.zeros(T, device=DEV).index_add_(0, tasks, valid.float())
    return (w * per_task / counts.clamp_min(1)).sum()


# ------------------------------------------------------------------ objectives over logits
def eager(x, labels, tasks, w):
    return grouped(F.cross_entropy(x.float(), labels, ignore_index=IGNORE, reduction="none"), labels, tasks, w)


compiled = torch.compile(eager, dynamic=False)


def liger(x, labels, tasks, w):
    from liger_kernel.transformers import LigerCrossEntropyLoss

    return grouped(LigerCrossEntropyLoss(ignore_index=IGNORE, reduction="none")(x, labels), labels, tasks, w)


def ours(x, labels, tasks, w):
    return task_cross_entropy(x, labels, tasks, task_scale(labels, tasks, w), IGNORE, impl="triton")[0]


ours_compiled = torch.compile(ours, dynamic=False, fullgraph=True)


def ours_torch(x, labels, tasks, w):
    return task_cross_entropy(x, labels, tasks, task_scale(labels, tasks, w), IGNORE, impl="torch")[0]


# ------------------------------------------------------------------ objectives over the LM head
def lin_eager(hw, labels, tasks, w):
    return eager(hw[0] @ hw[1].t(), labels, tasks, w)


def lin_liger(hw, labels, tasks, w):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    tok = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="none")(hw[1], hw[0], labels)
    return grouped(tok, labels, tasks, w)


def lin_cce(hw, labels, tasks, w):
    from cut_cross_entropy import linear_cross_entropy

    return grouped(linear_cross_entropy(hw[0], hw[1], labels, ignore_index=IGNORE, reduction="none"), labels, tasks, w)


def lin_ours(hw, labels, tasks, w, chunk_bytes: int):
    scale = task_scale(labels, tasks, w)
    return linear_task_cross_entropy(hw[0], hw[1], labels, tasks, scale, impl="triton", chunk_bytes=chunk_bytes)[0]


def reference(x, labels, tasks, w) -> float:
    if isinstance(x, tuple):
        x = x[0].double() @ x[1].double().t()
    tok = F.cross_entropy(x.double(), labels, ignore_index=IGNORE, reduction="none")
    valid = labels != IGNORE
    per_task = torch.zeros(T, device=DEV, dtype=torch.float64).index_add_(0, tasks, tok * valid)
    counts = torch.zeros(T, device=DEV, dtype=torch.float64).index_add_(0, tasks, valid.double())
    return float((w.double() * per_task / counts.clamp_min(1)).sum())


# ------------------------------------------------------------------ measurement
def _bench(fn: Callable[[], object]) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def run_case(name: str, fn, inputs, labels, tasks, w, ref: float) -> dict:
    """fwd+bwd and fwd-only timings, peak extra memory and loss error of one objective on one shape."""
    pristine = inputs if isinstance(inputs, tuple) else (inputs,)
    try:
        leaves = tuple(t.detach().clone().requires_grad_(True) for t in pristine)
        arg = leaves if isinstance(inputs, tuple) else leaves[0]

        def step():
            for t in leaves:
                t.grad = None
            fn(arg, labels, tasks, w).backward()

        loss = float(fn(arg, labels, tasks, w).detach())
        err = abs(loss - ref) / abs(ref)
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        ms = _bench(step)
        row = dict(impl=name, ms=round(ms, 3), peak_extra_gib=round(peak, 3), rel_err=float(f"{err:.2e}"))
        with torch.no_grad():
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn(arg, labels, tasks, w)
            torch.cuda.synchronize()
            row["fwd_peak_extra_gib"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)
            row["fwd_ms"] = round(_bench(lambda: fn(arg, labels, tasks, w)), 3)
        return row
    except Exception as e:  # a baseline that cannot run this shape is reported, not fatal
        return dict(impl=name, error=f"{type(e).__name__}: {str(e)[:200]}")
    finally:
        torch.cuda.empty_cache()


def copy_bandwidth_gbs() -> float:
    a = torch.empty(2**30, dtype=torch.uint8, device=DEV).random_()
    b = torch.empty_like(a)
    return 2 * a.numel() / _bench(lambda: b.copy_(a)) / 1e6


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    return 2 * 8192**3 / _bench(lambda: a @ b) / 1e9


def rows_step(x, labels, tasks, w, launch: RowsLaunch, write_grad: bool) -> torch.Tensor:
    """The row kernel with ``launch`` and the per-task reduce, called directly (what the public function runs,
    less autograd and the upstream-gradient scale); returns the loss."""
    scale = task_scale(labels, tasks, w)
    row_ce = torch.empty(x.shape[0], dtype=torch.float32, device=DEV)
    grad = torch.empty_like(x) if write_grad else None
    task_ce_rows(x, labels, tasks, scale, IGNORE, row_ce, grad, launch=launch)
    return task_reduce(row_ce, labels, tasks, scale, IGNORE, x.shape[1])[0]


def sweep_rows_launches(n: int, v: int, bw: float) -> list[dict]:
    """Time the row kernel's launch configurations at one shape: writing the gradient (fwd+bwd) with each
    launch as given, and forward-only with the same launch at one program per row."""
    x, labels, tasks, w = make_inputs(n, v, None)
    launches = [RowsLaunch(4096, 8, 4, 4), RowsLaunch(4096, 8, 4, 8), RowsLaunch(4096, 16, 4, 8),
                RowsLaunch(8192, 16, 4, 4), RowsLaunch(8192, 8, 4, 1), RowsLaunch(16384, 16, 4, 1),
                RowsLaunch(4096, 8, 8, 8)]
    ref = reference(x, labels, tasks, w)
    out = []
    for launch in launches:
        name = f"ours[{launch.block_v},{launch.num_warps},{launch.programs_per_sm},{launch.split}]"
        forward = dataclasses.replace(launch, split=1)
        try:
            loss = float(rows_step(x, labels, tasks, w, launch, True))
            r = dict(impl=name, ms=round(_bench(lambda launch=launch: rows_step(x, labels, tasks, w, launch, True)), 3),
                     fwd_ms=round(_bench(lambda fwd=forward: rows_step(x, labels, tasks, w, fwd, False)), 3),
                     rel_err=float(f"{abs(loss - ref) / abs(ref):.2e}"))
        except Exception as e:  # a launch the device cannot run is reported, not fatal
            r = dict(impl=name, error=f"{type(e).__name__}: {str(e)[:200]}")
        r.update(N=n, V=v, floor_ms=round(4 * n * v / (bw * 1e6), 3))
        print(json.dumps(r), flush=True)
        out.append(r)
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    import triton

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true", help="V=32000 and V=128256 only, no torch-backend rows")
    ap.add_argument("--sweep", action="store_true", help="also sweep the row kernel's launch configs at V=128256")
    ap.add_argument("--ours-only", action="store_true", help="skip the baselines (tuning runs)")
    ap.add_argument("--chunk-mib", type=int, nargs="*", default=[256, 512], help="linear variant chunk sizes to time")
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True
    bw, tf = copy_bandwidth_gbs(), matmul_tflops()
    meta = dict(
        device=torch.cuda.get_device_name(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
        torch=torch.__version__, triton=triton.__version__, copy_bw_gbs=round(bw), matmul_tflops=round(tf),
        N=16384, tasks=T,
    )
    print(json.dumps(meta), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    sweep = sweep_rows_launches(16384, 128256, bw) if args.sweep else []

    def record(r: dict) -> None:  # rewritten after every row, so a run cut short still leaves its numbers
        rows.append(r)
        print(json.dumps(r), flush=True)
        (out / "kernels_bench.json").write_text(json.dumps(dict(meta=meta, rows=rows, sweep=sweep), indent=1))

    n = 16384
    vocab = (32000, 128256) if args.quick else (32000, 128256, 151936)
    logits_impls = [("ours_triton", ours), ("ours_triton_compiled", ours_compiled), ("torch_eager", eager),
                    ("torch_compile", compiled), ("liger_ce", liger)]
    if not args.quick and not args.ours_only:
        logits_impls.append(("ours_torch_chunked", ours_torch))
    if args.ours_only:
        logits_impls = [(name, fn) for name, fn in logits_impls if name.startswith("ours")]
    for v in vocab:
        x, labels, tasks, w = make_inputs(n, v, None)
        ref = reference(x, labels, tasks, w)
        for name, fn in logits_impls:
            r = run_case(name, fn, x, labels, tasks, w, ref)
            r.update(kind="logits", N=n, V=v, floor_ms=round(2 * n * v * 2 / (bw * 1e6), 3),
                     fwd_floor_ms=round(n * v * 2 / (bw * 1e6), 3))
            record(r)
        del x
        torch.cuda.empty_cache()
    h = 4096
    for v in vocab[1:] if args.quick else vocab:
        hw, labels, tasks, w = make_inputs(n, v, h)
        ref = reference(hw, labels, tasks, w)
        impls = [(f"lin_ours_triton_{c}MiB", lambda a, b, c_, d, cm=c: lin_ours(a, b, c_, d, cm * 2**20))
                 for c in args.chunk_mib]
        if not args.ours_only:
            impls += [("lin_torch_eager", lin_eager), ("lin_liger_flce", lin_liger), ("lin_cce", lin_cce)]
        for name, fn in impls:
            r = run_case(name, fn, hw, labels, tasks, w, ref)
            r.update(kind="linear", N=n, V=v, H=h, floor_ms=round(6 * n * v * h / (tf * 1e9), 3))
            record(r)
        del hw
        torch.cuda.empty_cache()
    table = markdown_table(meta, rows)
    (out / "kernels_bench.md").write_text(table)
    print(table)
    return 0


def markdown_table(meta: dict, rows: list[dict]) -> str:
    head = (f"device {meta['device']}, {meta['date']}, torch {meta['torch']}, triton {meta['triton']}; measured copy "
            f"bandwidth {meta['copy_bw_gbs']} GB/s, bf16 matmul {meta['matmul_tflops']} TFLOP/s; N = {meta['N']}, "
            f"{meta['tasks']} tasks, bf16\n\n")
    lines = ["| kind | V | impl | fwd+bwd ms | × floor | fwd-only ms | × fwd floor | peak extra GiB | loss rel err |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            error = r["error"][:80]
            lines.append(f"| {r.get('kind', '')} | {r.get('V', '')} | {r['impl']} | error: {error} | | | | | |")
            continue
        fwd_floor = r.get("fwd_floor_ms")
        fwd_ratio = f"{r['fwd_ms'] / fwd_floor:.2f}" if fwd_floor and "fwd_ms" in r else ""
        lines.append(
            f"| {r['kind']} | {r['V']} | {r['impl']} | {r['ms']:.2f} | {r['ms'] / r['floor_ms']:.2f} | "
            f"{r.get('fwd_ms', '')} | {fwd_ratio} | {r['peak_extra_gib']:.3f} | {r['rel_err']:.1e} |"
        )
    floors = sorted({(r["kind"], r["V"], r["floor_ms"], r.get("fwd_floor_ms")) for r in rows if "floor_ms" in r})
    lines.append("")
    lines += [f"floor {k} V={v}: fwd+bwd {f} ms" + (f", fwd-only {ff} ms" if ff else "") for k, v, f, ff in floors]
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
