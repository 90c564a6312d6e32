"""Process-group set-up and the few collectives the trainer needs, the same with or without a launcher.

Under torchrun or the deepspeed launcher the environment carries RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT. A plain ``python`` process (tests, the demo, ColD Fusion contributors run in
turn) has none of them, so :func:`init` fills single-process defaults with a free local port. The group
is created once per process (``train`` may run several times) with NCCL on CUDA and gloo on CPU.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout


@dataclass(frozen=True)
class World:
    """This process's place in the job."""

    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env() -> World:
    """Rank and size as the launcher set them (single process without one); no process group needed.

    Used before anything expensive so the batch/world-size check can fail fast.
    """
    rank = int(os.environ.get("RANK", "0"))
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return World(rank=rank, size=size, local_rank=local_rank, device=device)


def free_port() -> int:
    """A TCP port free on this host now (for a single-process group's MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init() -> World:
    """Create the process group once (via DeepSpeed so its comm layer knows it) and return the world."""
    import deepspeed  # heavy import, deferred until a run really starts

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    world = world_from_env()
    if world.device.type == "cuda":
        torch.cuda.set_device(world.device)
    if not dist.is_initialized():
        if world.device.type == "cpu":
            _skip_shm_comm_build()
        store = _attempt_store(world)
        if store is not None:  # DeepSpeed's comm layer adopts an existing default group
            dist.init_process_group("nccl" if world.device.type == "cuda" else "gloo", store=store, rank=world.rank,
                                    world_size=world.size)
        deepspeed.init_distributed(dist_backend="nccl" if world.device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False, verbose=False)
    return world


def under_torchelastic() -> bool:
    """Whether a torchrun agent supervises this process (it restarts the workers on any non-zero exit)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def restart_count() -> int:
    """How many times torchrun has restarted this worker group (0 on the first start, or without torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def _attempt_store(world: World) -> dist.Store | None:
    """Under torchrun: the agent's store seen through a prefix of this restart attempt, else None (env://).

    Why: torchrun's workers share the agent's TCPStore (``TORCHELASTIC_USE_AGENT_STORE``), which outlives a
    restart of the worker group, and torch keys each process group's addresses by the group's name only. The
    restarted workers then read the dead workers' addresses for their second group (DeepSpeed's data-parallel
    clone of the world) and fail with 'Gloo connectFullMesh failed ... Connection refused' on every restart.
    One prefix per attempt keeps each generation's keys apart."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world.size, is_master=False,
                          timeout=default_pg_timeout)
    return dist.PrefixStore(f"mftcoder-attempt-{restart_count()}", store)


def _skip_shm_comm_build() -> None:
    """Keep DeepSpeed from compiling its CPU shared-memory communication op on a gloo run.

    Why: DeepSpeed's comm backend builds ``deepspeed_shm_comm`` (a C++ extension, 30-90 s on a fresh machine, and
    again whenever another environment shares the extensions cache) when it starts on CPU, but only its
    inference all-reduce uses it; training's collectives go through the gloo process group. Marking the op
    incompatible makes DeepSpeed skip the build and use gloo for everything, as it does where the op cannot
    be built. ``__compatible_ops__`` is DeepSpeed's own table of which ops may be loaded.
    """
    import deepspeed.ops

    table = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(table, dict):
        table["deepspeed_shm_comm"] = False


def all_reduce_sum(values: np.ndarray, world: World) -> np.ndarray:
    """Sum a small float64 array over all ranks (one collective) and return it as NumPy."""
    if world.size == 1:
        return np.asarray(values, dtype=np.float64)
    tensor = torch.as_tensor(np.asarray(values, dtype=np.float64), device=world.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().numpy()


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()
