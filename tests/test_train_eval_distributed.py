"""In-training evaluation on 2 gloo ranks under ZeRO-3 (``launch/single_node.sh``): each rank scores every
second row of the eval split, the sums are all-reduced, so the eval losses, the best checkpoint and the early
stop equal those of one in-process run."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from train_helpers import (
    REPO,
    STOP_STEP_MOVED,
    cpu_env,
    read_metrics,
    run_config,
    run_data,
    single_thread,
    write_config,
)

from mftcoder_coba.training import train


def _sections(prepared: Path) -> dict:
    return {"eval": {"data": str(prepared / "valid"), "every": 2},  # 15 rows: 8 on rank 0, 7 on rank 1
            "balancer": {"name": "uniform", "options": {}}, "optim": {"lr": 0.03, "warmup_steps": 1},
            "train": {"max_steps": 30, "micro_batch_size": 1, "global_batch_size": 4, "zero_stage": 3,
                      "report_to": [], "keep_best": "eval.worst",
                      "early_stopping": {"metric": "eval.mean", "patience": 2}}}


@pytest.mark.distributed
@STOP_STEP_MOVED
def test_two_ranks_score_the_eval_split_and_decide_like_one_process(prepared: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "two.json", run_data(prepared, tmp_path / "two", **_sections(prepared)))
    proc = subprocess.run(["bash", str(REPO / "launch" / "single_node.sh"), "2", "--config", str(config)], cwd=REPO,
                          env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    with single_thread():
        one = train(run_config(prepared, tmp_path / "one", **_sections(prepared)))
    two_lines, one_lines = read_metrics(tmp_path / "two"), read_metrics(one)
    assert [r["step"] for r in two_lines] == [r["step"] for r in one_lines]
    evaluated = [(a, b) for a, b in zip(two_lines, one_lines) if "eval_loss" in b]
    assert [b["step"] for _, b in evaluated] == [2, 4, 6, 8, 10]  # stopped early, at the same step
    for a, b in evaluated:
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-5), b["step"]
    assert two_lines[-1]["early_stopped"] == one_lines[-1]["early_stopped"]
    best = [json.loads((run / "checkpoints" / "best.json").read_text()) for run in (tmp_path / "two", one)]
    assert best[0]["step"] == best[1]["step"] and best[0]["value"] == pytest.approx(best[1]["value"], rel=1e-5)
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == sorted(
        p.name for p in (one / "checkpoints").iterdir())
