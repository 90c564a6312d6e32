"""Checkpoints that were damaged, and files that were crafted: ``--resume auto`` falls back to the newest
checkpoint that verifies against its files.json, an explicitly named damaged checkpoint is one error line,
a torn metrics line does not stop a resume, and a crafted engine-state pickle is refused without running."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from train_helpers import read_metrics, run_config

from mftcoder_coba.errors import UserError
from mftcoder_coba.file_manifest import MANIFEST, manifest_problem, write_manifest
from mftcoder_coba.training import checkpoint, train
from mftcoder_coba.training.metrics import MetricsLog

QUIET = {"balancer": {"name": "uniform", "options": {}}}


def _train(prepared: Path, run_dir: Path, steps: int, resume: str | None = None, **train_options) -> Path:
    options = {"max_steps": steps, "save_every": 1, "keep_last": 3, "tensorboard": False, **train_options}
    return train(run_config(prepared, run_dir, train=options, **QUIET), resume=resume)


def _engine_file(step_dir: Path, pattern: str) -> Path:
    (found,) = (step_dir / "engine" / checkpoint.TAG).glob(pattern)
    return found


def test_manifest_lists_every_file_and_catches_truncation_and_bit_flips(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"x" * 1000)
    (tmp_path / "sub" / "b.json").write_text("{}")
    write_manifest(tmp_path)
    recorded = json.loads((tmp_path / MANIFEST).read_text())["files"]
    assert [(e["path"], e["size"]) for e in recorded] == [("a.bin", 1000), ("sub/b.json", 2)]
    assert manifest_problem(tmp_path) is None
    (tmp_path / "a.bin").write_bytes(b"x" * 999 + b"y")  # same size, other bytes
    assert manifest_problem(tmp_path, checksums=False) is None
    assert manifest_problem(tmp_path) == "a.bin does not match its sha256 in files.json"
    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    assert manifest_problem(tmp_path, checksums=False) == "a.bin has 10 bytes, 1000 were written"
    (tmp_path / "sub" / "b.json").unlink()
    assert manifest_problem(tmp_path, under="sub/") == "sub/b.json is missing"


def test_resume_auto_skips_a_damaged_newest_checkpoint(prepared: Path, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    run_dir = _train(prepared, tmp_path / "run", 3)
    original = read_metrics(run_dir)
    folder = run_dir / "checkpoints"
    assert all((folder / f"step-0000000{s}" / MANIFEST).is_file() for s in (1, 2, 3))
    newest = _engine_file(folder / "step-00000003", "*model_states.pt")
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a full disk, a cut copy
    flipped = folder / "step-00000002" / "model" / "model.safetensors"
    data = bytearray(flipped.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    flipped.write_bytes(bytes(data))

    with pytest.raises(UserError, match=r"--resume .*step-00000003: damaged or incomplete checkpoint: "
                                        r"engine/state/mp_rank_00_model_states.pt has \d+ bytes"):
        _train(prepared, run_dir, 4, resume=str(folder / "step-00000003"))
    with caplog.at_level(logging.WARNING, logger="mftcoder_coba.training.checkpoint"):
        _train(prepared, run_dir, 4, resume="auto")
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert "step-00000003: engine/state/mp_rank_00_model_states.pt has" in skipped[0]
    assert "step-00000002: model/model.safetensors does not match its sha256" in skipped[1]
    resumed = read_metrics(run_dir)
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4]  # continued from step 1
    for before, after in zip(original[2:], resumed[2:4]):  # steps 2-3 retrained exactly as the first time
        assert after["loss"] == pytest.approx(before["loss"], rel=1e-6)
    assert checkpoint.checkpoint_problem(folder / "step-00000003") is None  # re-saved whole


def test_resume_without_any_verified_checkpoint_refuses_to_start_over(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    for step, state in ((1, '{"step": 1}'), (2, '{"step": 2, "torn')):  # written before files.json existed
        (folder / f"step-0000000{step}").mkdir(parents=True)
        (folder / f"step-0000000{step}" / "trainer_state.json").write_text(state)
    assert checkpoint.resolve_resume(tmp_path, "auto") == folder / "step-00000001"
    with pytest.raises(UserError, match="already holds checkpoints"):
        checkpoint.resolve_resume(tmp_path, None)
    (folder / "step-00000001" / "trainer_state.json").unlink()
    with pytest.raises(UserError, match=r"no checkpoint verifies, refusing to start over from step 0: "
                                        r"step-00000002 \(trainer_state.json does not load .*step-00000001 "
                                        r"\(no trainer_state.json\)"):
        checkpoint.resolve_resume(tmp_path, "auto")
    assert checkpoint.resolve_resume(tmp_path / "fresh", "auto") is None


def test_metrics_log_drops_a_torn_last_line_on_resume(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in range(4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "lo')
    with caplog.at_level(logging.WARNING):
        MetricsLog(tmp_path, ["a"], enabled=True, tensorboard=False, resume_step=2).close()
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(lines[:3]) + "\n"
    assert "metrics.jsonl:5: dropping a torn last line" in caplog.text
    (tmp_path / "metrics.jsonl").write_text(lines[0] + '\n{"step": 1, "lo\n' + lines[2] + "\n")
    with pytest.raises(UserError, match=r"metrics.jsonl:2: not a metrics line"):
        MetricsLog(tmp_path, ["a"], enabled=True, tensorboard=False, resume_step=2)


class _RunsAShellCommand:
    """What a crafted checkpoint file holds: unpickling it calls os.system (here: creates a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("zero_stage,pattern", [(0, "mp_rank_00_model_states.pt"),
                                                (1, "zero_pp_rank_0_mp_rank_00_optim_states.pt")])
def test_crafted_engine_state_is_refused_without_running(prepared: Path, tmp_path: Path,
                                                         zero_stage: int, pattern: str) -> None:
    run_dir = _train(prepared, tmp_path / "run", 1, zero_stage=zero_stage)
    step = run_dir / "checkpoints" / "step-00000001"
    target = _engine_file(step, pattern)
    marker = tmp_path / "code-ran"
    state = torch.load(target, weights_only=False)  # the real file: only one entry is replaced
    state["optimizer" if "module" in state else "optimizer_state_dict"] = _RunsAShellCommand(marker)
    torch.save(state, target)
    write_manifest(step)  # whoever crafts the file can rewrite files.json too
    with pytest.raises(UserError, match=rf"{pattern}: refused to unpickle \(.*posix.system.*\); load engine state "
                                        "only from a trusted source"):
        _train(prepared, run_dir, 2, resume="auto", zero_stage=zero_stage)
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # the switch is put back
