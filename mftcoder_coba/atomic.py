"""Outputs that appear whole or not at all: write beside the destination, rename into place when complete.

Why: prep, export, fuse, ColD Fusion, checkpoints and plots all write outputs that later steps trust on sight
(a prepared split with a manifest, a model directory with a config, a checkpoint named ``step-N``). A run that
is killed, crashes or fails on bad input half way must never leave something that looks complete, and a
failed ``--overwrite`` must leave the previous output untouched. So everything is written under a hidden
name in the destination's own folder (same filesystem, so ``os.replace`` is a single rename) and renamed
into place only when complete; an existing destination is moved aside only once the new one is whole.

Hidden names are ``.<name>.tmp-<host>-<pid>-<tag>`` (work in progress) and ``.<name>.old-<host>-<pid>-<tag>``
(a replaced output while the new one is being put in place). A later write to the same destination removes
those whose process is gone (checked on this host only: on a shared filesystem another node's pid says
nothing here), and puts back an ``.old-`` output when the kill came between its two renames. This is about
processes that die, not power loss: nothing is fsynced.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from mftcoder_coba.errors import UserError

OVERWRITE_HINT = "pass --overwrite to replace it"
"""Default end of the refusal message, for commands with an ``--overwrite`` flag."""
NEW_DIRECTORY_HINT = "choose a new output directory"
"""End of the refusal message for outputs that are never replaced."""

_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
_HIDDEN = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-[0-9a-f]{8}$")


def refuse_existing(dest: str | Path, *, overwrite: bool, hint: str = OVERWRITE_HINT) -> None:
    """Raise :class:`UserError` naming ``dest`` when it exists and may not be replaced.

    Call it early, before the expensive work, so a refused run fails in a second; :func:`publish` checks
    again at the end in case the destination appeared meanwhile.
    """
    if not overwrite and os.path.lexists(dest):
        raise UserError(f"{dest}: already exists; {hint}")


OUTPUT_MARKER = ".mftcoder-coba-output"
"""File inside every directory a command made and may later replace; it holds the kind of output."""
RUN_MARKERS = ("checkpoints", "metrics.jsonl")
"""Entries that, beside a ``config.yaml``, make a directory a run directory (also those made before markers)."""


def mark_output(directory: str | Path, kind: str) -> None:
    """Record in ``directory`` (a finished or staged output) that it is a ``kind`` output of this tool."""
    (Path(directory) / OUTPUT_MARKER).write_text(f"{kind}\n", encoding="utf-8")


def output_kind(directory: str | Path) -> str | None:
    """The kind :func:`mark_output` recorded in ``directory``, or None for anything else."""
    marker = Path(directory) / OUTPUT_MARKER
    try:
        return marker.read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def is_run_dir(path: str | Path) -> bool:
    """A training run directory: marked as one, or a ``config.yaml`` beside checkpoints or metrics."""
    path = Path(path)
    if output_kind(path) == "run":
        return True
    return (path / "config.yaml").is_file() and any((path / name).exists() for name in RUN_MARKERS)


def enclosing_run_dir(path: str | Path) -> Path | None:
    """The run directory that is ``path`` or holds it (the nearest), or None."""
    path = Path(os.path.abspath(path))
    for candidate in (path, *path.parents):
        if is_run_dir(candidate):
            return candidate
    return None


def check_replaceable(dest: str | Path, *, overwrite: bool, kind: str, inputs: Iterable[str | Path] = (),
                      owned: Callable[[Path], bool] | None = None, hint: str = OVERWRITE_HINT) -> None:
    """Refuse, with one :class:`UserError` line naming ``dest``, any output destination that is not safe.

    Why: ``--overwrite`` used to delete whatever stood at ``dest`` (a folder holding the command's own input
    files and a user's notes, or a run's ``checkpoints/``). Now a command only ever replaces a folder it can
    recognise as its own kind of output, and never writes inside or around its inputs or a run directory:

    - ``dest`` must not be one of ``inputs``, lie inside one, or hold one;
    - ``dest`` must not be a run directory, lie inside one, or (when it exists) hold one, unless ``kind`` is
      ``run`` itself;
    - an existing ``dest`` is replaced only with ``overwrite`` and only when it is a directory marked with
      the same ``kind`` (:func:`mark_output`) or that ``owned(dest)`` recognises (outputs made before
      markers existed).
    """
    dest = Path(os.path.abspath(dest))
    if kind != "run":
        run = enclosing_run_dir(dest)
        if run is not None:
            where = "is the run directory" if run == dest else f"lies inside the run directory {run}"
            raise UserError(f"{dest}: {where}; choose an output directory outside it")
    for item in inputs:
        source = Path(os.path.abspath(item))
        if dest == source or source in dest.parents or dest in source.parents:
            raise UserError(f"{dest}: is, holds or lies inside the input {source}; choose another output directory")
    if not os.path.lexists(dest):
        return
    refuse_existing(dest, overwrite=overwrite, hint=hint)
    if not dest.is_dir() or dest.is_symlink():
        raise UserError(f"{dest}: exists and is not a directory this tool wrote; --overwrite replaces only its own "
                        f"{kind} outputs")
    if kind != "run" and any(is_run_dir(child) for child in dest.iterdir() if child.is_dir()):
        raise UserError(f"{dest}: holds a run directory; --overwrite never replaces one")
    if output_kind(dest) != kind and not (owned is not None and owned(dest)):
        raise UserError(f"{dest}: exists and is not this tool's {kind} output (no {OUTPUT_MARKER} marker of that "
                        f"kind); --overwrite replaces only its own {kind} outputs: choose another output directory")


def make_temp_dir(dest: str | Path) -> Path:
    """A fresh hidden directory beside ``dest`` (its folder created if needed), after removing the leftovers
    of dead processes that wrote to ``dest``."""
    temp = _fresh_temp(Path(dest))
    temp.mkdir()
    return temp


def publish(temp: str | Path, dest: str | Path, *, overwrite: bool, hint: str = OVERWRITE_HINT) -> None:
    """Rename the finished ``temp`` (directory or file) to ``dest``.

    An existing ``dest`` is refused unless ``overwrite``; with it, the old output is renamed aside, the new
    one renamed in, and only then is the old one deleted, so at every moment either the old or the new
    output is complete (a kill between the two renames is repaired by the next :func:`remove_stale`).
    """
    temp, dest = Path(temp), Path(dest)
    if not os.path.lexists(dest):
        os.replace(temp, dest)
        return
    refuse_existing(dest, overwrite=overwrite, hint=hint)
    old = _hidden(dest, "old")
    os.replace(dest, old)
    os.replace(temp, dest)
    _remove(old, trash=_hidden(dest, "tmp"))


def remove_stale(folder: str | Path, name: str | None = None) -> None:
    """Clean hidden leftovers in ``folder`` (of destination ``name`` only, when given) of dead processes on
    this host: work in progress is deleted; a replaced output whose destination is missing is put back."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for entry in sorted(folder.iterdir()):
        found = _HIDDEN.match(entry.name)
        if (found is None or (name is not None and found["name"] != name) or found["host"] != _HOST
                or _alive(int(found["pid"]))):
            continue
        dest = folder / found["name"]
        with contextlib.suppress(FileNotFoundError):  # another process cleaned it first
            if found["kind"] == "old" and not os.path.lexists(dest):
                os.replace(entry, dest)
            else:
                _remove(entry, trash=_hidden(dest, "tmp") if found["kind"] == "old" else None)


@contextlib.contextmanager
def atomic_directory(dest: str | Path, *, overwrite: bool = False, hint: str = OVERWRITE_HINT) -> Iterator[Path]:
    """Yield an empty hidden directory to fill; on normal exit it becomes ``dest``, on any error it is removed.

    ``dest`` existing is refused (:class:`UserError` naming it) unless ``overwrite``; the old one is replaced
    only after the new one is complete (:func:`publish`).
    """
    dest = Path(dest)
    refuse_existing(dest, overwrite=overwrite, hint=hint)
    temp = make_temp_dir(dest)
    try:
        yield temp
        publish(temp, dest, overwrite=overwrite, hint=hint)
    finally:
        if os.path.lexists(temp):
            _remove(temp)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a hidden path beside ``path`` for a writer that wants a file name (``savefig``); on normal exit it
    replaces ``path``, on any error it is removed. The file gets the usual permissions (umask), not 0600."""
    path = Path(path)
    temp = _fresh_temp(path)
    os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield temp
        os.replace(temp, path)
    finally:
        if os.path.lexists(temp):
            temp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace the file ``path`` with ``data`` in one rename: readers see the old or the new content."""
    with atomic_file(path) as temp:
        temp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Replace the file ``path`` with ``text`` in one rename: readers see the old or the new content."""
    atomic_write_bytes(path, text.encode(encoding))


def discard(path: str | Path) -> None:
    """Delete a file or folder so that it vanishes in one step for readers: it is renamed to a hidden
    work-in-progress name first, so a deletion killed half way leaves only that (see :func:`remove_stale`),
    never a half-deleted output under its real name."""
    path = Path(path)
    _remove(path, trash=_hidden(path, "tmp"))


def _fresh_temp(dest: Path) -> Path:
    """The work-in-progress name for a new write to ``dest``, once its folder exists and is cleaned."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(dest.parent, dest.name)
    return _hidden(dest, "tmp")


def _hidden(dest: Path, kind: str) -> Path:
    return dest.with_name(f".{dest.name}.{kind}-{_HOST}-{os.getpid()}-{os.urandom(4).hex()}")


def _remove(path: Path, trash: Path | None = None) -> None:
    """Delete a file or folder. ``trash``: first rename it there, so an ``.old-`` name only ever holds a
    complete output even if this deletion is killed half way."""
    if trash is not None:
        os.replace(path, trash)
        path = trash
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
