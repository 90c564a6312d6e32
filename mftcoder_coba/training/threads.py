"""How many intra-op threads PyTorch uses per rank on CPU (``train.cpu_threads``).

Why: PyTorch's default is one thread per core of the host, whatever the process may actually run on and
however many ranks share the host. On a busy machine that oversubscription made single-process CPU
training ~30x slower than ``OMP_NUM_THREADS=1``. So a CPU run divides the cores this process may use
(``os.sched_getaffinity``: cgroup/taskset limits included, unlike ``os.cpu_count``) among the ranks on this
host (``LOCAL_WORLD_SIZE``, set by torchrun; the deepspeed launcher's ``LOCAL_SIZE`` likewise), unless the
user said otherwise.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class CpuThreads:
    """The chosen thread count and where it came from (for the one log line)."""

    threads: int
    reason: str

    def describe(self) -> str:
        return f"CPU threads: {self.threads} per rank ({self.reason})"


def available_cores() -> int:
    """Cores this process may run on (its affinity mask), falling back to the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def resolve(setting: int | Literal["auto"], environ: Mapping[str, str] | None = None,
            cores: int | None = None) -> CpuThreads:
    """Threads per rank: ``setting`` (the config field) if it is a number, else ``OMP_NUM_THREADS`` if set,
    else available cores // local ranks, at least 1."""
    environ = os.environ if environ is None else environ
    if setting != "auto":
        return CpuThreads(int(setting), "train.cpu_threads")
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) >= 1:
        return CpuThreads(int(omp), "OMP_NUM_THREADS")
    cores = available_cores() if cores is None else cores
    local = environ.get("LOCAL_WORLD_SIZE") or environ.get("LOCAL_SIZE") or "1"
    ranks = max(1, int(local)) if local.isdigit() else 1
    return CpuThreads(max(1, cores // ranks), f"{cores} cores, {ranks} local ranks")
