"""The incremental shard writer; the record it writes is :mod:`mftcoder_coba.data.layout`'s.

Rows are written in small chunks and hashed as they go, and a shard is closed once it holds
``rows_per_shard`` rows, so memory never depends on the corpus size. Rows are laid out a block at a time
with whole-array operations rather than sample by sample.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from mftcoder_coba.data.layout import SHARD_NAME, row_dtype
from mftcoder_coba.data_prep.pack import Row


class ShardWriter:
    """Writes packed rows of one split as shards, hashing every byte; :meth:`close` lists the shards."""

    def __init__(self, directory: Path, seq_len: int, dtypes: dict[str, str], pad_id: int, rows_per_shard: int,
                 chunk_rows: int = 64) -> None:
        self.directory = directory
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.rows_per_shard = rows_per_shard
        self.dtype = row_dtype(dtypes, seq_len)
        self._chunk = np.zeros(min(chunk_rows, rows_per_shard), dtype=self.dtype)
        self._filled = 0
        self._arange = np.arange(seq_len, dtype=np.int32)
        self._pad_ids = np.full(seq_len, pad_id, dtype=np.int32)
        self._zeros = np.zeros(seq_len, dtype=np.uint8)
        self._file: BinaryIO | None = None
        self._hash: Any = None
        self._shard_rows = 0
        self.shards: list[dict[str, Any]] = []
        self.rows = 0
        directory.mkdir(parents=True, exist_ok=True)

    def write(self, row: Row) -> None:
        self.write_rows([row])

    def write_rows(self, rows: list[Row]) -> None:
        """Rows in order, filled into the chunk a block at a time with whole-array operations."""
        done = 0
        while done < len(rows):
            room = min(len(self._chunk) - self._filled, self.rows_per_shard - self._shard_rows - self._filled)
            block = rows[done : done + room]
            self._fill(block)
            done += len(block)
            if self._filled == len(self._chunk) or self._shard_rows + self._filled == self.rows_per_shard:
                self._flush()

    def _fill(self, block: list[Row]) -> None:
        """Lay ``block`` out as consecutive segments (its samples, then one padding segment per row)."""
        seq_len = self.seq_len
        ids: list[np.ndarray] = []
        masks: list[np.ndarray] = []
        positions: list[np.ndarray] = []
        sizes: list[int] = []
        tasks: list[int] = []
        for row in block:
            used = 0
            for sample in row:
                ids.append(sample.ids)
                masks.append(sample.mask)
                positions.append(self._arange[: sample.size])
                sizes.append(sample.size)
                tasks.append(sample.task)
                used += sample.size
            pad = seq_len - used
            ids.append(self._pad_ids[:pad])
            masks.append(self._zeros[:pad])
            positions.append(self._arange[:pad])
            sizes.append(pad)
            tasks.append(-1)
        shape = (len(block), seq_len)
        records = self._chunk[self._filled : self._filled + len(block)]
        records["input_ids"] = np.concatenate(ids).reshape(shape)
        records["position_ids"] = np.concatenate(positions).reshape(shape)
        records["task_ids"] = np.repeat(np.array(tasks, dtype=np.int32), sizes).reshape(shape)
        # loss flag at t: token t + 1 is a target of the same segment (0 on the last token of each segment)
        mask = np.concatenate(masks)
        loss = np.empty_like(mask)
        loss[:-1] = mask[1:]
        ends = np.cumsum(sizes)
        loss[ends[ends > 0] - 1] = 0
        records["loss"] = loss.reshape(shape)
        self._filled += len(block)
        self.rows += len(block)

    def _flush(self) -> None:
        if not self._filled:
            return
        if self._file is None:
            name = SHARD_NAME.format(len(self.shards))
            self._file = open(self.directory / name, "wb")
            self._hash = hashlib.sha256()
            self.shards.append({"file": name})
        data = self._chunk[: self._filled].view(np.uint8)
        self._file.write(data)
        self._hash.update(data)
        self._shard_rows += self._filled
        self._filled = 0
        if self._shard_rows == self.rows_per_shard:
            self._close_shard()

    def _close_shard(self) -> None:
        assert self._file is not None
        self._file.close()
        self.shards[-1].update(rows=self._shard_rows, bytes=self._shard_rows * self.dtype.itemsize,
                               sha256=self._hash.hexdigest())
        self._file = None
        self._shard_rows = 0

    def close(self) -> list[dict[str, Any]]:
        self._flush()
        if self._file is not None:
            self._close_shard()
        return self.shards
