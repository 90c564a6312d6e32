"""Graceful stop on a scheduler's signal (``training/preemption.py``): a run stopped by SIGTERM / SIGUSR1 / SIGINT
at random steps publishes a verified checkpoint of the step it stopped after, exits 75, and resumed with
``--resume auto`` logs the same metrics, step for step, as a run that was never stopped. A SIGKILL during the
stop's save leaves the previous checkpoint intact. ``train.save_every_minutes`` writes wall-clock checkpoints."""
from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from train_helpers import assert_same_run, cli, read_metrics, run_config, run_data, single_thread, write_config

from mftcoder_coba.training import train
from mftcoder_coba.training.checkpoint import checkpoint_problem, complete_checkpoints
from mftcoder_coba.training.preemption import EXIT_STOPPED

SECTIONS = {"train": {"max_steps": 14, "save_every": 5, "keep_last": 3, "tensorboard": False},
            "balancer": {"update_interval": 2}}


def metric_steps(run_dir: Path) -> int:
    """The number of step lines metrics.jsonl holds now (0 while it does not exist)."""
    path = run_dir / "metrics.jsonl"
    return sum(1 for line in path.read_text().splitlines() if line.strip()) - 1 if path.is_file() else 0


def signal_at_step(proc: subprocess.Popen, run_dir: Path, step: int, sig: int, timeout: float = 300) -> str:
    """Send ``sig`` once metrics.jsonl has reached ``step``; return the output of the process, which must end."""
    deadline = time.monotonic() + timeout
    while metric_steps(run_dir) < step and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before the signal"
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=timeout)
    return output


def stopped_step(output: str) -> int:
    """The step the run reported stopping after (its one stop line)."""
    line = next(line for line in output.splitlines() if "mftcoder-coba: stopped by" in line)
    return int(line.split("after step ")[1].split(":")[0])


@pytest.mark.slow
def test_stopped_runs_resume_to_the_metrics_of_an_unstopped_run(prepared: Path, tmp_path: Path) -> None:
    rng = random.Random()
    first, second = sorted(rng.sample(range(1, 13), 2))
    run_dir = tmp_path / "stopped"
    config = write_config(tmp_path / "run.json", run_data(prepared, run_dir, **SECTIONS))

    step = 0
    for at, sig, resume in ((first, signal.SIGTERM, []), (second, signal.SIGUSR1, ["--resume", "auto"])):
        at = max(at, step + 1)  # a step the resumed run has yet to train
        output = signal_at_step(cli("train", "--config", str(config), *resume), run_dir, at, sig)
        step = stopped_step(output)
        assert step >= at, (at, output[-2000:])
        if step == SECTIONS["train"]["max_steps"]:  # the signal came during the last step: the run just ended
            continue
        assert f"stopped by {signal.Signals(sig).name} after step {step}" in output, (at, output[-2000:])
        newest = complete_checkpoints(run_dir)[-1]
        assert newest.name == f"step-{step:08d}" and checkpoint_problem(newest) is None
        assert json.loads((newest / "trainer_state.json").read_text())["step"] == step
        assert metric_steps(run_dir) == step

    resumed = cli("train", "--config", str(config), "--resume", "auto")
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output[-2000:]

    with single_thread():
        straight = train(run_config(prepared, tmp_path / "straight", **SECTIONS))
    assert_same_run(read_metrics(run_dir), read_metrics(straight), rel=1e-6)


@pytest.mark.slow
def test_exit_status_and_a_kill_during_the_stop_save_keeps_the_previous_checkpoint(prepared: Path,
                                                                                   tmp_path: Path) -> None:
    """SIGINT once: a stop with exit 75. Then SIGKILL while the stop's checkpoint is being written: the
    checkpoints published before are untouched and ``--resume auto`` continues from the newest of them."""
    run_dir = tmp_path / "run"
    sections = {**SECTIONS, "train": {**SECTIONS["train"], "save_every": 2}}
    config = write_config(tmp_path / "run.json", run_data(prepared, run_dir, **sections))
    proc = cli("train", "--config", str(config))
    output = signal_at_step(proc, run_dir, 3, signal.SIGINT)
    assert proc.returncode == EXIT_STOPPED, output[-2000:]
    stopped = stopped_step(output)
    before = {path.name: (path / "files.json").read_bytes() for path in complete_checkpoints(run_dir)}

    proc = cli("train", "--config", str(config), "--resume", "auto")
    deadline = time.monotonic() + 300
    while metric_steps(run_dir) < stopped + 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    while not any((run_dir / "checkpoints").glob(".tmp-step-*")) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    output, _ = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, output[-2000:]
    assert any((run_dir / "checkpoints").glob(".tmp-step-*")), "killed before the stop's checkpoint was begun"
    for name, manifest in before.items():
        path = run_dir / "checkpoints" / name
        assert (path / "files.json").read_bytes() == manifest and checkpoint_problem(path) is None

    proc = cli("train", "--config", str(config), "--resume", "auto")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-2000:]
    assert f"(step {stopped})" in output


@pytest.mark.slow
def test_save_every_minutes_writes_wall_clock_checkpoints(prepared: Path, tmp_path: Path) -> None:
    """A checkpoint at every step boundary where the interval has passed (here: a tiny interval, so every step)
    besides ``save_every``'s, each verified; the metrics equal a run without them."""
    sections = {"train": {"max_steps": 3, "save_every_minutes": 1e-6, "keep_last": 5, "tensorboard": False}}
    with single_thread():
        timed = train(run_config(prepared, tmp_path / "timed", **sections))
        plain = train(run_config(prepared, tmp_path / "plain",
                                 train={**sections["train"], "save_every_minutes": 0.0}))
    names = [path.name for path in complete_checkpoints(timed)]
    assert names == ["step-00000001", "step-00000002", "step-00000003"]
    assert all(checkpoint_problem(path) is None for path in complete_checkpoints(timed))
    assert [path.name for path in complete_checkpoints(plain)] == ["step-00000003"]
    assert_same_run(read_metrics(timed), read_metrics(plain), rel=0)
