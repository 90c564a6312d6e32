"""The first code of a sandboxed interpreter: lower the limits, run the program, report how it ended.

Started by :func:`mftcoder_coba.evaluation.sandbox.run_program` as ``python -I sandbox_child.py STATUS_FD
LIMITS_JSON PROGRAM``. It imports nothing of this package (the sandbox stays a bare interpreter) and runs
before the untrusted program, so the program starts with the limits already in place:

- RLIMIT_CPU (CPU seconds, then SIGXCPU), RLIMIT_AS (address space: allocations beyond it raise
  MemoryError), RLIMIT_FSIZE (largest file it may write), RLIMIT_CORE 0, and RLIMIT_NPROC 0 (no new
  process or thread; the kernel does not apply this one to root);
- process creation through Python (``os.fork``, ``os.system``, ``os.exec*``/``spawn*``, ``subprocess``)
  raises :class:`SandboxViolation`, which also stops fork bombs where RLIMIT_NPROC does not apply.

How the program ended goes to STATUS_FD as one JSON object ``{"status", "detail"}``; a process that never
writes it exited or was killed before its tests finished. The program can forge that report or undo the
guards (``ctypes``): this catches accidents and runaway code, not a determined attacker.
"""
import json
import os
import resource
import sys

_KINDS_BY_EXCEPTION = (("failed", AssertionError), ("memory", MemoryError), ("exited", SystemExit))


class SandboxViolation(PermissionError):
    """The program tried to start a process."""


def _set_limit(which: int, value: int) -> None:
    _, hard = resource.getrlimit(which)
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(which, (value, value))


def _forbid(*_args, **_kwargs):
    raise SandboxViolation("starting a process is not allowed in the sandbox")


def _guard_process_creation() -> None:
    import _posixsubprocess
    import subprocess

    for name in ("fork", "forkpty", "system", "popen", "posix_spawn", "posix_spawnp", "execv", "execve", "execvp",
                 "execvpe", "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
                 "spawnl", "spawnle", "spawnlp", "spawnlpe"):
        if hasattr(os, name):
            setattr(os, name, _forbid)
    _posixsubprocess.fork_exec = _forbid
    subprocess.Popen = _forbid


def _classify(exc: BaseException) -> str:
    if isinstance(exc, SandboxViolation):
        return "forbidden"
    for kind, cls in _KINDS_BY_EXCEPTION:
        if isinstance(exc, cls):
            return kind
    return "exception"


def main() -> None:
    status_fd, limits, program = int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    _set_limit(resource.RLIMIT_CPU, int(limits["cpu_seconds"]))
    _set_limit(resource.RLIMIT_AS, int(limits["memory_bytes"]))
    _set_limit(resource.RLIMIT_FSIZE, int(limits["file_bytes"]))
    _set_limit(resource.RLIMIT_CORE, 0)
    _set_limit(resource.RLIMIT_NPROC, 0)
    _guard_process_creation()
    with open(program, encoding="utf-8") as handle:
        source = handle.read()
    del handle
    try:
        code = compile(source, program, "exec")
    except (SyntaxError, ValueError) as exc:  # ValueError: a NUL byte in the source
        status, detail = "syntax", f"{type(exc).__name__}: {exc}"
    else:
        try:
            exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
            status, detail = "passed", ""
        except BaseException as exc:  # noqa: BLE001 - every way the program ends is a reported outcome
            status, detail = _classify(exc), f"{type(exc).__name__}: {exc}"[:500]
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # the program closed or broke its own output
            pass
    os.write(status_fd, json.dumps({"status": status, "detail": detail}).encode("utf-8"))
    os.close(status_fd)


if __name__ == "__main__":
    main()
