"""The launchers on one host with CPU processes (gloo): ``single_node.sh`` with 2 processes, ``multi_node.sh``
as two 1-process "nodes" on localhost (torchrun form, and the deepspeed hostfile form where ssh to localhost
works) finish with the metrics of one in-process run."""
from __future__ import annotations

import subprocess
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
                      "deepspeed_config": str(REPO / "launch" / "ds_zero2.json")}}


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
