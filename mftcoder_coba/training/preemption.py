"""Graceful stop on a scheduler's signal, and wall-clock checkpoints, both agreed by all ranks at a step boundary.

Why: SLURM's time limit, ``scancel``, a preemptible VM and Kubernetes all send SIGTERM (SLURM's ``--signal``
can send SIGUSR1 earlier) and SIGKILL a while later; a trainer that dies on the first signal loses every step
since its last checkpoint. Here the first SIGTERM, SIGUSR1 or SIGINT only sets a flag (:class:`StopSignals`);
at the end of the current optimizer step every rank contributes its flag to one all-reduce
(:meth:`StepBoundary.agree`), so a signal that reached a single rank stops all of them after the same step.
The trainer then publishes a verified checkpoint of that step (the usual atomic save with ``files.json``) and
raises :class:`RunStopped`, which the CLI turns into :data:`EXIT_STOPPED`.

Repeated SIGTERM / SIGUSR1 while the stop is under way are absorbed (``scancel`` signals every process of a
job, and torchrun forwards the signal it got itself, so a rank may see the same request twice); a second
SIGINT is the impatient user and raises ``KeyboardInterrupt`` at once. Whatever ends the process during the
save (that interrupt, the scheduler's SIGKILL), the previous checkpoint stays intact: a checkpoint is only
ever published whole, by rename.

Exit status of a stopped run: :data:`EXIT_STOPPED` (75, ``EX_TEMPFAIL``: "try again later") for a plain
process, which schedulers can tell from a crash (1), a config error (2) and a signal death (128 + n). Under
torchrun a worker exits 0 instead, because the agent restarts a worker group on any non-zero status; it
writes the stop to the file named by ``$MFTCODER_STOP_FILE`` when the launcher set one, and
``launch/*.sh`` exit 75 after reading it.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType, TracebackType

import numpy as np

from mftcoder_coba.atomic import atomic_write_text
from mftcoder_coba.training import distributed
from mftcoder_coba.training.distributed import World

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
EXIT_STOPPED = 75
"""Exit status of a run stopped by a signal after publishing its checkpoint (sysexits' EX_TEMPFAIL)."""
STOP_FILE_ENV = "MFTCODER_STOP_FILE"
"""Set by ``launch/*.sh``: the file where a stopped worker records its stop for the launcher's exit status."""


class RunStopped(Exception):
    """The run stopped on a signal after publishing the checkpoint of ``step``; ``exit_status`` for the CLI."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path) -> None:
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        self.exit_status = 0 if distributed.under_torchelastic() else EXIT_STOPPED
        super().__init__(f"stopped by {signal_name} after step {step}: checkpoint {checkpoint} published; "
                         "continue with --resume auto")


class StopSignals:
    """Remembers the first stop signal instead of dying of it (a context manager: handlers installed on enter,
    the previous ones restored on exit). Signal handlers exist only in the main thread; elsewhere (a trainer
    started from a worker thread) nothing is installed and the signals keep their previous effect."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, signal.Handlers | object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
            log.warning("%s received: stopping after the current step, once its checkpoint is published "
                        "(a second SIGINT aborts at once)", signal.Signals(signum).name)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    @property
    def name(self) -> str:
        return "a signal" if self.received is None else signal.Signals(self.received).name


class StepBoundary:
    """What all ranks decide together after each optimizer step: stop now (a rank got a stop signal), and
    checkpoint now (``train.save_every_minutes`` of wall-clock time have passed on some rank)."""

    def __init__(self, signals: StopSignals, save_every_minutes: float) -> None:
        self.signals = signals
        self.every_s = save_every_minutes * 60.0
        self.last_save = time.monotonic()
        self.stop_signal: str | None = None  # why this rank stops: its own signal, or another rank's

    def agree(self, world: World) -> tuple[bool, bool]:
        """``(stop, save_due)``, the same on every rank (one all-reduce of two flags; collective)."""
        due = self.every_s > 0 and time.monotonic() - self.last_save >= self.every_s
        flags = distributed.all_reduce_sum(np.array([self.signals.received is not None, due], dtype=np.float64),
                                           world)
        stop = bool(flags[0] > 0)
        if stop and self.stop_signal is None:
            self.stop_signal = self.signals.name if self.signals.received is not None else "a signal to another rank"
        return stop, bool(flags[1] > 0)

    def saved(self) -> None:
        """A checkpoint was published: the wall-clock interval starts again."""
        self.last_save = time.monotonic()

    def stopped(self, step: int, checkpoint: Path) -> RunStopped:
        """The exception that ends a stopped run; records the stop for the launcher (``$MFTCODER_STOP_FILE``)."""
        stop = RunStopped(self.stop_signal or self.signals.name, step, checkpoint)
        target = os.environ.get(STOP_FILE_ENV)
        if target:
            record = {"signal": stop.signal_name, "step": step, "checkpoint": str(checkpoint)}
            atomic_write_text(Path(target), json.dumps(record) + "\n")
        return stop
