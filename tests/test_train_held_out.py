"""``balancer.held_out`` in a real run: which rows L_k(0) and every update measure, the per-update weight
change and CoBa's slope diagnostics in metrics.jsonl (and their plot), and a resumed ``fixed`` run measuring the
checkpoint's rows."""
from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from train_helpers import assert_close_or_none, read_metrics, run_config, single_thread

from mftcoder_coba.balancers.coba import ols_fit
from mftcoder_coba.data import PackedDataset
from mftcoder_coba.models import load_trained
from mftcoder_coba.plots import plot_run
from mftcoder_coba.training import train
from mftcoder_coba.training.sampling import HeldOutSample
from mftcoder_coba.training.validation import evaluate_per_task

SECTIONS = {"optim": {"lr": 3e-3, "warmup_steps": 0, "schedule": "constant"},
            "train": {"max_steps": 6, "save_every": 3, "keep_last": 3, "tensorboard": False}}


def _balancer(held_out: str, rows: int = 2) -> dict:
    return {"held_out": held_out, "update_interval": 1, "valid_rows_per_task": rows,
            "options": {"warmup_steps": 1, "history_length": 4}}


@pytest.mark.slow
def test_fixed_run_measures_the_same_rows_and_logs_weight_change_and_slope_errors(
        prepared: Path, tmp_path: Path) -> None:
    cfg = run_config(prepared, tmp_path / "run", balancer=_balancer("fixed"), **SECTIONS)
    with single_thread():
        run_dir = train(cfg)
    valid = PackedDataset(prepared / "valid")
    tasks = valid.tasks
    rows = HeldOutSample(valid, cfg.train.seed, "fixed", 2).initial()
    lines = read_metrics(run_dir)
    assert len(rows) == 2 * len(tasks)
    state = json.loads((run_dir / "checkpoints" / "step-00000006" / "trainer_state.json").read_text())
    assert state["held_out"] == {"mode": "fixed", "rows": rows.tolist()}

    # every checkpoint's model, measured on the fixed rows, gives that step's logged held-out loss; and L_k(0)
    for step in (3, 6):
        model = load_trained(run_dir, run_dir / "checkpoints" / f"step-{step:08d}")
        sums, counts = evaluate_per_task(model, valid, rows, micro_batch_size=2)
        np.testing.assert_allclose(sums / counts, [lines[step]["valid_loss"][t] for t in tasks], rtol=1e-6)

    # weight_change: L1 between consecutive updates' weights (the weights of the next step's line)
    for line, following in pairwise(lines[1:]):
        expected = sum(abs(following["weights"][t] - line["weights"][t]) for t in tasks)
        assert line["weight_change"] == pytest.approx(expected, abs=1e-12)
    assert "weight_change" not in lines[0] and lines[1]["weight_change"] == 0.0  # warm-up update: still uniform
    assert lines[2]["weight_change"] > 0

    # slope and slope_se: CoBa's fit over the last 4 ratios (null with fewer than three points)
    reference = np.array([lines[0]["valid_loss"][t] for t in tasks])
    for step in range(1, 7):
        window = list(range(max(1, step - 3), step + 1))
        ratios = np.array([[lines[s]["valid_loss"][t] for t in tasks] for s in window]) / reference
        slope, se = ols_fit(np.array(window), ratios)
        np.testing.assert_allclose([lines[step]["slope"][t] for t in tasks], slope, rtol=1e-9, atol=1e-15)
        if step < 3:
            assert all(v is None for v in lines[step]["slope_se"].values())
        else:
            np.testing.assert_allclose([lines[step]["slope_se"][t] for t in tasks], se, rtol=1e-9, atol=1e-15)

    # plot: the standard errors get their own PNG
    written = plot_run(run_dir)
    assert run_dir / "plots" / "slope_se.png" in written
    assert (run_dir / "plots" / "slope_se.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_resumed_fixed_run_measures_the_checkpoint_rows(prepared: Path, tmp_path: Path) -> None:
    with single_thread():
        straight = train(run_config(prepared, tmp_path / "straight", balancer=_balancer("fixed"), **SECTIONS))
        first = run_config(prepared, tmp_path / "resumed", balancer=_balancer("fixed"),
                           optim=SECTIONS["optim"], train={**SECTIONS["train"], "max_steps": 3})
        train(first)
        resumed = train(run_config(prepared, tmp_path / "resumed", balancer=_balancer("fixed"), **SECTIONS),
                        resume="auto")
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for key in ("valid_loss", "weights", "slope", "slope_se", "weight_change"):
            assert_close_or_none(x.get(key), y.get(key), (x["step"], key))
    from mftcoder_coba.errors import ConfigError

    with pytest.raises(ConfigError, match="balancer.held_out"):
        train(run_config(prepared, tmp_path / "resumed", balancer=_balancer("rotate"), **SECTIONS), resume="auto")
