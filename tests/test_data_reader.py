"""``PackedDataset``: the reader the trainer uses (rows, labels, task rows, errors that name the file)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mftcoder_coba.data import PackedDataset
from mftcoder_coba.data_prep.pipeline import PrepOptions, prepare
from mftcoder_coba.demo_data import DEMO_TASKS, TOKENIZER_DIR
from mftcoder_coba.errors import UserError


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader")
    tasks = {}
    for name, path in DEMO_TASKS.items():
        tasks[name] = root / f"{name}.jsonl"
        tasks[name].write_text("\n".join(path.read_text().splitlines()[:120]) + "\n")
    prepare(PrepOptions(tasks=tasks, tokenizer=TOKENIZER_DIR, seq_len=128, out=root / "out", rows_per_shard=7,
                        valid_samples_per_task=6, progress=False))
    return root / "out"


def test_rows_match_single_items_across_shards(out):
    ds = PackedDataset(out / "train")
    assert len(ds) > 14 and len(ds.manifest["shards"]) > 2
    assert ds.tasks == list(DEMO_TASKS) and ds.seq_len == 128
    assert ds.vocab_size == ds.manifest["tokenizer"]["vocab_size"]
    idx = np.array([len(ds) - 1, 0, 8, 7, 8], dtype=np.int64)
    batch = ds.rows(idx)
    assert set(batch) == {"input_ids", "labels", "task_ids", "position_ids"}
    for key, value in batch.items():
        assert value.shape == (5, 128) and value.dtype == np.int64
        for j, i in enumerate(idx):
            np.testing.assert_array_equal(value[j], ds[int(i)][key])
    item = ds[3]
    assert (item["input_ids"] < ds.vocab_size).all() and (item["input_ids"] >= 0).all()
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_task_rows(out):
    train, valid = PackedDataset(out / "train"), PackedDataset(out / "valid")
    for t, name in enumerate(train.tasks):
        rows = train.task_rows(t)
        np.testing.assert_array_equal(rows, train.task_rows(name))
        assert rows.size and all((train[int(r)]["task_ids"] == t).any() for r in rows)
    valid_rows = [valid.task_rows(t) for t in range(len(valid.tasks))]
    assert sorted(np.concatenate(valid_rows).tolist()) == list(range(len(valid)))  # a partition: one task per row
    for t, rows in enumerate(valid_rows):
        for r in rows:
            assert set(valid[int(r)]["task_ids"].tolist()) <= {t, -1}


def test_reader_errors_name_the_problem(out, tmp_path):
    with pytest.raises(UserError, match="prepared data directory not found"):
        PackedDataset(tmp_path / "nope")
    broken = tmp_path / "copy"
    shutil.copytree(out, broken)
    shard = broken / "train" / "shard-00001.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(UserError, match="shard-00001.bin: .* bytes, expected"):
        PackedDataset(broken / "train")
    shard.unlink()
    with pytest.raises(UserError, match="shard-00001.bin: shard listed in the manifest is missing"):
        PackedDataset(broken / "train")
    manifest = json.loads((broken / "valid" / "manifest.json").read_text())
    manifest["format_version"] = 99
    (broken / "valid" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="format version 99"):
        PackedDataset(broken / "valid")
    (broken / "valid" / "manifest.json").unlink()
    with pytest.raises(UserError, match="no manifest"):
        PackedDataset(broken / "valid")


@pytest.mark.parametrize(("field", "value", "message"), [
    ("input_ids", "vocab", r"input id (\d+) outside \[0, \d+\)"),
    ("task_ids", 99, r"task id 99 outside \[-1, 4\)"),
    ("task_ids", -2, r"task id -2 outside \[-1, 4\)"),
])
def test_rows_refuse_ids_the_model_cannot_index(out, tmp_path, field, value, message):
    broken = tmp_path / "copy"
    shutil.copytree(out, broken)
    ds = PackedDataset(broken / "train")
    shard = ds.manifest["shards"][1]
    value = ds.vocab_size if value == "vocab" else value
    rows = np.memmap(broken / "train" / shard["file"], dtype=ds.dtype, mode="r+", shape=(shard["rows"],))
    rows[field][3, 10] = value
    rows.flush()
    del rows
    first = int(ds._starts[1])
    ds.rows(np.array([first + 2, first + 4]))  # neighbours read fine
    with pytest.raises(UserError, match=rf"shard-00001\.bin: row 3 holds {message} \(corrupted shard"):
        ds.rows(np.array([0, first + 3]))
    with pytest.raises(UserError, match="shard-00001.bin: row 3"):
        ds[first + 3]


def test_the_format_package_needs_nothing_of_prep(out):
    """Reading (rows, the manifest, the tokenizer copy) never imports the writer's side: the format has one home
    that prep and training both import, so a reader cannot depend on prep's internals."""
    script = (f"import sys; from mftcoder_coba.data import PackedDataset; ds = PackedDataset({str(out / 'train')!r}); "
              "ds.rows([0]); assert ds.tokenizer_files(); "
              "print(sorted(m for m in sys.modules if m.startswith('mftcoder_coba.data_prep')))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
