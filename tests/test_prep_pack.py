"""Best-fit packing and the shard writer: whole samples, padding only at row ends, high utilisation."""
from __future__ import annotations

import numpy as np
import pytest

from mftcoder_coba.data.layout import field_dtypes, file_sha256, row_dtype
from mftcoder_coba.data_prep.pack import BestFitPacker, Sample
from mftcoder_coba.data_prep.shards import ShardWriter


def _samples(lengths: list[int]) -> list[Sample]:
    out = []
    for i, n in enumerate(lengths):
        ids = np.arange(n, dtype=np.int32) + 1000 * i
        mask = (np.arange(n) >= n // 2).astype(np.uint8)
        out.append(Sample(i % 3, ids, mask))
    return out


def _pack(packer: BestFitPacker, samples: list[Sample]) -> list[list[Sample]]:
    rows = []
    for s in samples:
        rows += packer.add(s)
    return rows + packer.finish()


def test_every_sample_lands_whole_in_exactly_one_row():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(5.0, 1.0, 3000).astype(int), 1, 1024).tolist()
    samples = _samples(lengths)
    rows = _pack(BestFitPacker(1024, buffer_tokens=64 * 1024, max_open_rows=32), samples)
    placed = [id(s) for row in rows for s in row]
    assert sorted(placed) == sorted(id(s) for s in samples)  # each exactly once, never split
    assert all(sum(len(s) for s in row) <= 1024 for row in rows)
    utilisation = sum(lengths) / (len(rows) * 1024)
    assert utilisation >= 0.99, utilisation


def test_packing_is_deterministic_and_bounded():
    lengths = [7, 3, 9, 1, 10, 2, 5, 5, 8, 4] * 50
    a = [[len(s) for s in row] for row in _pack(BestFitPacker(10, buffer_tokens=40, max_open_rows=4),
                                                 _samples(lengths))]
    b = [[len(s) for s in row] for row in _pack(BestFitPacker(10, buffer_tokens=40, max_open_rows=4),
                                                 _samples(lengths))]
    assert a == b
    packer = BestFitPacker(10, buffer_tokens=40, max_open_rows=4)
    for s in _samples(lengths):
        packer.add(s)
        assert len(packer._rows) <= 4 + 40 and len(packer._buffer) <= 40  # memory does not grow with input
    with pytest.raises(ValueError):
        packer.add(_samples([11])[0])


def test_writer_layout_positions_labels_and_padding(tmp_path):
    seq_len = 16
    samples = _samples([5, 6, 3])
    dtypes = field_dtypes(vocab_size=50_000, seq_len=seq_len, num_tasks=3)
    assert dtypes == {"input_ids": "uint16", "loss": "uint8", "task_ids": "int16", "position_ids": "uint16"}
    writer = ShardWriter(tmp_path, seq_len, dtypes, pad_id=7, rows_per_shard=2, chunk_rows=1)
    writer.write(samples[:2])
    writer.write(samples[2:])
    writer.write(samples[:1])
    shards = writer.close()
    assert [s["rows"] for s in shards] == [2, 1] and writer.rows == 3
    for s in shards:
        assert file_sha256(tmp_path / s["file"]) == s["sha256"]
        assert (tmp_path / s["file"]).stat().st_size == s["bytes"]
    rows = np.fromfile(tmp_path / shards[0]["file"], dtype=row_dtype(dtypes, seq_len))
    first = rows[0]
    assert first["position_ids"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4]
    assert first["task_ids"].tolist() == [0] * 5 + [1] * 6 + [-1] * 5
    assert first["input_ids"][11:].tolist() == [7] * 5
    # loss flag at t means "token t+1 is a target of the same sample"; never across a sample boundary
    assert first["loss"].tolist() == [0, 1, 1, 1, 0] + [0, 0, 1, 1, 1, 0] + [0] * 5


def test_writing_many_rows_at_once_equals_row_by_row(tmp_path):
    """Blocks of rows cross chunk and shard boundaries exactly as single rows do; loss counts match masks."""
    rng = np.random.default_rng(1)
    samples = _samples(np.clip(rng.lognormal(3.0, 1.0, 400).astype(int), 1, 64).tolist())
    assert all(s.loss_tokens == np.count_nonzero(s.mask[1:]) for s in samples)
    rows = _pack(BestFitPacker(64, buffer_tokens=16 * 64, max_open_rows=8), samples)
    dtypes = field_dtypes(vocab_size=1 << 20, seq_len=64, num_tasks=3)
    one, many = (ShardWriter(tmp_path / name, 64, dtypes, pad_id=5, rows_per_shard=37, chunk_rows=8)
                 for name in ("one", "many"))
    for row in rows:
        one.write(row)
    many.write_rows(rows[:5])
    many.write_rows(rows[5:])
    assert one.close() == many.close() and one.rows == many.rows == len(rows)
    for shard in one.shards:
        assert (tmp_path / "one" / shard["file"]).read_bytes() == (tmp_path / "many" / shard["file"]).read_bytes()
