"""Running generated code: one fresh interpreter per sample, limits, a wall-clock kill, a throw-away directory.

What it protects against is code that is wrong rather than malicious: a sample that loops forever, forks,
allocates without end, writes huge files, prints without end, exits or kills itself, deletes files in its
working directory or reads the environment. Each sample runs as ``python -I`` (no user site, no ``PYTHON*``
variables, no current directory on ``sys.path``) in its own session, whose whole process group is killed at
the wall-clock timeout and again when the sample ends (so nothing it started outlives it); it starts in a
fresh temporary directory that is removed afterwards (never the run directory), with a scrubbed environment
(only PATH=/usr/bin:/bin, HOME and TMPDIR pointing into that directory, LANG, OMP_NUM_THREADS=1), stdin
empty (/dev/null), stdout and stderr captured to an anonymous file and truncated, and the rlimits and
process-creation guards of :mod:`mftcoder_coba.evaluation.sandbox_child`.

Two modes (:data:`MODES`, ``eval-code --sandbox``): ``guarded`` is the above alone. It is not a security
boundary: a sample can reach the network and every file the user running the evaluation can reach, and code
written to escape (``ctypes``) can undo the Python guards. ``isolated`` adds the namespaces of
:mod:`mftcoder_coba.evaluation.isolation` (no network, a read-only filesystem without home, run or temporary
folders, a scratch tmpfs, its own PID namespace whose processes all die with the sample, no capabilities);
:func:`resolve_mode` decides ``auto`` once per process by starting one isolated sample. Kernel exploits are
beyond both: run models you do not trust inside a VM.
"""
from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

CHILD = Path(__file__).resolve().parent / "sandbox_child.py"
KINDS = ("passed", "failed", "syntax", "exception", "timeout", "memory", "exited", "forbidden", "crashed")
"""How a sample ended: its tests passed; an assertion failed; it does not parse; another exception; it ran past
the wall-clock or CPU limit; it ran out of its address space (MemoryError); it exited before its tests
finished; it tried to start a process; it was killed by a signal. Writing past the file-size limit (output
included) raises ``OSError`` (File too large) in Python, an ``exception``."""
_STATUS_BYTES = 4096
MODES = ("auto", "isolated", "guarded")
"""``--sandbox``: auto = isolated where the kernel allows it, else guarded with a warning; isolated = refuse
without the namespaces; guarded = one fresh interpreter with limits and Python guards only."""


class IsolationUnavailable(RuntimeError):
    """The kernel refused a step of the isolated sandbox (the message names which)."""


@dataclass(frozen=True)
class Limits:
    """What one sample may use."""

    timeout: float = 10.0
    """Wall-clock seconds before the sample's process group is killed (the CPU limit is this, rounded up, + 1)."""
    memory_mb: int = 1024
    """Address-space limit (RLIMIT_AS) in MiB; a Python interpreter alone needs about 30."""
    file_mb: int = 16
    """Largest file the sample may write (RLIMIT_FSIZE), including its captured output, in MiB."""
    output_chars: int = 2000
    """Characters of stdout+stderr kept in the result."""
    sandbox: str = "guarded"
    """``isolated`` (namespaces) or ``guarded`` (limits and Python guards only); see :func:`resolve_mode`."""
    scratch_mb: int = 64
    """Isolated: size of the sample's scratch tmpfs (its working directory), in MiB."""
    hidden: tuple[str, ...] = ()
    """Isolated: folders shown empty besides $HOME, the current directory and the system's (e.g. the run being
    scored)."""

    def validate(self) -> None:
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout}")
        if self.memory_mb < 64:
            raise ValueError(f"memory limit must be >= 64 MiB (an interpreter needs ~30), got {self.memory_mb}")
        if self.file_mb < 1:
            raise ValueError(f"file size limit must be >= 1 MiB, got {self.file_mb}")
        if self.sandbox not in MODES[1:]:
            raise ValueError(f"sandbox must be one of {', '.join(MODES[1:])} (resolve 'auto' first), "
                             f"got {self.sandbox!r}")
        if self.scratch_mb < 1:
            raise ValueError(f"scratch size must be >= 1 MiB, got {self.scratch_mb}")


@dataclass(frozen=True)
class Outcome:
    """How one program ended."""

    status: str
    """One of :data:`KINDS`."""
    detail: str
    """The exception (``AssertionError: ...``), the signal or exit status; empty when it passed."""
    seconds: float
    """Wall-clock time from start to end (or kill)."""
    output: str
    """The start of what it printed."""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_program(source: str, limits: Limits = Limits()) -> Outcome:
    """Run ``source`` as a script in a sandboxed interpreter and report how it ended (never raises for the
    program's behaviour; :class:`IsolationUnavailable` where the kernel refuses the isolated mode)."""
    token = secrets.token_hex(16)
    token_read, token_write = os.pipe()
    os.write(token_write, token.encode("ascii"))
    os.close(token_write)
    child_limits = json.dumps({"cpu_seconds": math.ceil(limits.timeout) + 1, "memory_bytes": limits.memory_mb << 20,
                               "file_bytes": limits.file_mb << 20, "token_fd": token_read,
                               "isolated": limits.sandbox == "isolated", "scratch_bytes": limits.scratch_mb << 20,
                               "hidden": [str(Path.home()), os.getcwd(), *limits.hidden]})
    work = Path(tempfile.mkdtemp(prefix="mftcoder-sandbox-"))
    read_end, write_end = os.pipe()
    try:
        (work / "program.py").write_text(source, encoding="utf-8")
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1"}
        with tempfile.TemporaryFile() as output:
            start = time.monotonic()
            proc = subprocess.Popen([sys.executable, "-I", str(CHILD), str(write_end), child_limits, "program.py"],
                                    cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=output,
                                    stderr=subprocess.STDOUT, pass_fds=(write_end, token_read),
                                    start_new_session=True, close_fds=True)
            os.close(token_read)
            token_read = -1
            os.close(write_end)
            write_end = -1
            try:
                proc.wait(timeout=limits.timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)  # also any process the sample left behind in its group
                proc.wait()
            seconds = time.monotonic() - start
            output.seek(0)
            printed = output.read(limits.output_chars * 4).decode("utf-8", errors="replace")[:limits.output_chars]
        report = _read_report(read_end)
    finally:
        os.close(read_end)
        for fd in (write_end, token_read):
            if fd >= 0:
                os.close(fd)
        _remove_tree(work)
    if report is not None and report.get("token") != token:
        report = {"status": "exited", "detail": "a status report without the sandbox's token (written by the program)"}
    elif report is not None and report.get("status") == "setup":
        raise IsolationUnavailable(str(report.get("detail")))
    status, detail = _classify(proc.returncode, timed_out, report, limits)
    return Outcome(status, detail, round(seconds, 4), printed)


def run_programs(sources: Sequence[str], limits: Limits = Limits(), workers: int = 1,
                 progress: Callable[[int, Outcome], None] | None = None) -> list[Outcome]:
    """:func:`run_program` for every source, ``workers`` at a time; results in the order of ``sources``.

    ``progress(index, outcome)`` is called as each one finishes (from a worker thread).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")

    def one(index: int) -> Outcome:
        outcome = run_program(sources[index], limits)
        if progress is not None:
            progress(index, outcome)
        return outcome

    with ThreadPoolExecutor(max_workers=workers) as pool:  # each thread only waits on its child process
        return list(pool.map(one, range(len(sources))))


@cache
def isolation_problem() -> str | None:
    """Why the isolated sandbox does not work here (None where it does): one trivial isolated sample, once."""
    try:
        outcome = run_program("import os\nassert os.listdir('.') == ['program.py']\n",
                              Limits(timeout=30, sandbox="isolated"))
    except IsolationUnavailable as exc:
        return str(exc)
    return None if outcome.passed else f"a trivial isolated sample ended {outcome.status}: {outcome.detail}"


def resolve_mode(requested: str) -> str:
    """``isolated`` or ``guarded`` for ``--sandbox requested``: ``auto`` falls back to ``guarded`` with one
    warning naming what is missing; ``isolated`` raises :class:`IsolationUnavailable` where it does not work."""
    if requested not in MODES:
        raise ValueError(f"sandbox must be one of {', '.join(MODES)}, got {requested!r}")
    if requested == "guarded":
        return requested
    problem = isolation_problem()
    if problem is None:
        return "isolated"
    if requested == "isolated":
        raise IsolationUnavailable(problem)
    log.warning("SANDBOX NOT ISOLATED: the kernel refused the namespaces (%s); samples run with limits and Python "
                "guards only, which generated code can escape (--sandbox isolated refuses instead)", problem)
    return "guarded"


def _classify(returncode: int, timed_out: bool, report: dict | None, limits: Limits) -> tuple[str, str]:
    if timed_out:
        return "timeout", f"killed after {limits.timeout:g} s wall-clock"
    if returncode < 0:
        sig = signal.Signals(-returncode)
        if sig == signal.SIGXCPU:
            return "timeout", f"CPU time limit ({math.ceil(limits.timeout) + 1} s)"
        return "crashed", f"killed by {sig.name}"
    if report is None:
        return "exited", f"exit status {returncode} before its tests finished"
    status = report.get("status")
    return (status, str(report.get("detail", ""))) if status in KINDS else ("crashed", "unreadable status report")


def _read_report(fd: int) -> dict | None:
    """The child's status report, if it wrote one (non-blocking: a leftover writer cannot stall the harness)."""
    os.set_blocking(fd, False)
    try:
        data = os.read(fd, _STATUS_BYTES)
        report = json.loads(data.decode("utf-8")) if data else None
    except (BlockingIOError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # the group is already gone
        pass


def _remove_tree(path: Path) -> None:
    """Remove the sample's directory even where it took away its own permissions."""
    def make_writable(function: Callable, name: str, _exc: object) -> None:
        try:
            os.chmod(os.path.dirname(name), stat.S_IRWXU)
            if os.path.isdir(name) and not os.path.islink(name):
                os.chmod(name, stat.S_IRWXU)
            function(name)
        except OSError as exc:  # a leftover in the temp folder is no reason to stop the evaluation
            log.warning("could not remove %s: %s", name, exc)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=make_writable)
    else:
        shutil.rmtree(path, onerror=make_writable)
