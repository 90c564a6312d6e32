"""prep never loses data and never stays silent: what --overwrite may replace, tasks the trainer could not
use, workers that outlive a killed prep, and a killed prep's leftovers."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from mftcoder_coba.atomic import OUTPUT_MARKER, output_kind
from mftcoder_coba.data_prep.pipeline import NO_HELD_OUT, OUTPUT_KIND, PrepOptions, prepare
from mftcoder_coba.data_prep.report import print_tables
from mftcoder_coba.demo_data import DEMO_TASKS, TOKENIZER_DIR
from mftcoder_coba.errors import UserError

GOOD = [json.dumps({"prompt": f"q{i}", "answer": f"a{i}"}) for i in range(8)]


def _write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _opts(tasks, out, **kw) -> PrepOptions:
    kw.setdefault("seq_len", 64)
    return PrepOptions(tasks=tasks, tokenizer=TOKENIZER_DIR, out=out, progress=False, **kw)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mftcoder_coba", "--log-level", "WARNING", *args],
                          capture_output=True, text=True, timeout=300)


def _entries(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_never_replaces_a_folder_holding_the_input_or_notes(tmp_path):
    folder = tmp_path / "work"
    data = _write(folder / "x.jsonl", GOOD)
    (folder / "notes.txt").write_text("a week of notes")
    before = _entries(folder)
    result = _cli("prep", "--task", f"t={data}", "--tokenizer", str(TOKENIZER_DIR), "--seq-len", "64",
                  "--out", str(folder), "--overwrite")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert f"holds or lies inside the input {data}" in result.stderr
    elsewhere = _write(tmp_path / "y.jsonl", GOOD)
    with pytest.raises(UserError, match="is not this tool's prepared-data output"):
        prepare(_opts({"t": elsewhere}, folder, overwrite=True))  # the notes alone are reason enough
    with pytest.raises(UserError, match="holds or lies inside the input"):
        prepare(_opts({"t": folder}, folder / "prepared"))  # inside an input directory: read back as input
    assert _entries(folder) == before and sorted(p.name for p in tmp_path.iterdir()) == ["work", "y.jsonl"]


def test_overwrite_replaces_a_prep_output_also_one_made_before_markers(tmp_path):
    data = _write(tmp_path / "x.jsonl", GOOD)
    out = tmp_path / "out"
    prepare(_opts({"t": data}, out))
    assert output_kind(out) == OUTPUT_KIND
    (out / OUTPUT_MARKER).unlink()  # as prep wrote it before outputs were marked
    prepare(_opts({"t": data}, out, seq_len=32, overwrite=True))
    assert json.loads((out / "train" / "manifest.json").read_text())["seq_len"] == 32
    assert output_kind(out) == OUTPUT_KIND
    (out / "notes.txt").write_text("mine")  # a prep output holding a user's files: they would go with it
    (out / "train" / "plot.png").write_text("mine too")
    with pytest.raises(UserError, match=r"out: holds notes\.txt, train/plot\.png, which prep did not write"):
        prepare(_opts({"t": data}, out, overwrite=True))
    assert (out / "notes.txt").read_text() == "mine" and (out / "train" / "plot.png").is_file()
    (out / "notes.txt").unlink()
    (out / "train" / "plot.png").unlink()
    (out / OUTPUT_MARKER).write_text("exported-model\n")  # another command's output is not prep's to replace
    (out / "train" / "manifest.json").write_text("{}")
    with pytest.raises(UserError, match="is not this tool's prepared-data output"):
        prepare(_opts({"t": data}, out, overwrite=True))


def test_out_inside_a_run_directory_is_refused(tmp_path):
    data = _write(tmp_path / "x.jsonl", GOOD)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n")
    with pytest.raises(UserError, match="lies inside the run directory"):
        prepare(_opts({"t": data}, run / "prepared"))
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml"]


@pytest.mark.parametrize("kwargs,lines,why", [
    (dict(skip_bad=True), ['{"prompt": "q"}'] * 6, r"6 skipped \(missing_field=6\)"),
    (dict(overlong="drop", valid_samples_per_task=1), [json.dumps({"text": "word " * 200})] * 4,
     r"0 of its 4 records held out, 4 dropped \(overlong=4\)"),  # none usable: none held out
])
def test_a_task_without_training_rows_is_refused_and_nothing_written(tmp_path, kwargs, lines, why):
    good = _write(tmp_path / "good.jsonl", GOOD)
    bad = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(UserError, match=rf"^task 'b': 0 training rows: .*{why}; nothing written$"):
        prepare(_opts({"a": good, "b": bad}, tmp_path / "out", **kwargs))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.jsonl"]


def test_a_task_without_held_out_rows_is_warned_about_in_log_and_table(tmp_path, caplog, capsys):
    good = _write(tmp_path / "good.jsonl", GOOD)
    one = _write(tmp_path / "one.jsonl", GOOD[:1])  # a single record: nothing to hold out
    with caplog.at_level(logging.WARNING):
        prepare(_opts({"a": good, "b": one}, tmp_path / "out"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"task 'b': {NO_HELD_OUT} (0 of its 1 records held out)"]
    print_tables(tmp_path / "out")
    printed = capsys.readouterr().out
    valid = printed[printed.index("/valid:"):]
    assert "\nb (!) " in valid and f"(!) task 'b': {NO_HELD_OUT}" in valid
    assert "(!)" not in printed[:printed.index("/valid:")] and "a (!)" not in valid


@pytest.mark.slow
def test_workers_die_with_a_killed_prep(tmp_path):
    big = tmp_path / "big.jsonl"
    big.write_text("\n".join(DEMO_TASKS["code_completion"].read_text().splitlines() * 20) + "\n")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "mftcoder_coba", "--log-level", "WARNING", "prep", "--task",
                             f"t={big}", "--tokenizer", str(TOKENIZER_DIR), "--seq-len", "128", "--workers", "2",
                             "--rows-per-shard", "4", "--out", str(out)], start_new_session=True)
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:  # mid-run: workers up, shards being written
            if len(list(tmp_path.glob(".out.tmp-*/train/shard-*.bin"))) >= 3:
                children = psutil.Process(proc.pid).children(recursive=True)
                break
            time.sleep(0.05)
        assert proc.poll() is None, "prep finished before it could be killed"
        assert len(children) >= 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"still running after prep was killed: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
        for child in children:
            if child.is_running():
                child.kill()


@pytest.mark.slow
def test_watchdog_ends_a_worker_whose_parent_died_where_prctl_is_missing():
    # The fallback of systems without PR_SET_PDEATHSIG: a parent starts a child that only runs the watchdog.
    watched = ("import sys; from mftcoder_coba.data_prep.pipeline import _watch_parent; "
               "_watch_parent(int(sys.argv[1]), 0.05)")
    starter = (f"import os, subprocess, sys, time; watched = {watched!r}; "
               "print(subprocess.Popen([sys.executable, '-c', watched, str(os.getpid())]).pid, flush=True); "
               "time.sleep(300)")
    parent = subprocess.Popen([sys.executable, "-c", starter], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    child = psutil.Process(int(parent.stdout.readline()))
    try:
        time.sleep(0.5)
        assert child.is_running() and child.status() != psutil.STATUS_ZOMBIE  # watching, parent alive
        parent.kill()
        parent.wait()
        child.wait(timeout=10)  # raises psutil.TimeoutExpired if it outlives its parent
    finally:
        parent.kill()
        if child.is_running():
            child.kill()


def test_start_removes_any_dead_writers_leftovers_beside_out(tmp_path):
    import re
    import socket

    host = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    data = _write(tmp_path / "in" / "x.jsonl", GOOD)
    root = tmp_path / "outs"
    stale = root / f".earlier.tmp-{host}-{dead.pid}-0badc0de"  # a killed prep to another OUT name
    (stale / "train").mkdir(parents=True)
    (stale / "train" / "shard-00000.bin").write_bytes(b"\0" * 1000)
    live = root / f".other.tmp-{host}-{os.getpid()}-0badc0de"  # a running writer's work: kept
    other_host = root / f".remote.tmp-elsewhere-{dead.pid}-0badc0de"  # another node's: its pid says nothing here
    plain = root / f"earlier.tmp-{host}-{dead.pid}-0badc0de"  # not hidden: not a temporary
    for keep in (live, other_host, plain):
        keep.mkdir()
    (root / ".notes").write_text("mine")
    prepare(_opts({"t": data}, root / "new"))
    assert sorted(p.name for p in root.iterdir()) == sorted([".notes", live.name, other_host.name, plain.name,
                                                             "new"])
