"""``mftcoder-coba demo``: the end-to-end run finishes offline on a CPU, prints its table and writes its files;
it only ever replaces its own folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mftcoder_coba import config_io
from mftcoder_coba.cli import main as cli
from mftcoder_coba.config import RunConfig
from mftcoder_coba.demo import MARKER, UPDATE_INTERVAL, run_data

REPO = Path(__file__).resolve().parents[1]
TASKS = ["code_completion", "text_to_code", "code_to_text", "unit_tests"]


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    # A fresh single process: no launcher variables left by in-process training in earlier tests.
    launcher = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "mftcoder_coba", "demo", "--steps", "4", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout
    assert "held-out loss: start" in table and "final weight" in table
    lines = {line.split()[0]: line.split() for line in table.splitlines() if line.split() and line.split()[0] in TASKS}
    assert list(lines) == TASKS
    run = out / "run"
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3, 4]
    for task, cells in lines.items():
        start, end, weight = float(cells[2]), float(cells[3]), float(cells[5])
        assert start == pytest.approx(metrics[0]["valid_loss"][task], abs=5e-4)  # L_k(0) on all held-out rows
        assert end < start  # four steps of a from-scratch model already lower every task's held-out loss
        assert weight == pytest.approx(metrics[-1]["weights"][task], abs=5e-4)
    for path in [run / "metrics.jsonl", run / "tensorboard", run / "plots" / "valid_loss.png",
                 run / "plots" / "weights.png", run / "plots" / "train_loss.png", out / "model"]:
        assert path.exists() and str(path) in table, path
    assert (out / "model" / "config.json").is_file() and (out / "model" / "tokenizer.json").is_file()
    assert "demo [5/5]" in proc.stderr  # progress is logged throughout


def test_refuses_a_folder_it_did_not_make(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    assert cli(["demo", "--out", str(tmp_path), "--steps", "1"]) == 2
    assert "not a demo folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_rerun_clears_its_own_outputs_first(tmp_path: Path) -> None:
    from mftcoder_coba.demo import _claim

    (tmp_path / MARKER).write_text("")
    for name in ("data", "run", "model"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "old").write_text("stale")
    _claim(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [MARKER]


@pytest.mark.parametrize("steps,warmup,history", [(300, 15, 37), (150, 7, 18), (4, 1, 2)])
def test_run_config_scales_coba_to_the_run(tmp_path: Path, steps: int, warmup: int, history: int) -> None:
    cfg = config_io.build(RunConfig, run_data(tmp_path / "data", tmp_path / "run", steps))
    assert cfg.train.max_steps == steps and cfg.balancer.name == "coba"
    assert cfg.balancer.update_interval == UPDATE_INTERVAL
    assert cfg.balancer.options == {"warmup_steps": warmup, "history_length": history, "tau": 5.0}
    assert cfg.model.model_config["model_type"] == "llama" and cfg.model.dtype == "fp32"
    cgc = config_io.build(RunConfig, run_data(tmp_path / "data", tmp_path / "run", steps, adapter="cgc_lora"))
    assert cgc.model.adapter == "cgc_lora"
