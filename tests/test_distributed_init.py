"""Starting the process group on CPU compiles nothing (DeepSpeed's shm comm op is not needed for training)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = """
from mftcoder_coba.training import distributed
import torch.distributed as dist
world = distributed.init()
assert dist.is_initialized() and dist.get_backend() == "gloo", dist.get_backend()
from deepspeed.comm import comm as ds_comm
assert ds_comm.cdb.shm_comm_op is None
print("ok", world.size)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) start-up path")
@pytest.mark.slow
def test_cpu_start_builds_no_extension(tmp_path: Path) -> None:
    extensions = tmp_path / "torch_extensions"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(TORCH_EXTENSIONS_DIR=str(extensions), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ok 1" in out.stdout
    assert not extensions.exists() or not any(extensions.rglob("*.so"))
