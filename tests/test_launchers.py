"""The launchers on one host with CPU processes (gloo): ``single_node.sh`` with 2 processes, ``multi_node.sh``
as two 1-process "nodes" on localhost (torchrun form, and the deepspeed hostfile form where ssh to localhost
works) finish with the metrics of one in-process run. A config error is one line and exit 2; the launchers
find the interpreter of the environment they were started from; a stop signal to the launcher or to one rank
ends with exit 75 and a checkpoint to resume from; a killed rank is restarted from the newest checkpoint."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import (
    REPO,
    assert_same_run,
    cpu_env,
    read_metrics,
    run_config,
    run_data,
    single_thread,
    write_config,
)

from mftcoder_coba.training import train
from mftcoder_coba.training.distributed import free_port

SECTIONS = {"train": {"max_steps": 3, "micro_batch_size": 1, "global_batch_size": 4, "tensorboard": False,
                      "deepspeed_config": "zero2"}}


def _launch(script: str, args: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(REPO / "launch" / script), *args], cwd=REPO, env=cpu_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.distributed
def test_single_and_multi_node_launchers_match_one_process(prepared: Path, tmp_path: Path) -> None:
    single_cfg = write_config(tmp_path / "single.json", run_data(prepared, tmp_path / "single", **SECTIONS))
    multi_cfg = write_config(tmp_path / "multi.json", run_data(prepared, tmp_path / "multi", **SECTIONS))
    port = str(free_port())
    procs = [_launch("single_node.sh", ["2", "--config", str(single_cfg)])]
    procs += [_launch("multi_node.sh", ["--config", str(multi_cfg)], NNODES="2", NODE_RANK=str(rank),
                      NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port) for rank in (0, 1)]
    for proc in procs:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output[-3000:]

    with single_thread():
        one = train(run_config(prepared, tmp_path / "one", train={**SECTIONS["train"], "deepspeed_config": None}))
    single, multi = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "multi")
    assert_same_run(single, multi, rel=1e-6)
    assert_same_run(single, read_metrics(one), rel=1e-5, weights_rel=1e-3)
    assert (tmp_path / "multi" / "checkpoints" / "step-00000003" / "trainer_state.json").is_file()


def _ssh_to_localhost() -> bool:
    """True when pdsh is installed and both host names of this machine accept key-based ssh (set up by hand:
    sshd running, the user's key in authorized_keys); CI machines have neither, so the test is skipped there."""
    import shutil

    if shutil.which("pdsh") is None or shutil.which("ssh") is None:
        return False
    for host in ("localhost", "127.0.0.1"):
        probe = subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", host, "true"],
                               capture_output=True, timeout=30)
        if probe.returncode != 0:
            return False
    return True


@pytest.mark.distributed
@pytest.mark.skipif(not _ssh_to_localhost(), reason="needs pdsh and key-based ssh to localhost and 127.0.0.1")
def test_deepspeed_hostfile_form_matches_one_process(prepared: Path, tmp_path: Path) -> None:
    """``HOSTFILE=... multi_node.sh``: DeepSpeed's runner starts one process on each of two "nodes" (this
    machine under two names) over ssh/pdsh; the run equals one in-process run."""
    config = write_config(tmp_path / "ds.json", run_data(prepared, tmp_path / "ds", **SECTIONS))
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    proc = _launch("multi_node.sh", ["--config", str(config)], HOSTFILE=str(hostfile), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(free_port()))
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert "127.0.0.1: " in output and "localhost: " in output  # pdsh prefixes each node's lines
    with single_thread():
        one = train(run_config(prepared, tmp_path / "one", train={**SECTIONS["train"], "deepspeed_config": None}))
    assert_same_run(read_metrics(tmp_path / "ds"), read_metrics(one), rel=1e-5, weights_rel=1e-3)


def _workers(launcher: subprocess.Popen, count: int, timeout: float = 300) -> dict[int, int]:
    """``{rank: pid}`` of the torchrun workers under a launcher (children of its torchrun child), once all are up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and launcher.poll() is None:
        found = {}
        agents = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
        for agent in agents:
            for pid in subprocess.run(["pgrep", "-P", agent], capture_output=True, text=True).stdout.split():
                try:
                    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                rank = next((int(v.split(b"=")[1]) for v in environ if v.startswith(b"RANK=")), None)
                if rank is not None:
                    found[rank] = int(pid)
        if len(found) == count:
            return found
        time.sleep(0.1)
    raise AssertionError("the workers did not start")


def _steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return sum(1 for line in path.read_text().splitlines() if line.strip()) - 1 if path.is_file() else 0


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while _steps(run_dir) < step and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended first"


@pytest.mark.slow
def test_config_error_is_one_line_with_the_active_environments_python(tmp_path: Path) -> None:
    """No PYTHON, a PATH whose pythons lack torch, the venv active: the launcher uses the venv's interpreter; a
    config mistake is one line, printed once, exit 2 (before: 'python' without torch, or torchrun's report of
    every rank's traceback)."""
    config = write_config(tmp_path / "bad.json", {"run_dir": str(tmp_path / "run"), "data": {"train": "x"},
                                                  "train": {"max_steps": 1}})
    env = {k: v for k, v in cpu_env().items() if k != "PYTHON"}
    env.update(PATH="/usr/bin:/bin", VIRTUAL_ENV=sys.prefix)
    proc = subprocess.run(["bash", str(REPO / "launch" / "single_node.sh"), "2", "--config", str(config)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("mftcoder-coba: error: config field 'model'")


STOP = {"train": {"max_steps": 10, "micro_batch_size": 1, "global_batch_size": 4, "tensorboard": False,
                  "save_every": 4, "keep_last": 3}, "balancer": {"update_interval": 2}}


@pytest.mark.distributed
def test_stop_signal_to_the_launcher_or_one_rank_then_resume(prepared: Path, tmp_path: Path) -> None:
    """SIGTERM to single_node.sh, later SIGUSR1 to rank 1 alone, each at a random step: every rank stops after the
    same step, the checkpoint of that step verifies, exit 75; resumed to the end, the metrics are those of an
    uninterrupted run."""
    from mftcoder_coba.training.checkpoint import checkpoint_problem, complete_checkpoints

    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "run.json", run_data(prepared, run_dir, **STOP))
    first = random.randint(1, 4)
    proc = _launch("single_node.sh", ["2", "--config", str(config)])
    _wait_for_step(proc, run_dir, first)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, output[-3000:]
    stopped = complete_checkpoints(run_dir)[-1]
    assert checkpoint_problem(stopped) is None and _steps(run_dir) == int(stopped.name[5:]) >= first

    proc = _launch("single_node.sh", ["2", "--config", str(config), "--resume", "auto"])
    second = random.randint(_steps(run_dir) + 1, 8)
    _wait_for_step(proc, run_dir, second)
    os.kill(_workers(proc, 2)[1], signal.SIGUSR1)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, output[-3000:]
    assert "stopped by a signal to another rank after step" in output  # rank 0's line: it got none itself
    stopped = complete_checkpoints(run_dir)[-1]
    assert checkpoint_problem(stopped) is None and _steps(run_dir) == int(stopped.name[5:]) >= second

    proc = _launch("single_node.sh", ["2", "--config", str(config), "--resume", "auto"])
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    with single_thread():
        one = train(run_config(prepared, tmp_path / "one", **STOP))
    assert_same_run(read_metrics(run_dir), read_metrics(one), rel=1e-5, weights_rel=1e-3)


@pytest.mark.distributed
def test_a_killed_rank_is_restarted_from_the_newest_checkpoint(prepared: Path, tmp_path: Path) -> None:
    """kill -9 of rank 1 (an OOM kill, an ECC error) after the first checkpoint: torchrun restarts the group
    (MAX_RESTARTS), the restart resumes from that checkpoint without --resume, the run ends with exit 0 and the
    metrics of an uninterrupted run."""
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "run.json", run_data(prepared, run_dir, **STOP))
    proc = _launch("single_node.sh", ["2", "--config", str(config)], MAX_RESTARTS="1")
    _wait_for_step(proc, run_dir, 5)
    os.kill(_workers(proc, 2)[1], signal.SIGKILL)
    output, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, output[-3000:]
    assert "restart 1 of the worker group" in output and "(step 4)" in output, output[-3000:]
    with single_thread():
        one = train(run_config(prepared, tmp_path / "one", **STOP))
    assert_same_run(read_metrics(run_dir), read_metrics(one), rel=1e-5, weights_rel=1e-3)
