"""``train`` in-process (world size 1, gloo): the run directory contract, the held-out measurements CoBa is
fed, checkpoints that reload to the same model, adapters on random init, and the learning balancers' wiring."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from train_helpers import float64_token_ce, read_metrics, run_config

from mftcoder_coba import config_io
from mftcoder_coba.config import RunConfig
from mftcoder_coba.data import PackedDataset
from mftcoder_coba.models import build_model, load_trained
from mftcoder_coba.training import train
from mftcoder_coba.training.ds_config import lr_factor
from mftcoder_coba.training.sampling import HeldOutRotation
from mftcoder_coba.training.validation import evaluate_per_task


def _float64_task_means(model: torch.nn.Module, dataset: PackedDataset, rows: np.ndarray) -> np.ndarray:
    """Per-task token-mean cross-entropy over ``rows`` (float64 reference)."""
    with torch.no_grad():
        ce, tasks, counted = float64_token_ce(model, dataset, rows)
    return np.array([ce[(tasks == k) & counted].mean().item() for k in range(len(dataset.tasks))])


def test_coba_run_writes_the_run_directory_contract(prepared: Path, tmp_path: Path) -> None:
    cfg = run_config(prepared, tmp_path / "run",
                     train={"max_steps": 4, "save_every": 1, "keep_last": 2},
                     balancer={"held_out": "rotate", "update_interval": 2, "valid_rows_per_task": 2,
                               "initial_rows_per_task": 3})
    run_dir = train(cfg)
    assert run_dir == cfg.run_dir
    valid = PackedDataset(prepared / "valid")
    tasks = valid.tasks
    rotation = HeldOutRotation(valid, cfg.train.seed)

    # config.yaml round-trips, the tokenizer travels with the run
    assert config_io.build(RunConfig, yaml.safe_load((run_dir / "config.yaml").read_text())) == cfg
    assert (run_dir / "tokenizer" / "tokenizer.json").is_file()
    assert any((run_dir / "tensorboard").iterdir())

    lines = read_metrics(run_dir)
    assert [r["step"] for r in lines] == [0, 1, 2, 3, 4]
    assert [("valid_loss" in r) for r in lines] == [True, False, True, False, True]
    for r in lines:
        assert set(r) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "train_loss", "weights"}
        assert list(r["weights"]) == tasks and sum(r["weights"].values()) == pytest.approx(1.0)
        assert r["mfu"] is None
    for r in lines[1:]:
        assert r["lr"] == pytest.approx(cfg.optim.lr * lr_factor(r["step"] - 1, cfg.optim, cfg.train.max_steps))
        assert r["grad_norm"] > 0 and r["tokens_per_s"] > 0
        # the logged loss is the spec's L from the logged per-task losses and weights
        present = [t for t in tasks if r["train_loss"][t] is not None]
        weights = np.array([r["weights"][t] for t in present])
        losses = np.array([r["train_loss"][t] for t in present])
        assert r["loss"] == pytest.approx(float(weights @ losses / weights.sum()), rel=1e-9)
    assert lines[1]["weights"] == {t: 0.25 for t in tasks}  # CoBa warm-up: uniform

    # L_k(0): the first 3 held-out rows per task, measured before step 1, equal a float64 reference
    initial = build_model(cfg.model, valid.vocab_size, len(tasks))
    reference = _float64_task_means(initial, valid, rotation.initial(3))
    np.testing.assert_allclose([lines[0]["valid_loss"][t] for t in tasks], reference, rtol=1e-5)

    # keep-last-2 complete checkpoints; the last one reloads to the model that measured step 4's held-out loss
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["step-00000003", "step-00000004"]
    last = run_dir / "checkpoints" / "step-00000004"
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["data_position"] == {"epoch": 0, "index": 16}
    assert state["balancer"]["name"] == "coba" and (last / "rng" / "rank-00000.json").is_file()
    trained = load_trained(run_dir, last)
    sums, counts = evaluate_per_task(trained, valid, rotation.sample(2, 2), micro_batch_size=2)
    np.testing.assert_allclose(sums / counts, [lines[4]["valid_loss"][t] for t in tasks], rtol=1e-6)


def test_fresh_run_refuses_a_run_dir_with_checkpoints(prepared: Path, tmp_path: Path) -> None:
    from mftcoder_coba.errors import UserError

    cfg = run_config(prepared, tmp_path / "run", balancer={"name": "uniform", "options": {}},
                     train={"max_steps": 1, "tensorboard": False})
    train(cfg)
    with pytest.raises(UserError, match="already holds checkpoints"):
        train(cfg)
    train(cfg, resume="auto")  # nothing left to do: returns at once
    assert [r["step"] for r in read_metrics(cfg.run_dir)] == [0, 1]


def test_lora_on_random_init_saves_the_base_model(prepared: Path, tmp_path: Path) -> None:
    cfg = run_config(prepared, tmp_path / "run", model={"adapter": "lora", "lora": {"r": 4, "dropout": 0.0}},
                     balancer={"name": "uniform", "options": {}}, train={"max_steps": 2, "tensorboard": False})
    run_dir = train(cfg)
    assert (run_dir / "base_model" / "config.json").is_file()
    last = run_dir / "checkpoints" / "step-00000002"
    assert (last / "model" / "adapter_config.json").is_file()
    model = load_trained(run_dir, last)
    assert any("lora_" in name for name, _ in model.named_parameters())


@pytest.mark.slow
def test_bf16_master_weights_keep_optimizer_state_in_bf16(prepared: Path, tmp_path: Path) -> None:
    """optim.master_weights: bf16 reaches DeepSpeed with both optimizers (stochastic rounding, the default, and
    PyTorch's AdamW): the saved master partition and Adam moments are bf16, and training follows the
    fp32-master run of the same bf16 model closely."""
    losses, dtypes = {}, {}
    for name, optim in (("fp32", {"master_weights": "fp32"}), ("bf16", {"master_weights": "bf16"}),
                        ("bf16-nearest", {"master_weights": "bf16", "stochastic_rounding": False})):
        cfg = run_config(prepared, tmp_path / name, model={"dtype": "bf16"}, optim=optim,
                         balancer={"name": "uniform", "options": {}},
                         train={"max_steps": 3, "zero_stage": 1, "tensorboard": False})
        run_dir = train(cfg)
        losses[name] = [r["loss"] for r in read_metrics(run_dir) if r["step"] > 0]
        (states,) = (run_dir / "checkpoints" / "step-00000003").glob("engine/*/*optim_states.pt")
        saved = torch.load(states, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        moments = saved["base_optimizer_state"]["state"][0]
        dtypes[name] = {saved["single_partition_of_fp32_groups"][0].dtype, moments["exp_avg"].dtype,
                        moments["exp_avg_sq"].dtype}
    assert dtypes == {"fp32": {torch.float32}, "bf16": {torch.bfloat16}, "bf16-nearest": {torch.bfloat16}}
    for name in ("bf16", "bf16-nearest"):
        assert losses[name][0] == losses["fp32"][0]  # same weights before the first update
        np.testing.assert_allclose(losses[name], losses["fp32"], rtol=2e-2)


@pytest.mark.slow
def test_stochastic_rounding_run_resumes_exactly(prepared: Path, tmp_path: Path) -> None:
    """The bf16 AdamW's moments, step counts and random streams come back from a checkpoint: a run stopped
    after step 2 and resumed logs the same steps 3-4 as an uninterrupted run."""
    def cfg(run: str, steps: int) -> RunConfig:
        return run_config(prepared, tmp_path / run, model={"dtype": "bf16"},
                          optim={"master_weights": "bf16", "schedule": "constant", "warmup_steps": 0},
                          balancer={"name": "uniform", "options": {}},
                          train={"max_steps": steps, "zero_stage": 1, "tensorboard": False})

    whole = read_metrics(train(cfg("whole", 4)))
    train(cfg("split", 2))
    split = read_metrics(train(cfg("split", 4), resume="auto"))
    assert [r["loss"] for r in split if r["step"] > 2] == [r["loss"] for r in whole if r["step"] > 2]


@pytest.mark.parametrize("name", ["famo", "gradnorm", "uncertainty"])
def test_learning_balancers_are_fed_and_checkpointed(prepared: Path, tmp_path: Path, name: str) -> None:
    cfg = run_config(prepared, tmp_path / "run", balancer={"name": name, "options": {}},
                     train={"max_steps": 2, "tensorboard": False})
    run_dir = train(cfg)
    lines = read_metrics(run_dir)
    first, second = (np.array(list(lines[i]["weights"].values())) for i in (1, 2))
    assert not np.allclose(first, second)  # observations moved the weights
    state = json.loads((run_dir / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert state["balancer"]["name"] == name
