"""Binary shard layout and the incremental shard writer.

A shard is a flat file of fixed-size row records (a NumPy structured dtype), so a reader memory-maps it
and gathers any rows with one fancy index, and a row's place on disk is ``row * itemsize``. Per token a
row stores the input id, a loss flag (1 where the *next* token is a loss target of the same sample, which is
all that is needed to derive labels), the task id (-1 on padding) and the position id (restarting at 0 for
every sample; padding forms its own segment). Ids take 2 bytes when the vocabulary fits, positions 2 bytes
when ``seq_len`` does. Rows are written in small chunks and hashed as they go, and a shard is closed once it
holds ``rows_per_shard`` rows, so memory never depends on the corpus size. Rows are laid out a block at a
time with whole-array operations rather than sample by sample.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from mftcoder_coba.data_prep.pack import Row

SHARD_NAME = "shard-{:05d}.bin"
FIELDS = ("input_ids", "loss", "task_ids", "position_ids")


def field_dtypes(vocab_size: int, seq_len: int, num_tasks: int) -> dict[str, str]:
    """The narrowest dtypes that hold every value of this dataset, written to the manifest."""
    return {
        "input_ids": "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "int32",
        "loss": "uint8",
        "task_ids": "int16" if num_tasks < np.iinfo(np.int16).max else "int32",
        "position_ids": "uint16" if seq_len <= np.iinfo(np.uint16).max + 1 else "int32",
    }


def row_dtype(dtypes: dict[str, str], seq_len: int) -> np.dtype:
    return np.dtype([(name, np.dtype(dtypes[name]), (seq_len,)) for name in FIELDS])


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


def file_sha256(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def shard_problem(file: Path, entry: dict[str, Any]) -> str | None:
    """What is wrong with shard ``file`` against its manifest entry (missing, size, sha256), or None.

    The one check behind ``mftcoder-coba verify`` and the check ``train`` runs before it reads a split."""
    if not file.is_file():
        return f"{file}: missing"
    size = file.stat().st_size
    if size != entry["bytes"]:
        return f"{file}: {size} bytes, manifest says {entry['bytes']}"
    if file_sha256(file) != entry["sha256"]:
        return f"{file}: sha256 mismatch (corrupted or modified)"
    return None
