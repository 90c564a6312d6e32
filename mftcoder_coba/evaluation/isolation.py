"""The isolation boundary of ``--sandbox isolated``: Linux namespaces entered by the sandboxed interpreter itself.

Why this engine: unprivileged user namespaces are what the kernel offers without root, Docker or a setuid helper,
and they are on by default on the distributions GPU nodes run. bubblewrap builds the same boundary from the same
system calls, but it is a separate package a training machine (and CI) usually lacks; a pure-Python path through
``ctypes`` (Python 3.11 has no ``os.unshare``) works wherever the kernel allows it and costs one ``fork`` more per
sample than the guards, so it is the one engine here. Landlock and seccomp would add little on top: the
filesystem is already read-only and hidden, and the network is gone.

What :func:`enter` builds before the program runs (called by ``sandbox_child.py``, which loads this file by path:
it imports nothing of the package):

- a process that starts as root first becomes ``nobody`` (65534): RLIMIT_NPROC, which stops fork bombs, does not
  apply to root, and root could read every file below;
- new user, mount, network, PID, IPC and UTS namespaces: no network interface but a down loopback (no TCP, not even
  to 127.0.0.1), no view of the host's processes (nothing to read in ``/proc/<pid>/environ``, nothing to signal);
- the sample's processes live in the PID namespace whose first process (a small init) dies when the sample ends,
  and the kernel then kills everything left in it: a ``setsid`` child started through ``ctypes`` included;
- the whole filesystem read-only (``mount_setattr``, recursive), with empty read-only ``tmpfs`` over the places
  that hold users' and other samples' data (``/home``, ``/root``, ``$HOME``, the harness's working directory,
  ``/tmp``, ``/var/tmp``, ``/run``, ``/mnt``, ``/media``, and what the harness adds); the interpreter's own
  library folders (``sys.path``) are bound back read-only where they lie below one of those; a ``/dev`` with
  only null, zero, full, random and urandom (no GPU, disk or terminal, no ``/dev/shm``);
- the scratch directory (the sample's working directory and ``HOME``) is a fresh ``tmpfs`` of ``scratch_bytes``:
  filling it fills only that, and it vanishes with the namespace;
- a fresh ``/proc`` of the PID namespace (an empty ``tmpfs`` where the kernel refuses one);
- no capabilities and ``no_new_privs`` in every process that runs sample code.

It stops sample code from reaching data, the network and other processes through the system-call interface. It
does not stop an exploit of a kernel bug: for that, run in a VM.
"""
import ctypes
import os
import sys
from collections.abc import Callable
from typing import NoReturn

_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
_CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_BIND, _MS_REC, _MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV = 1, 2, 4
_AT_FDCWD, _AT_RECURSIVE = -100, 0x8000
_SYS_MOUNT_SETATTR = 442  # the same number on every architecture since Linux 5.12
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_SET_NO_NEW_PRIVS = 1, 4, 38
_NOBODY = 65534
_DEVICES = ("null", "zero", "full", "random", "urandom")
"""The device nodes a sample sees in its /dev (no GPU, disk or terminal device, no /dev/shm)."""
ALWAYS_HIDDEN = ("/home", "/root", "/tmp", "/var/tmp", "/run", "/mnt", "/media")
"""Folders replaced by an empty read-only tmpfs in every isolated sample (besides $HOME and the run directory)."""


class SetupError(OSError):
    """The kernel refused a step of the boundary (the message names which)."""


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise SetupError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(),
                       ctypes.c_ulong(flags), data and data.encode()), f"mount {fstype or source} on {target}")


def _set_attr(path: str, attributes: int, recursive: bool, clear: int = 0) -> None:
    attr = _MountAttr(attributes, clear, 0, 0)
    _check(_libc.syscall(_SYS_MOUNT_SETATTR, _AT_FDCWD, path.encode(), _AT_RECURSIVE if recursive else 0,
                         ctypes.byref(attr), ctypes.sizeof(attr)), f"mount_setattr {path}")


def _write(path: str, text: str) -> None:
    try:
        with open(path, "w") as handle:
            handle.write(text)
    except OSError as exc:
        raise SetupError(exc.errno, f"write {path}: {exc.strerror}") from None


def _below(path: str, folder: str) -> bool:
    return folder == "/" or path == folder or path.startswith(folder.rstrip("/") + "/")


def _tmpfs(target: str, size: int) -> None:
    _mount("tmpfs", target, "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={size},mode=0755")


def _drop_privileges() -> None:
    """No capabilities in this process and its children, and none regained through exec (setuid files)."""
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(_CapHeader(0x20080522, 0)), data), "capset")


def _hide(scratch: str, hidden: list[str]) -> None:
    """The read-only view: everything read-only, the hidden folders empty but for the interpreter's library
    folders (bound back) and a mount point for the scratch tmpfs."""
    kept = [(os.path.realpath(p), os.open(p, os.O_PATH | os.O_DIRECTORY)) for p in sys.path if os.path.isdir(p)]
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    _set_attr("/", _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV, recursive=True)
    _set_attr("/proc", 0, recursive=False, clear=_MOUNT_ATTR_RDONLY)  # the id maps are written there; replaced later
    devices = [(name, os.open(f"/dev/{name}", os.O_PATH)) for name in _DEVICES]
    _tmpfs("/dev", 1 << 16)
    for name, fd in devices:
        open(f"/dev/{name}", "w").close()
        _mount(f"/proc/self/fd/{fd}", f"/dev/{name}", None, _MS_BIND)
        _set_attr(f"/dev/{name}", _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, recursive=False, clear=_MOUNT_ATTR_NODEV)
        os.close(fd)
    _set_attr("/dev", _MOUNT_ATTR_RDONLY, recursive=False)
    covered: list[str] = []
    for folder in sorted({os.path.realpath(p) for p in hidden}, key=len):
        if folder == "/" or not os.path.isdir(folder) or any(_below(folder, c) for c in covered):
            continue
        _tmpfs(folder, 1 << 20)
        covered.append(folder)
    for path, fd in kept:
        if any(_below(path, c) for c in covered):
            os.makedirs(path, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", path, None, _MS_BIND | _MS_REC)
            _set_attr(path, _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV, recursive=True)
        os.close(fd)
    os.makedirs(scratch, exist_ok=True)
    for folder in covered:
        _set_attr(folder, _MOUNT_ATTR_RDONLY, recursive=False)


def _own_namespaces(flags: int) -> None:
    uid, gid = os.geteuid(), os.getegid()
    _check(_libc.unshare(_CLONE_NEWUSER | flags), "unshare(user namespace)")
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")


def _in_pid_namespace(scratch: str, scratch_bytes: int) -> None:
    """The init's part: its own /proc, the scratch tmpfs, then no privileges."""
    try:
        _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    except SetupError:  # a container's /proc with masked paths: the kernel refuses a new one; hide it instead
        _tmpfs("/proc", 4096)
        _set_attr("/proc", _MOUNT_ATTR_RDONLY, recursive=False)
    _tmpfs(scratch, scratch_bytes)
    os.chdir(scratch)
    _drop_privileges()


def _wait_for(pid: int) -> int:
    """Reap every child (orphans of the sample come to the init) until ``pid`` ends; its wait status."""
    while True:
        done, status = os.waitpid(-1, 0)
        if done == pid:
            return status


def _relay(status: int) -> None:
    """End this process the way the waited-for one ended (exit status or signal)."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        import signal

        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1)


def enter(scratch: str, hidden: list[str], scratch_bytes: int, fail: Callable[[str], NoReturn]) -> None:
    """Put this process's future (the program) behind the boundary; returns in the process that runs the program,
    with ``scratch`` as its empty working directory. ``fail(message)`` reports a refused step and ends the process.

    Three processes: this one stays outside and ends as the sample ended; its child is the PID namespace's init,
    which builds the filesystem and waits; the init's child runs the program.
    """
    try:
        if os.geteuid() == 0:  # build the view as root, then run everything else as nobody
            _check(_libc.unshare(_CLONE_NEWNS), "unshare(mount namespace)")
            _hide(scratch, hidden)
            os.setgroups([])
            os.setresgid(_NOBODY, _NOBODY, _NOBODY)
            os.setresuid(_NOBODY, _NOBODY, _NOBODY)
            _check(_libc.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0), "prctl(DUMPABLE)")  # own /proc/self again
        else:
            _own_namespaces(_CLONE_NEWNS)
            _hide(scratch, hidden)
        # a further user and mount namespace locks the view: no process below can unmount a hiding tmpfs
        _own_namespaces(_CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID | _CLONE_NEWIPC | _CLONE_NEWUTS)
    except OSError as exc:
        fail(str(exc))
    read_end, write_end = os.pipe()
    init = os.fork()
    if init:  # outside: wait for the init, then end as the sample did
        os.close(write_end)
        reported = os.read(read_end, 32)
        os.waitpid(init, 0)
        if not reported:  # the init failed (and said why) or was killed
            os._exit(70)
        _relay(int(reported))
    os.close(read_end)
    try:
        _check(_libc.prctl(_PR_SET_PDEATHSIG, 9, 0, 0, 0), "prctl(PDEATHSIG)")
        _in_pid_namespace(scratch, scratch_bytes)
        _check(_libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(DUMPABLE)")  # the sample cannot ptrace the init
    except OSError as exc:
        fail(str(exc))
    sample = os.fork()
    if sample:  # the init: when it ends, the kernel kills whatever the sample left in the namespace
        os.write(write_end, str(_wait_for(sample)).encode())
        os._exit(0)
    os.close(write_end)
    _check(_libc.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0), "prctl(DUMPABLE)")
