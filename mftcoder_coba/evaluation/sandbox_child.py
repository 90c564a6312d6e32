"""The first code of a sandboxed interpreter: lower the limits, run the program, report how it ended.

Started by :func:`mftcoder_coba.evaluation.sandbox.run_program` as ``python -I sandbox_child.py STATUS_FD
LIMITS_JSON PROGRAM``. It imports nothing of this package but ``isolation.py`` beside it (imported from this folder, for
``--sandbox isolated``: the namespaces, see there) and runs before the untrusted program, so the program starts
behind the boundary and with the limits already in place:

- RLIMIT_CPU (CPU seconds, then SIGXCPU), RLIMIT_AS (address space: allocations beyond it raise
  MemoryError), RLIMIT_FSIZE (largest file it may write), RLIMIT_CORE 0, and RLIMIT_NPROC 0 (no new
  process or thread; the kernel does not apply this one to root);
- process creation through Python (``os.fork``, ``os.system``, ``os.exec*``/``spawn*``, ``subprocess``)
  raises :class:`SandboxViolation`, which also stops fork bombs where RLIMIT_NPROC does not apply.

How the program ended goes to STATUS_FD as one JSON object ``{"status", "detail", "token"}``; a process that
never writes it exited or was killed before its tests finished. The token is a secret the harness sends through
TOKEN_FD (read and closed before the program starts), so a line a program writes to STATUS_FD itself is not taken
for a report. It is a secret from the program's output, not from its interpreter: code that digs through the
frames of this process can find it, and can undo the Python guards (``ctypes``); only the namespaces of
``isolation.py`` hold against that.
"""
import _posixsubprocess
import json
import os
import resource
import subprocess  # imported here, before an isolated sandbox forks: not once more in every sample
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


def _isolate(status_fd: int, token: str, limits: dict, source: str, program: str) -> None:
    """Enter the namespaces (the program's process returns), then put the program into the fresh scratch folder."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # not importlib.util: 15 ms more per sample
    try:
        import isolation
    finally:
        del sys.path[0]

    def fail(message: str) -> None:
        os.write(status_fd, json.dumps({"status": "setup", "detail": message, "token": token}).encode("utf-8"))
        os._exit(70)

    isolation.enter(os.getcwd(), [*isolation.ALWAYS_HIDDEN, *limits["hidden"]], int(limits["scratch_bytes"]), fail)
    with open(program, "w", encoding="utf-8") as handle:
        handle.write(source)


def main() -> None:
    status_fd, limits, program = int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    token = os.read(int(limits["token_fd"]), 256).decode("ascii")
    os.close(int(limits["token_fd"]))
    with open(program, encoding="utf-8") as handle:
        source = handle.read()
    del handle
    if limits["isolated"]:
        _isolate(status_fd, token, limits, source, program)
    _set_limit(resource.RLIMIT_CPU, int(limits["cpu_seconds"]))
    _set_limit(resource.RLIMIT_AS, int(limits["memory_bytes"]))
    _set_limit(resource.RLIMIT_FSIZE, int(limits["file_bytes"]))
    _set_limit(resource.RLIMIT_CORE, 0)
    _set_limit(resource.RLIMIT_NPROC, 0)
    _guard_process_creation()
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
    os.write(status_fd, json.dumps({"status": status, "detail": detail, "token": token}).encode("utf-8"))
    os.close(status_fd)
    os._exit(0)  # the report is out: no interpreter shutdown (in a forked sample it copies the whole heap)


if __name__ == "__main__":
    main()
