"""The exact global objective: per-task coefficients, and 2 ranks x 2 micro-batches through the DeepSpeed
engine (ZeRO-0 and ZeRO-3) giving the gradient of the spec's L over the whole global batch (float64 reference)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from train_helpers import float64_token_ce, run_config

from mftcoder_coba.training.distributed import free_port
from mftcoder_coba.training.objective import loss_token_counts, objective_value, per_task_mean, task_scale

WEIGHTS = np.array([0.5, 0.2, 0.3, 0.0])  # a zero weight too: that task's tokens carry no gradient


def test_task_scale_is_weight_over_global_count_and_weight_mass() -> None:
    weights = np.array([0.1, 0.6, 0.3])
    counts = np.array([4.0, 0.0, 16.0])  # task 1 absent: U = {0, 2}, its weight leaves the denominator
    scale = task_scale(weights, counts, grad_multiplier=8.0)
    np.testing.assert_allclose(scale, [0.1 / (4 * 0.4) * 8, 0.0, 0.3 / (16 * 0.4) * 8], rtol=1e-15)
    sums = np.array([8.0, 0.0, 16.0])  # token means 2.0 and 1.0
    assert objective_value(weights, sums, counts) == pytest.approx((0.1 * 2.0 + 0.3 * 1.0) / 0.4, rel=1e-15)
    np.testing.assert_array_equal(per_task_mean(sums, counts)[[0, 2]], [2.0, 1.0])
    assert np.isnan(per_task_mean(sums, counts)[1])
    assert not task_scale(np.array([0.0, 1.0, 0.0]), counts).any()  # only zero-weight tasks present: L = 0


def test_loss_token_counts_skip_ignored_and_padding() -> None:
    batch = {"labels": np.array([[5, -100, 7, 8, -100]]), "task_ids": np.array([[0, 0, 2, 2, -1]])}
    np.testing.assert_array_equal(loss_token_counts([batch, batch], 3), [2.0, 0.0, 4.0])


def _reference_gradient(cfg, dataset, rows: np.ndarray) -> dict[str, np.ndarray]:
    """dL/dtheta of the spec's L over the whole batch, float64, plain PyTorch cross-entropy, no engine."""
    from mftcoder_coba.models import build_model

    model = build_model(cfg.model, dataset.vocab_size, len(dataset.tasks))
    ce, tasks, counted = float64_token_ce(model, dataset, rows)
    present = [k for k in range(len(WEIGHTS)) if ((tasks == k) & counted).any()]
    total = sum(WEIGHTS[k] for k in present)
    loss = sum(WEIGHTS[k] * ce[(tasks == k) & counted].mean() for k in present) / total
    loss.backward()
    return {name: p.grad.numpy() for name, p in model.named_parameters()}


def _rank_gradient(rank: int, world_size: int, port: int, cfg, rows: np.ndarray, out: str) -> None:
    """One rank: its slice of the global batch in 2 micro-batches through the engine, fp32, ZeRO-0 and ZeRO-3."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import dataclasses

    import deepspeed

    from mftcoder_coba.data import PackedDataset
    from mftcoder_coba.models import build_model
    from mftcoder_coba.training import distributed, ds_config
    from mftcoder_coba.training.objective import TaskLoss, accumulate_gradients
    from mftcoder_coba.training.sampling import GlobalBatches

    world = distributed.init()
    dataset = PackedDataset(cfg.data.train)
    batches = GlobalBatches(dataset, len(rows), cfg.train.micro_batch_size, world.rank, world.size, seed=0)
    micro = [dataset.rows(r) for r in batches.micro_batches(rows)]
    assert len(micro) == 2
    counts = distributed.all_reduce_sum(loss_token_counts(micro, len(dataset.tasks)), world)
    results = {"counts": counts}
    for stage in (0, 3):  # ZeRO-3 partitions the head: the loss then runs the head module on logits
        stage_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, zero_stage=stage))
        model = build_model(cfg.model, dataset.vocab_size, len(dataset.tasks))
        engine, *_ = deepspeed.initialize(model=TaskLoss(model, fused_linear=stage != 3, impl="torch"),
                                          model_parameters=ds_config.parameter_groups(model, 0.0),
                                          config=ds_config.build(stage_cfg, world.size, on_cuda=False))
        sums = accumulate_gradients(engine, micro, WEIGHTS, counts, world.device)
        results[f"sums{stage}"] = distributed.all_reduce_sum(sums, world)
        for name, param in engine.module.named_parameters():
            results[f"{stage}/{name.removeprefix('module.')}"] = deepspeed.utils.safe_get_full_grad(param).numpy()
        engine.destroy()
    if rank == 0:
        np.savez(out, **results)
    torch.distributed.barrier()  # no rank tears the group down while another still uses it
    torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_two_micro_batches_give_the_whole_batch_gradient(prepared: Path, tmp_path: Path) -> None:
    from mftcoder_coba.data import PackedDataset

    cfg = run_config(prepared, tmp_path / "run", train={"micro_batch_size": 2, "global_batch_size": 8,
                                                       "zero_stage": 0})
    dataset = PackedDataset(cfg.data.train)
    assert len(dataset.tasks) == len(WEIGHTS)
    rows = np.random.default_rng([5, 0]).permutation(len(dataset))[:8]
    out = str(tmp_path / "grads.npz")
    mp.spawn(_rank_gradient, args=(2, free_port(), cfg, rows, out), nprocs=2, join=True)
    got = np.load(out)
    reference = _reference_gradient(cfg, dataset, rows)
    for stage in (0, 3):
        for name, grad in reference.items():
            np.testing.assert_allclose(got[f"{stage}/{name}"], grad, rtol=1e-4, atol=1e-5 * np.abs(grad).max(),
                                       err_msg=f"ZeRO-{stage} {name}")
    # the per-task counts of the two ranks add up to the whole batch's, the sums agree between stages
    np.testing.assert_array_equal(got["counts"], loss_token_counts([dataset.rows(rows)], len(WEIGHTS)))
    np.testing.assert_allclose(got["sums0"], got["sums3"], rtol=1e-6)


def test_head_gradient_norms_are_those_of_each_unweighted_task_loss(prepared: Path, tmp_path: Path) -> None:
    """GradNorm's input: ||dL_k/dW_head|| of each task's token-mean loss over two micro-batches (float64 reference)."""
    from mftcoder_coba.data import PackedDataset
    from mftcoder_coba.models import build_model, hidden_states
    from mftcoder_coba.training.head_grads import HeadGradNorms
    from mftcoder_coba.training.objective import to_device

    cfg = run_config(prepared, tmp_path / "run")
    dataset = PackedDataset(cfg.data.train)
    rows = np.random.default_rng([7, 0]).permutation(len(dataset))[:4]
    counts = loss_token_counts([dataset.rows(rows)], len(dataset.tasks))
    model = build_model(cfg.model, dataset.vocab_size, len(dataset.tasks))
    grads = HeadGradNorms(model, len(dataset.tasks), impl="torch")
    for part in (rows[:2], rows[2:]):
        batch = to_device(dataset.rows(part), torch.device("cpu"))
        grads.add(hidden_states(model, batch["input_ids"], batch["position_ids"], batch["task_ids"]), batch, counts)
    norms = grads.norms(world_size=1)

    ce, tasks, counted = float64_token_ce(model, dataset, rows)
    head = model.get_output_embeddings().weight
    for k in range(len(dataset.tasks)):
        if counts[k] == 0:
            assert np.isnan(norms[k])
            continue
        (grad,) = torch.autograd.grad(ce[(tasks == k) & counted].mean(), head, retain_graph=True)
        assert norms[k] == pytest.approx(grad.norm().item(), rel=1e-5)


@pytest.mark.slow
def test_fp32_gradient_accumulation_of_a_bf16_model_is_closer_to_float64(prepared: Path, tmp_path: Path) -> None:
    """train.grad_accum_dtype: 32 micro-batches of a bf16 model through a ZeRO-1 engine. Summed in fp32 (the
    default there: DeepSpeed's bf16 optimizer, each gradient added to the fp32 copy in backward) the step's
    gradient is nearer the float64 gradient of the same weights than summed in bf16; the bf16 forward and
    backward themselves are the same in both, so the difference is the accumulation's rounding."""
    import deepspeed

    from mftcoder_coba.data import PackedDataset
    from mftcoder_coba.models import build_model
    from mftcoder_coba.training import distributed, ds_config
    from mftcoder_coba.training.objective import TaskLoss, accumulate_gradients

    distributed.init()  # world size 1, as the trainer runs in-process
    dataset = PackedDataset(prepared / "train")
    rows = np.random.default_rng([5, 0]).permutation(len(dataset))[:32]
    micro = [dataset.rows(rows[i:i + 1]) for i in range(32)]
    counts = loss_token_counts(micro, len(WEIGHTS))
    errors, kinds = {}, {}
    for accum in ("fp32", "bf16"):
        cfg = run_config(prepared, tmp_path / accum, model={"dtype": "bf16"},
                         train={"micro_batch_size": 1, "global_batch_size": 32, "zero_stage": 1,
                                "grad_accum_dtype": accum})
        model = build_model(cfg.model, dataset.vocab_size, len(dataset.tasks))
        engine, *_ = deepspeed.initialize(model=TaskLoss(model, fused_linear=True, impl="torch"),
                                          model_parameters=ds_config.parameter_groups(model, 0.0),
                                          config=ds_config.build(cfg, 1, on_cuda=False))
        kinds[accum] = (type(engine.optimizer).__name__, engine.get_data_types()[1])
        accumulate_gradients(engine, micro, WEIGHTS, counts, torch.device("cpu"))
        got = {name.removeprefix("module."): deepspeed.utils.safe_get_full_grad(p).double()
               for name, p in engine.module.named_parameters()}
        want = _reference_gradient(cfg, dataset, rows)
        errors[accum] = (sum(float(((got[n] - torch.as_tensor(g)) ** 2).sum()) for n, g in want.items())
                         / sum(float((torch.as_tensor(g) ** 2).sum()) for g in want.values())) ** 0.5
        engine.destroy()
    assert kinds == {"fp32": ("BF16_Optimizer", torch.float32), "bf16": ("DeepSpeedZeroOptimizer", torch.bfloat16)}
    assert errors["fp32"] < 0.85 * errors["bf16"], errors
