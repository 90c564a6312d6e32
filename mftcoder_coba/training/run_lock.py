"""One ``train`` per run directory: an OS lock on ``run_dir/.lock``, held by rank 0 for the whole run.

Why: two ``train`` runs on one run_dir both "succeeded", interleaving metrics.jsonl and overwriting each
other's checkpoints. Rank 0 takes ``fcntl.flock`` on ``run_dir/.lock`` before anything in run_dir is
written (config.yaml included) and releases it when ``train`` returns or fails. The kernel drops the lock
when the process dies, however it dies, so a killed run never leaves a stale lock behind and there is
nothing to clean up; the file itself stays (deleting it would let two runs lock two different files).
The holder writes its host, pid and start time into the file, so a refused run can name it.

``flock`` is honoured across hosts on NFSv4 and on Lustre mounted with ``-o flock``; on NFSv3 without lockd,
or Lustre with ``localflock``/``noflock``, it only excludes runs on the same host. ``train`` may run several
times in one process (the demo, ColD Fusion): each call takes and releases its own lock, and a lock is
per open file, so a nested second run in the same process is refused like any other.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from mftcoder_coba.errors import UserError

LOCK_NAME = ".lock"


class RunLock:
    """The held lock of one run directory; :meth:`release` (or the process ending) gives it back."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def holder(path: Path) -> str:
    """What the lock file says about the run that holds it."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        text = ""
    return text or "a run that has not written its name yet"


def acquire(run_dir: Path) -> RunLock:
    """Lock ``run_dir`` (created if needed) for this process, or raise one :class:`UserError` naming the
    run that holds it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"{run_dir}: another train run is using this run directory ({holder(path)}); wait for it "
                        "to finish or choose another run_dir") from None
    except BaseException:
        os.close(fd)
        raise
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}, started {started}\n".encode(), 0)
    return RunLock(path, fd)
