"""Atomic outputs: published whole or not at all, old outputs kept until the new one is complete, leftovers
of dead processes cleaned (and a replaced output put back when the kill came between the two renames)."""
from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mftcoder_coba import atomic
from mftcoder_coba.atomic import (
    atomic_directory,
    atomic_file,
    atomic_write_bytes,
    atomic_write_text,
    discard,
    publish,
    remove_stale,
)
from mftcoder_coba.errors import UserError


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _hidden(dest: Path, kind: str, pid: int, host: str = atomic._HOST) -> Path:
    return dest.with_name(f".{dest.name}.{kind}-{host}-{pid}-0123abcd")


def test_directory_is_published_whole_and_the_temporary_is_a_hidden_sibling(tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "out"
    with atomic_directory(dest) as temp:
        assert temp.parent == dest.parent and temp.name.startswith(".out.tmp-") and _listing(temp) == []
        (temp / "a.txt").write_text("new")
        assert not dest.exists()          # nothing under the real name while the work is going on
    assert (dest / "a.txt").read_text() == "new"
    assert _listing(dest.parent) == ["out"]
    assert stat.S_IMODE(dest.stat().st_mode) == 0o777 & ~_umask()   # not mkdtemp's private 0700


def test_failure_leaves_nothing_and_keeps_an_old_output(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(dest) as temp:
            (temp / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert _listing(tmp_path) == []
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(dest, overwrite=True) as temp:
            (temp / "half.txt").write_text("half")
            raise KeyboardInterrupt
    assert _listing(tmp_path) == ["out"] and _listing(dest) == ["old.txt"]


def test_overwrite_keeps_the_old_output_until_the_new_one_is_complete(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with atomic_directory(dest, overwrite=True) as temp:
        (temp / "new.txt").write_text("new")
        assert _listing(dest) == ["old.txt"]
    assert _listing(dest) == ["new.txt"] and _listing(tmp_path) == ["out"]
    file_dest = tmp_path / "file-out"                  # a file is replaced by a directory as well
    file_dest.write_text("old")
    with atomic_directory(file_dest, overwrite=True) as temp:
        (temp / "x").write_text("x")
    assert _listing(file_dest) == ["x"] and _listing(tmp_path) == ["file-out", "out"]


def test_an_existing_output_is_refused_with_its_path_unless_overwrite(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(UserError, match=f"^{re.escape(str(dest))}: already exists; pass --overwrite to replace it$"):
        with atomic_directory(dest):
            raise AssertionError("the body must not run")
    with pytest.raises(UserError, match=f"^{re.escape(str(dest))}: already exists; choose a new output directory$"):
        with atomic_directory(dest, hint=atomic.NEW_DIRECTORY_HINT):
            pass
    assert _listing(tmp_path) == ["out"]
    late = tmp_path / "late"          # appeared while the work was going on: refused at publishing time
    with pytest.raises(UserError, match=f"^{re.escape(str(late))}: already exists"):
        with atomic_directory(late) as temp:
            (temp / "new.txt").write_text("new")
            late.mkdir()
            (late / "theirs.txt").write_text("theirs")
    assert _listing(late) == ["theirs.txt"] and _listing(tmp_path) == ["late", "out"]


def test_leftovers_of_dead_processes_are_cleaned_and_others_kept(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dead = _dead_pid()
    stale = _hidden(dest, "tmp", dead)
    (stale / "train").mkdir(parents=True)
    mine = _hidden(dest, "tmp", os.getpid())          # a live process (this one) may still be writing it
    mine.mkdir()
    remote = _hidden(dest, "tmp", dead, host="another.node")   # pids of other hosts say nothing here
    remote.mkdir()
    other = _hidden(tmp_path / "other", "tmp", dead)   # another destination's: left to its own writer
    other.mkdir()
    stale_file = _hidden(tmp_path / "plot.png", "tmp", dead)
    stale_file.write_text("half")
    with atomic_directory(dest) as temp:
        (temp / "a").write_text("a")
    assert _listing(tmp_path) == sorted(["out", mine.name, remote.name, other.name, stale_file.name])
    atomic_write_text(tmp_path / "plot.png", "png")
    assert not stale_file.exists()
    remove_stale(tmp_path)                             # the whole folder: every destination's leftovers
    assert _listing(tmp_path) == sorted(["out", "plot.png", mine.name, remote.name])


def test_a_kill_between_the_two_renames_puts_the_old_output_back(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    old = _hidden(dest, "old", _dead_pid())
    old.mkdir()
    (old / "old.txt").write_text("old")
    half_new = _hidden(dest, "tmp", _dead_pid())
    half_new.mkdir()
    remove_stale(tmp_path, "out")
    assert _listing(tmp_path) == ["out"] and (dest / "old.txt").read_text() == "old"
    replaced = _hidden(dest, "old", _dead_pid())    # killed after the new one was in place: the old one goes
    replaced.mkdir()
    remove_stale(tmp_path)
    assert _listing(tmp_path) == ["out"] and _listing(dest) == ["old.txt"]


def test_a_killed_writer_leaves_no_output_and_the_next_run_cleans_up(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    started = tmp_path / "started"
    code = ("import time; from mftcoder_coba.atomic import atomic_directory\n"
            f"with atomic_directory({str(dest)!r}) as temp:\n"
            "    (temp / 'part').write_text('half')\n"
            f"    open({str(started)!r}, 'w').close()\n"
            "    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 30
        while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert started.exists(), "the writer did not start"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    started.unlink()
    assert not dest.exists() and [p.name.startswith(".out.tmp-") for p in tmp_path.iterdir()] == [True]
    with atomic_directory(dest) as temp:
        (temp / "whole").write_text("whole")
    assert _listing(tmp_path) == ["out"] and _listing(dest) == ["whole"]


def test_publish_and_discard(tmp_path: Path) -> None:
    dest = tmp_path / "step-00000002"
    temp = tmp_path / ".tmp-step-00000002"             # a caller-chosen name (checkpoints: agreed by all ranks)
    temp.mkdir()
    (temp / "new").write_text("new")
    publish(temp, dest, overwrite=False)
    assert _listing(tmp_path) == ["step-00000002"]
    temp.mkdir()
    with pytest.raises(UserError, match=f"^{re.escape(str(dest))}: already exists"):
        publish(temp, dest, overwrite=False)
    (temp / "newer").write_text("newer")
    publish(temp, dest, overwrite=True)
    assert _listing(tmp_path) == ["step-00000002"] and _listing(dest) == ["newer"]
    discard(dest)
    (tmp_path / "f.txt").write_text("f")
    discard(tmp_path / "f.txt")
    assert _listing(tmp_path) == []


def test_single_files_are_replaced_in_one_rename(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "metrics.jsonl"
    atomic_write_text(path, "één\n")
    assert path.read_text(encoding="utf-8") == "één\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()   # not mkstemp's private 0600
    atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    with pytest.raises(RuntimeError):
        with atomic_file(path) as temp:
            temp.write_bytes(b"half")
            assert path.read_bytes() == b"\x00\x01"
            raise RuntimeError
    assert path.read_bytes() == b"\x00\x01" and _listing(path.parent) == ["metrics.jsonl"]
    with atomic_file(tmp_path / "plot.png") as temp:   # for writers that want a file name (savefig)
        assert temp.name.startswith(".plot.png.tmp-") and temp.exists()
        temp.write_bytes(b"png")
    assert (tmp_path / "plot.png").read_bytes() == b"png"
    assert _listing(tmp_path) == ["deep", "plot.png"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- check_replaceable: what --overwrite may replace ----------------------------------------------------------

def _run_dir(path: Path) -> Path:
    (path / "checkpoints").mkdir(parents=True)
    (path / "config.yaml").write_text("{}\n")
    return path


def test_check_replaceable_allows_new_and_own_outputs(tmp_path: Path) -> None:
    from mftcoder_coba.atomic import check_replaceable, mark_output

    check_replaceable(tmp_path / "new", overwrite=False, kind="export")  # absent: fine
    own = tmp_path / "own"
    own.mkdir()
    mark_output(own, "export")
    check_replaceable(own, overwrite=True, kind="export")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    check_replaceable(legacy, overwrite=True, kind="export", owned=lambda d: d == legacy)


@pytest.mark.parametrize("case, message", [
    ("exists_no_overwrite", "already exists"),
    ("other_kind", "not this tool's export output"),
    ("unmarked", "no .mftcoder-coba-output marker"),
    ("a_file", "not a directory this tool wrote"),
    ("inside_run", "lies inside the run directory"),
    ("is_run", "is the run directory"),
    ("holds_run", "holds a run directory"),
    ("holds_input", "is, holds or lies inside the input"),
    ("inside_input", "is, holds or lies inside the input"),
])
def test_check_replaceable_refuses_what_is_not_its_own(tmp_path: Path, case: str, message: str) -> None:
    from mftcoder_coba.atomic import check_replaceable, mark_output

    dest, inputs, overwrite = tmp_path / "out", [], True
    if case == "exists_no_overwrite":
        dest.mkdir()
        mark_output(dest, "export")
        overwrite = False
    elif case == "other_kind":
        dest.mkdir()
        mark_output(dest, "prepared-data")
    elif case == "unmarked":
        dest.mkdir()
        (dest / "notes.txt").write_text("mine\n")
    elif case == "a_file":
        dest.write_text("x")
    elif case == "inside_run":
        dest = _run_dir(tmp_path / "run") / "checkpoints"
    elif case == "is_run":
        dest = _run_dir(tmp_path / "run")
    elif case == "holds_run":
        dest.mkdir()
        mark_output(dest, "export")
        _run_dir(dest / "run")
    elif case == "holds_input":
        (dest / "data").mkdir(parents=True)
        inputs = [dest / "data" / "a.jsonl"]
    elif case == "inside_input":
        inputs = [tmp_path]
    with pytest.raises(UserError, match=message):
        check_replaceable(dest, overwrite=overwrite, kind="export", inputs=inputs)
