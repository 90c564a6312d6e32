"""Memory-mapped reader of prepared splits: the contract between data prep and the trainer.

``PackedDataset(OUT / "train")`` maps every shard read-only (nothing is loaded up front, so many ranks can
share one page cache), and returns rows as int64 NumPy arrays of length ``seq_len``: ``input_ids``,
``labels`` (the next-token target, -100 where there is no loss), ``task_ids`` (-1 on padding) and
``position_ids`` (restarting at 0 for every packed sample; padding forms its own segment). Labels are
derived from the stored per-token loss flag, so they can never disagree with the input ids.

Every gathered batch is checked for ids the model cannot index (:meth:`PackedDataset.rows`), and the
tokenizer is only ever taken from the prepared output itself, checked against the manifest's hashes
(:meth:`PackedDataset.tokenizer_files`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mftcoder_coba.data import manifest as manifest_io
from mftcoder_coba.data.layout import TOKENIZER_FILES, file_sha256, row_dtype
from mftcoder_coba.errors import UserError

IGNORE_INDEX = -100
"""The label of a token with no loss (PyTorch's ``ignore_index`` convention, which the kernels default to)."""


class PackedDataset:
    """Rows of one prepared split (``OUT/train`` or ``OUT/valid``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest: dict[str, Any] = manifest_io.load(self.path)
        self.seq_len: int = int(self.manifest["seq_len"])
        self.tasks: list[str] = list(self.manifest["tasks"])
        self.vocab_size: int = int(self.manifest["tokenizer"]["vocab_size"])
        self.dtype = row_dtype(self.manifest["dtypes"], self.seq_len)
        self._shards: list[np.memmap] = []
        starts = [0]
        for shard in self.manifest["shards"]:
            file = self.path / shard["file"]
            if not file.is_file():
                raise UserError(f"{file}: shard listed in the manifest is missing")
            size = file.stat().st_size
            if size != shard["rows"] * self.dtype.itemsize:
                raise UserError(f"{file}: {size} bytes, expected {shard['rows']} rows of {self.dtype.itemsize} bytes "
                                "(truncated or from another run; run `mftcoder-coba verify`)")
            self._shards.append(np.memmap(file, dtype=self.dtype, mode="r", shape=(shard["rows"],)))
            starts.append(starts[-1] + shard["rows"])
        self._starts = np.asarray(starts, dtype=np.int64)
        if int(self._starts[-1]) != int(self.manifest["num_rows"]):
            raise UserError(f"{self.path / manifest_io.MANIFEST}: shards hold {int(self._starts[-1])} rows, "
                            f"manifest says {self.manifest['num_rows']}")
        self._task_rows: list[np.ndarray] | None = None

    @property
    def tokenizer_dir(self) -> Path | None:
        """The tokenizer copy prep wrote beside the splits (``OUT/tokenizer``), or None if there is none.

        The manifest's ``tokenizer.dir`` / ``tokenizer.source`` are records of how the data was made, never
        paths to follow: a manifest naming some other folder (a home directory with keys in it) must not make
        ``train`` copy that folder into a run directory. Use :meth:`tokenizer_files` to read it."""
        folder = self.path.resolve().parent / "tokenizer"
        return folder if folder.is_dir() else None

    def tokenizer_files(self) -> list[Path]:
        """The known tokenizer files (``layout.TOKENIZER_FILES``) of :attr:`tokenizer_dir`, each
        checked against its sha256 in the manifest; [] when there is no tokenizer copy. Other files in that
        folder are never listed. A file that differs, or one the manifest lists but that is missing, is one
        :class:`UserError` naming it."""
        folder = self.tokenizer_dir
        if folder is None:
            return []
        hashes = self.manifest["tokenizer"].get("files")
        manifest_file = self.path / manifest_io.MANIFEST
        if not isinstance(hashes, dict):
            raise UserError(f"{manifest_file}: no tokenizer file hashes (tokenizer.files); prepare the data again")
        files = []
        for name in TOKENIZER_FILES:
            if name not in hashes:
                continue
            file = folder / name
            if not file.is_file():
                raise UserError(f"{file}: tokenizer file listed in {manifest_file} is missing")
            if file_sha256(file) != hashes[name]:
                raise UserError(f"{file}: differs from the tokenizer the shards were made with "
                                f"(sha256 in {manifest_file}); run `mftcoder-coba verify`")
            files.append(file)
        return files

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"row {index} out of range for {n} rows")
        batch = self.rows(np.asarray([index % n], dtype=np.int64))
        return {key: value[0] for key, value in batch.items()}

    def _records(self, idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row indices must lie in [0, {len(self)})")
        out = np.empty(idx.size, dtype=self.dtype)
        shard_of = np.searchsorted(self._starts, idx, side="right") - 1
        for s in np.unique(shard_of):
            sel = shard_of == s
            out[sel] = self._shards[s][idx[sel] - self._starts[s]]
        return out

    def rows(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Rows ``idx`` stacked as ``(len(idx), seq_len)`` int64 arrays."""
        rec = self._records(idx)
        self._check_ids(np.asarray(idx, dtype=np.int64).reshape(-1), rec)
        input_ids = rec["input_ids"].astype(np.int64)
        labels = np.full_like(input_ids, IGNORE_INDEX)
        labels[:, :-1] = np.where(rec["loss"][:, :-1] != 0, input_ids[:, 1:], IGNORE_INDEX)
        return {"input_ids": input_ids, "labels": labels, "task_ids": rec["task_ids"].astype(np.int64),
                "position_ids": rec["position_ids"].astype(np.int64)}

    def check_shard_ids(self, shard: int, block_rows: int = 4096) -> None:
        """Scan every row of shard ``shard`` with :meth:`_check_ids` (bounded memory): run once per shard when its
        checksum is verified, so a bad id is refused before training starts, not when its row is first drawn."""
        start, stop = int(self._starts[shard]), int(self._starts[shard + 1])
        for lo in range(start, stop, block_rows):
            hi = min(lo + block_rows, stop)
            self._check_ids(np.arange(lo, hi, dtype=np.int64), np.asarray(self._shards[shard][lo - start : hi - start]))

    def _check_ids(self, idx: np.ndarray, rec: np.ndarray) -> None:
        """Refuse rows whose ids the model cannot index: input ids outside [0, vocab_size), task ids outside
        [-1, num_tasks). One :class:`UserError` naming the shard file and its row.

        Done on every gathered batch as well as once per shard at verification (:meth:`check_shard_ids`): it is a
        few vectorised comparisons per token (nothing next to a forward pass), it covers every reader (training,
        held-out measurement, post-step re-evaluation), and it holds whatever happened to the file after it was
        verified or when checksums were regenerated over bad data. Without it an out-of-range id surfaced
        as a raw IndexError (or a device-side assert on GPU) deep inside the embedding."""
        ids, tasks = rec["input_ids"], rec["task_ids"]
        bad = ((ids >= self.vocab_size) | (tasks < -1) | (tasks >= len(self.tasks))).any(axis=1)
        if np.issubdtype(ids.dtype, np.signedinteger):
            bad |= (ids < 0).any(axis=1)
        if not bad.any():
            return
        j = int(np.flatnonzero(bad)[0])
        shard = int(np.searchsorted(self._starts, idx[j], side="right") - 1)
        ids_j, tasks_j = ids[j].astype(np.int64), tasks[j].astype(np.int64)
        bad_id = (ids_j < 0) | (ids_j >= self.vocab_size)
        what = (f"input id {int(ids_j[bad_id][0])} outside [0, {self.vocab_size})" if bad_id.any() else
                f"task id {int(tasks_j[(tasks_j < -1) | (tasks_j >= len(self.tasks))][0])} outside "
                f"[-1, {len(self.tasks)})")
        raise UserError(f"{self.path / self.manifest['shards'][shard]['file']}: row {int(idx[j] - self._starts[shard])}"
                        f" holds {what} (corrupted shard; run `mftcoder-coba verify` and prepare the data again)")

    def task_rows(self, task: int | str) -> np.ndarray:
        """Rows holding tokens of ``task`` (an id or a name), ascending. In valid splits each row is one task."""
        tid = self.tasks.index(task) if isinstance(task, str) else int(task)
        if not 0 <= tid < len(self.tasks):
            raise IndexError(f"task id {tid} out of range for {len(self.tasks)} tasks")
        if self._task_rows is None:
            found: list[list[np.ndarray]] = [[] for _ in self.tasks]
            for start, shard in zip(self._starts, self._shards):
                for lo in range(0, len(shard), 4096):  # bounded memory on large splits
                    tasks = np.asarray(shard[lo : lo + 4096]["task_ids"])
                    for t in range(len(self.tasks)):
                        hit = np.flatnonzero((tasks == t).any(axis=1))
                        if hit.size:
                            found[t].append(hit.astype(np.int64) + start + lo)
            self._task_rows = [np.concatenate(f) if f else np.zeros(0, dtype=np.int64) for f in found]
        return self._task_rows[tid]
