"""``mftcoder-coba simulate``: the qualitative claim CoBa is built on, and the command's outputs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mftcoder_coba.balancers import BALANCERS
from mftcoder_coba.balancers.simulate import SimulationConfig, make_problem, run_balancer, summarise
from mftcoder_coba.cli import main


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coba_worst_task_beats_uniform(seed: int) -> None:
    cfg = SimulationConfig(steps=500, seed=seed)
    problem = make_problem(cfg)
    coba = summarise(run_balancer("coba", cfg, problem))
    uniform = summarise(run_balancer("uniform", cfg, problem))
    assert coba["worst_loss"] < uniform["worst_loss"]
    # the small task overfits under uniform weights: its best held-out loss comes early and is lost by the end
    assert uniform["best_step"]["small"] < 250 and uniform["final_heldout"]["small"] > uniform["best_heldout"]["small"]


def test_command_writes_table_picture_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pictures" / "sim.png"
    assert main(["simulate", "--out", str(out), "--steps", "60"]) == 0
    printed = capsys.readouterr().out
    assert "history_length=100" in printed and "worst task" in printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(out.with_suffix(".json").read_text())
    assert set(report["balancers"]) == set(BALANCERS)
    for row in report["balancers"].values():
        assert set(row["final_heldout"]) == {"fast", "slow", "small"} and row["worst_task"] in row["final_heldout"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["sim.json", "sim.png"]  # no temporary files left


def test_bad_arguments_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--out", str(tmp_path / "x.png"), "--balancers", "coba,nope"]) == 2
    assert "mftcoder-coba: error: --balancers: unknown balancer(s) nope" in capsys.readouterr().err
    assert main(["simulate", "--out", str(tmp_path / "x.jpg")]) == 2
    assert not list(tmp_path.iterdir())
