"""``mftcoder-coba bench-train``: the tiny CPU workload runs through the real trainer and writes its report
(no timing assertions: the numbers of a CPU smoke run mean nothing)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mftcoder_coba.bench_train import ModeResult, coba_overhead, make_shards, workload
from mftcoder_coba.cli import main as cli
from mftcoder_coba.data import PackedDataset


@pytest.mark.slow
def test_cli_smoke_writes_json_and_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench"
    assert cli(["bench-train", "--tiny", "--steps", "2", "--warmup-steps", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "cpu_sdpa_zero0-tiny.json").read_text())
    assert (out / "cpu_sdpa_zero0-tiny.md").read_text().strip() == report["table"] and report["table"] in printed
    assert [r["mode"] for r in report["results"]] == ["coba", "uniform"]
    coba, uniform = report["results"]
    assert len(coba["step_times_s"]) == len(uniform["step_times_s"]) == 2
    assert coba["held_out_forward_s"] > 0 and uniform["held_out_forward_s"] is None
    assert set(report["coba_overhead"]) >= {"held_out_forwards_pct", "everything_else_pct", "total_pct"}
    assert report["environment"]["device"] == "cpu" and report["environment"]["torch"]
    assert report["workload"]["attn_implementation"] == "sdpa" and report["workload"]["num_tasks"] == 8


@pytest.mark.slow
def test_memory_knobs_reach_the_trainer(tmp_path: Path) -> None:
    """--compile, selective checkpointing, ZeRO-1 and bf16 masters run through the trainer and are named in the
    report (bf16 masters make the tiny CPU model bf16 too)."""
    out = tmp_path / "bench"
    assert cli(["bench-train", "--tiny", "--modes", "uniform", "--steps", "1", "--warmup-steps", "1", "--compile",
                "--gradient-checkpointing", "selective", "--zero-stage", "1", "--master-weights", "bf16",
                "--out", str(out)]) == 0
    report = json.loads((out / "cpu_sdpa_zero1_selective-ckpt_compile_bf16-master-tiny.json").read_text())
    work = report["workload"]
    assert work["compile"] is True and work["gradient_checkpointing"] == "selective" and work["zero_stage"] == 1
    assert work["master_weights"] == "bf16" and work["dtype"] == "bf16"
    assert "zero1 selective-ckpt compile bf16-master" in report["table"]
    assert np.isfinite(report["results"][0]["final_loss"])


def test_synthetic_shards_are_packed_multitask_rows(tmp_path: Path) -> None:
    work = workload(tiny=True, on_cuda=False)
    data = make_shards(tmp_path / "data", work)
    train = PackedDataset(data / "train")
    assert len(train.tasks) == 8 and train.seq_len == work.seq_len and train.vocab_size == 512
    rows = train.rows(np.arange(len(train)))
    starts = (rows["position_ids"] == 0).sum(axis=1)
    assert starts.max() >= 3  # several samples share a row
    assert rows["input_ids"].max() < 512
    valid = PackedDataset(data / "valid")
    assert all(len(valid.task_rows(t)) >= 1 for t in range(8))


def test_overhead_split() -> None:
    coba = ModeResult("coba", step_time_s=1.05, tokens_per_s=0, mfu=None, peak_memory_gib=None,
                      held_out_forward_s=0.04)
    uniform = ModeResult("uniform", step_time_s=1.0, tokens_per_s=0, mfu=None, peak_memory_gib=None,
                         held_out_forward_s=None)
    split = coba_overhead([coba, uniform])
    assert split["total_pct"] == pytest.approx(5.0)
    assert split["held_out_forwards_pct"] == pytest.approx(4.0)
    assert split["everything_else_pct"] == pytest.approx(1.0)
    assert coba_overhead([coba]) is None


def test_bad_arguments(capsys: pytest.CaptureFixture) -> None:
    assert cli(["bench-train", "--tiny", "--modes", "coba,famo"]) == 2
    assert "--modes: unknown mode(s) famo" in capsys.readouterr().err
    assert cli(["bench-train", "--tiny", "--master-weights", "bf16"]) == 2
    assert "--master-weights bf16 needs --zero-stage 1, 2 or 3" in capsys.readouterr().err
