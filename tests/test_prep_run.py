"""``prepare`` end to end: inputs, splits, manifests, determinism, bad input, and output safety."""
from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mftcoder_coba.data import PackedDataset
from mftcoder_coba.data_prep.formats import normalise
from mftcoder_coba.data_prep.pipeline import PrepOptions, prepare
from mftcoder_coba.data_prep.render import Renderer
from mftcoder_coba.data_prep.tokens import Encoder, load_tokenizer
from mftcoder_coba.demo_data import DEMO_TASKS, TOKENIZER_DIR
from mftcoder_coba.errors import UserError


def _subset(tmp_path: Path, per_task: int = 60) -> dict[str, Path]:
    tasks = {}
    for name, path in DEMO_TASKS.items():
        target = tmp_path / "in" / f"{name}.jsonl"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("\n".join(path.read_text().splitlines()[:per_task]) + "\n")
        tasks[name] = target
    return tasks


def _opts(tasks, out, **kw) -> PrepOptions:
    kw.setdefault("seq_len", 256)
    return PrepOptions(tasks=tasks, tokenizer=TOKENIZER_DIR, out=out, progress=False, **kw)


def _tree(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _write(path: Path, lines: list[str | bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


def test_packed_samples_are_exactly_the_encoded_records(tmp_path):
    tasks = _subset(tmp_path, 40)
    manifest = prepare(_opts(tasks, tmp_path / "out", valid_samples_per_task=4, seed=3))
    tok = load_tokenizer(TOKENIZER_DIR)
    renderer, encoder = Renderer(tok), Encoder(tok)
    expected = []
    for tid, path in enumerate(tasks.values()):
        for i, line in enumerate(path.read_text().splitlines()):
            ids, mask = encoder.encode(*map(list, zip(renderer.render(normalise(json.loads(line), f"{path}:{i}")))))[0]
            expected.append((tid, tuple(ids.tolist()), tuple(np.flatnonzero(mask[1:]).tolist())))
    found = []
    for split in ("train", "valid"):
        ds = PackedDataset(tmp_path / "out" / split)
        for r in range(len(ds)):
            row = ds[r]
            starts = np.flatnonzero(row["position_ids"] == 0).tolist() + [ds.seq_len]
            for a, b in zip(starts[:-1], starts[1:]):
                task = int(row["task_ids"][a])
                if task < 0:  # padding: one trailing segment only
                    assert b == ds.seq_len and (row["labels"][a:] == -100).all()
                    continue
                assert (row["task_ids"][a:b] == task).all()
                assert row["position_ids"][a:b].tolist() == list(range(b - a))
                targets = np.flatnonzero(row["labels"][a:b] != -100)
                assert (row["labels"][a:b][targets] == row["input_ids"][a + 1 : b][targets]).all()
                assert row["labels"][b - 1] == -100  # never predicts across a sample boundary
                found.append((task, tuple(row["input_ids"][a:b].tolist()), tuple(targets.tolist())))
    assert sorted(found) == sorted(expected)  # every record once, whole, with its exact loss targets
    assert manifest["task_stats"]["unit_tests"]["samples"] == 36
    assert sum(s["samples"] for s in manifest["task_stats"].values()) == 4 * 36


def test_manifest_contents_and_single_task_valid_rows(tmp_path):
    tasks = _subset(tmp_path, 50)
    train = prepare(_opts(tasks, tmp_path / "out", valid_fraction=0.1, rows_per_shard=8))
    valid = json.loads((tmp_path / "out/valid/manifest.json").read_text())
    assert train["format_version"] == 1 and train["seq_len"] == 256 and train["tasks"] == list(DEMO_TASKS)
    assert train["tokenizer"]["vocab_size"] == len(load_tokenizer(TOKENIZER_DIR))
    assert len(train["tokenizer"]["sha256"]) == 64 and "tokenizer.json" in train["tokenizer"]["files"]
    assert len(train["shards"]) == -(-train["num_rows"] // 8) and all(len(s["sha256"]) == 64 for s in train["shards"])
    assert train["arguments"]["valid_fraction"] == 0.1 and train["arguments"]["seq_len"] == 256
    for name in DEMO_TASKS:
        assert valid["task_stats"][name]["samples"] == 5 and train["task_stats"][name]["samples"] == 45
        stats = train["task_stats"][name]
        assert set(stats) == {"samples", "rows", "tokens", "loss_tokens", "truncated", "dropped", "skipped",
                              "utilisation"}
        assert 0 < stats["loss_tokens"] < stats["tokens"]
    ds = PackedDataset(tmp_path / "out" / "train")
    assert train["utilisation"] == pytest.approx(train["totals"]["tokens"] / (len(ds) * 256), abs=1e-6)
    vds = PackedDataset(tmp_path / "out" / "valid")
    for r in range(len(vds)):
        assert len(set(vds[r]["task_ids"].tolist()) - {-1}) == 1
    assert ds.tokenizer_dir == (tmp_path / "out" / "tokenizer").resolve()


def test_same_inputs_give_byte_identical_output_also_with_workers(tmp_path, monkeypatch):
    tasks = _subset(tmp_path, 80)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    prepare(_opts(tasks, tmp_path / "a", batch_records=16))
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"  # switched off only while prep encodes
    prepare(_opts(tasks, tmp_path / "b", batch_records=16))
    prepare(_opts(tasks, tmp_path / "c", batch_records=16, workers=2))
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b") == _tree(tmp_path / "c")
    prepare(_opts(tasks, tmp_path / "e"))  # batch size changes no shard (the manifest records it)
    shards = {k: v for k, v in _tree(tmp_path / "a").items() if k.endswith(".bin")}
    assert shards == {k: v for k, v in _tree(tmp_path / "e").items() if k.endswith(".bin")}
    prepare(_opts(tasks, tmp_path / "d", batch_records=16, seed=99))
    assert _tree(tmp_path / "a")["valid/shard-00000.bin"] != _tree(tmp_path / "d")["valid/shard-00000.bin"]


def test_input_kinds_gz_directories_and_datasets(tmp_path):
    import datasets

    records = [{"prompt": f"p{i}", "answer": f"a{i} " * (i % 5 + 1)} for i in range(30)]
    lines = [json.dumps(r) for r in records]
    with gzip.open(tmp_path / "one.jsonl.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    _write(tmp_path / "tree" / "b" / "x.jsonl", lines[15:])
    _write(tmp_path / "tree" / "a" / "y.jsonl", lines[:15])
    (tmp_path / "tree" / "notes.txt").write_text("ignored")
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "hf"))
    outs = {}
    for kind, path in {"gz": tmp_path / "one.jsonl.gz", "dir": tmp_path / "tree", "hf": tmp_path / "hf"}.items():
        outs[kind] = prepare(_opts({"t": path}, tmp_path / f"out_{kind}", valid_samples_per_task=3))
    shards = {kind: _tree(tmp_path / f"out_{kind}")["train/shard-00000.bin"] for kind in outs}
    assert shards["gz"] == shards["dir"] == shards["hf"]  # same records in the same order
    assert outs["hf"]["task_stats"]["t"]["samples"] == 27


def test_overlong_truncate_and_drop_are_counted(tmp_path):
    long = json.dumps({"text": "word " * 400})
    path = _write(tmp_path / "x.jsonl", [long] + [json.dumps({"text": f"short {i}"}) for i in range(5)])
    truncated = prepare(_opts({"t": path}, tmp_path / "t", seq_len=64, valid_fraction=0.0))
    assert truncated["task_stats"]["t"]["truncated"] == 1 and truncated["task_stats"]["t"]["samples"] == 6
    dropped = prepare(_opts({"t": path}, tmp_path / "d", seq_len=64, valid_fraction=0.0, overlong="drop"))
    assert dropped["task_stats"]["t"]["dropped"] == {"overlong": 1} and dropped["task_stats"]["t"]["samples"] == 5


BAD_LINES = {
    "invalid_json": b'{"text": ',
    "not_utf8": b'{"text": "\xff"}',
    "unknown_role": b'{"chat_rounds": [{"role": "robot", "content": "x"}]}',
    "turn_order": b'{"chat_rounds": [{"role": "bot", "content": "x"}]}',
    "empty_field": b'{"prompt": "q", "answer": ""}',
    "missing_field": b'{"prompt": "q"}',
}


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_bad_record_stops_with_path_and_line_and_writes_nothing(tmp_path, reason):
    good = [json.dumps({"prompt": "q", "answer": "a"})] * 3
    path = _write(tmp_path / "x.jsonl", good + [BAD_LINES[reason]] + good)
    with pytest.raises(UserError, match=rf"^{path}:4: "):
        prepare(_opts({"t": path}, tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["x.jsonl"]  # no temporary directory left behind


def test_skip_bad_counts_every_reason(tmp_path):
    good = [json.dumps({"prompt": f"q{i}", "answer": "a"}) for i in range(4)]
    path = _write(tmp_path / "x.jsonl", good + list(BAD_LINES.values()) + [BAD_LINES["turn_order"]])
    _write(tmp_path / "d" / "empty.jsonl", [])
    _write(tmp_path / "d" / "ok.jsonl", good)
    manifest = prepare(_opts({"t": path, "u": tmp_path / "d"}, tmp_path / "out", skip_bad=True,
                             valid_fraction=0.0))
    expected = {reason: 1 for reason in BAD_LINES} | {"turn_order": 2}
    assert manifest["task_stats"]["t"]["skipped"] == expected and manifest["task_stats"]["t"]["samples"] == 4
    assert manifest["task_stats"]["u"]["skipped"] == {"empty_file": 1}


def test_user_errors_for_paths_tokenizer_and_options(tmp_path):
    ok = _write(tmp_path / "x.jsonl", [json.dumps({"text": "hello"})] * 3)
    empty = _write(tmp_path / "e.jsonl", [])
    not_tokenizer = tmp_path / "not_tok"
    not_tokenizer.mkdir()
    cases = [
        (dict(tasks={"t": tmp_path / "missing.jsonl"}), "missing.jsonl: task 't': no such file"),
        (dict(tasks={"t": empty}), "e.jsonl: empty file"),
        (dict(tasks={"t": ok}, tokenizer=tmp_path / "no_tok"), "no_tok: tokenizer directory not found"),
        (dict(tasks={"t": ok}, tokenizer=not_tokenizer), "cannot load tokenizer"),
        (dict(tasks=[("t", ok), ("t", ok)]), "task name 't' given twice"),
        (dict(tasks={"t": ok}, seq_len=1), "--seq-len"),
        (dict(tasks={"t": ok}, valid_samples_per_task=3), "leaves none to train on"),
        (dict(tasks={"t": ok}, valid_fraction=0.1, valid_samples_per_task=1), "not both"),
    ]
    for kwargs, message in cases:
        opts = dict(tokenizer=TOKENIZER_DIR, seq_len=64, out=tmp_path / "out", progress=False) | kwargs
        with pytest.raises(UserError, match=message):
            prepare(PrepOptions(**opts))
        assert not (tmp_path / "out").exists()


def test_existing_output_refused_unless_overwrite(tmp_path):
    path = _write(tmp_path / "x.jsonl", [json.dumps({"text": f"hello {i}"}) for i in range(10)])
    out = tmp_path / "out"
    prepare(_opts({"t": path}, out, seq_len=64))
    before = _tree(out)
    with pytest.raises(UserError, match="already exists"):
        prepare(_opts({"t": path}, out, seq_len=64))
    bad = _write(tmp_path / "bad.jsonl", [b"{"])
    with pytest.raises(UserError):  # a failing overwrite leaves the old output untouched
        prepare(_opts({"t": bad}, out, seq_len=64, overwrite=True))
    assert _tree(out) == before
    prepare(_opts({"t": path}, out, seq_len=32, overwrite=True))
    assert json.loads((out / "train" / "manifest.json").read_text())["seq_len"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "out", "x.jsonl"]


@pytest.mark.slow
def test_killed_run_leaves_no_output_that_looks_complete(tmp_path):
    big = tmp_path / "big.jsonl"
    lines = DEMO_TASKS["code_completion"].read_text().splitlines()
    big.write_text("\n".join(lines * 15) + "\n")
    out = tmp_path / "out"
    code = ("from mftcoder_coba.data_prep.pipeline import PrepOptions, prepare; "
            f"prepare(PrepOptions(tasks={{'t': {str(big)!r}}}, tokenizer={str(TOKENIZER_DIR)!r}, seq_len=128, "
            f"out={str(out)!r}, rows_per_shard=4, batch_records=64, progress=False))")
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:  # wait until shards are being written, then kill
            temps = list(tmp_path.glob(".out.tmp-*/train/shard-*.bin"))
            if len(temps) >= 3 or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "prep finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists() or not (out / "train" / "manifest.json").exists()
    assert list(tmp_path.glob(".out.tmp-*"))  # the partial work sits in a hidden temporary directory
    small = _write(tmp_path / "small.jsonl", [json.dumps({"text": "hello"})] * 3)
    prepare(_opts({"t": small}, out, seq_len=32))  # the next run cleans the dead run's leftovers up
    assert not list(tmp_path.glob(".out.tmp-*")) and (out / "train" / "manifest.json").exists()
