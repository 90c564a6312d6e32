"""``mftcoder-coba simulate``: the qualitative claim CoBa is built on, observation noise under the held-out
modes, and the command's outputs."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mftcoder_coba.balancers import BALANCERS
from mftcoder_coba.balancers.simulate import SimulationConfig, _HeldOut, make_problem, run_balancer, summarise
from mftcoder_coba.cli import main


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.slow
def test_coba_worst_task_beats_uniform(seed: int) -> None:
    cfg = SimulationConfig(steps=500, seed=seed)
    problem = make_problem(cfg)
    coba = summarise(run_balancer("coba", cfg, problem))
    uniform = summarise(run_balancer("uniform", cfg, problem))
    assert coba["worst_loss"] < uniform["worst_loss"]
    # the small task overfits under uniform weights: its best held-out loss comes early and is lost by the end
    assert uniform["best_step"]["small"] < 250 and uniform["final_heldout"]["small"] > uniform["best_heldout"]["small"]


@pytest.mark.slow
def test_command_writes_table_picture_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pictures" / "sim.png"
    assert main(["simulate", "--out", str(out), "--steps", "60"]) == 0
    printed = capsys.readouterr().out
    assert "history_length=100" in printed and "worst task" in printed and "w L1/update" in printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(out.with_suffix(".json").read_text())
    # balancers that read held-out loss run once per held-out mode
    assert set(report["balancers"]) == ({n for n in BALANCERS if n != "coba"}
                                        | {"coba/rotate", "coba/fixed", "coba/all"})
    for row in report["balancers"].values():
        assert set(row["final_heldout"]) == {"fast", "slow", "small"} and row["worst_task"] in row["final_heldout"]
        assert row["weight_change_per_update"] >= 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["sim.json", "sim.png"]  # no temporary files left


def test_bad_arguments_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--out", str(tmp_path / "x.png"), "--balancers", "coba,nope"]) == 2
    assert "mftcoder-coba: error: --balancers: unknown balancer(s) nope" in capsys.readouterr().err
    assert main(["simulate", "--out", str(tmp_path / "x.jpg")]) == 2
    assert main(["simulate", "--out", str(tmp_path / "x.png"), "--held-out", "rotate,sometimes"]) == 2
    assert "--held-out: expected a comma-separated subset of rotate, fixed, all" in capsys.readouterr().err
    assert main(["simulate", "--out", str(tmp_path / "x.png"), "--obs-noise", "-1"]) == 2
    assert "--obs-noise: must be a finite number >= 0" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_observation_noise_moves_rotating_weights_and_not_fixed_ones() -> None:
    # The same problem and training; only which validation rows CoBa observes and how noisy they are differs.
    base = SimulationConfig(steps=300, seed=0)
    problem = make_problem(base)
    change = {}
    for mode in ("rotate", "fixed", "all"):
        for noise in (0.0, 0.1):
            trace = run_balancer("coba", replace(base, held_out=mode, obs_noise=noise), problem)
            change[mode, noise] = summarise(trace)["weight_change_per_update"]
    assert change["rotate", 0.1] > 1.25 * change["rotate", 0.0]  # noise in every observation moves the weights
    for mode in ("fixed", "all"):  # a constant factor per task cancels in L(s) / L(0): the same run, noise or not
        assert change[mode, 0.1] == pytest.approx(change[mode, 0.0], rel=1e-6)
        assert change[mode, 0.1] < change["rotate", 0.1] / 1.5


def test_fixed_and_all_measure_the_reference_rows_at_every_update() -> None:
    cfg = SimulationConfig(valid_pool=40, valid_rows=8, obs_noise=0.3)
    _, valid, _ = make_problem(cfg)
    for mode, rows in (("fixed", 8), ("all", 40)):
        held_out = _HeldOut(valid, replace(cfg, held_out=mode))
        assert [len(r) for r in held_out.initial_rows] == [rows] * 3 and held_out.fixed is held_out.initial_rows
    rotate = _HeldOut(valid, cfg)
    assert rotate.fixed is None and [len(r) for r in rotate.initial_rows] == [40] * 3  # L(0): the whole pool
    first, second = rotate._draw(), rotate._draw()
    assert not all(torch.equal(a, b) for a, b in zip(first, second))  # a fresh sample per update
