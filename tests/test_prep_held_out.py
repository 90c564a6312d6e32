"""Held-out records are drawn from the records that survive prep, so each task gets the count asked for
(issue 26, item 4); a task with fewer usable records says so in the manifest and under the valid table."""
from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import pytest

from mftcoder_coba.data_prep.pipeline import PrepOptions, prepare
from mftcoder_coba.data_prep.report import print_tables
from mftcoder_coba.demo_data import DEMO_TASKS, TOKENIZER_DIR


def _corpus(tmp_path: Path, per_task: int = 150) -> dict[str, Path]:
    tasks = {}
    for name, path in DEMO_TASKS.items():
        with open(path, encoding="utf-8") as src:
            lines = list(itertools.islice(src, per_task))
        tasks[name] = tmp_path / f"{name}.jsonl"
        tasks[name].write_text("".join(lines), encoding="utf-8")
    return tasks


def _valid(out: Path) -> dict:
    return json.loads((out / "valid" / "manifest.json").read_text())


def _tree_digest(out: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(out)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize(("held_out", "share"),
                         [({"valid_samples_per_task": 20}, None), ({"valid_fraction": 0.1}, 0.1)],
                         ids=["per-task", "fraction"])
def test_overlong_drop_still_holds_out_the_count_asked(tmp_path: Path, held_out: dict, share: float | None) -> None:
    tasks = _corpus(tmp_path)
    train = prepare(PrepOptions(tasks=tasks, tokenizer=TOKENIZER_DIR, seq_len=110, overlong="drop",
                                out=tmp_path / "out", progress=False, **held_out))
    assert train["task_stats"]["unit_tests"]["dropped"]["overlong"] > 50  # most of the task is too long
    valid = _valid(tmp_path / "out")
    for name, path in tasks.items():
        records = len(path.read_text().splitlines())  # unit_tests has 120 records, the others 150
        asked = 20 if share is None else round(share * records)
        assert valid["task_stats"][name]["samples"] == asked and not valid["task_stats"][name]["dropped"], name
    assert "held_out_short" not in valid


def test_a_task_with_too_few_usable_records_is_named_under_the_valid_table(tmp_path: Path, capsys) -> None:
    long_answer = " ".join(f"w{i}" for i in range(200))
    records = [{"prompt": f"q{i}", "answer": long_answer} for i in range(12)]
    records += [{"prompt": f"q{i}", "answer": f"a{i}"} for i in range(3)]  # the only ones that fit
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    prepare(PrepOptions(tasks={"t": data}, tokenizer=TOKENIZER_DIR, seq_len=64, overlong="drop",
                        valid_samples_per_task=5, out=tmp_path / "out", progress=False))
    valid = _valid(tmp_path / "out")
    assert valid["task_stats"]["t"]["samples"] == 2  # one of the three usable records trains
    assert valid["held_out_short"] == {"t": {"asked": 5, "held_out": 2}}
    print_tables(tmp_path / "out")
    assert "task 't': 2 records held out of the 5 asked: the task has only 3 usable records" in capsys.readouterr().out


@pytest.mark.slow
def test_held_out_choice_is_the_same_for_any_workers(tmp_path: Path) -> None:
    tasks = _corpus(tmp_path, per_task=60)
    common = {"tasks": tasks, "tokenizer": TOKENIZER_DIR, "seq_len": 110, "overlong": "drop",
              "valid_samples_per_task": 10, "progress": False, "batch_records": 16}
    prepare(PrepOptions(out=tmp_path / "one", workers=1, **common))
    prepare(PrepOptions(out=tmp_path / "two", workers=2, **common))
    assert _tree_digest(tmp_path / "one") == _tree_digest(tmp_path / "two")
    assert all(s["samples"] == 10 for s in _valid(tmp_path / "one")["task_stats"].values())
