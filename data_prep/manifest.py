"""``manifest.json``: what a split holds, how it was made, and how to check it.

Written last, after every shard is complete, so a manifest beside shards means the shards are whole.
Readers (:class:`mftcoder_coba.data.PackedDataset`, ``inspect``, ``verify``) go through :func:`load`,
which refuses unknown formats and names the file and the missing key instead of failing later.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mftcoder_coba.data_prep.pack import Row
from mftcoder_coba.errors import UserError

FORMAT = "mftcoder-coba-packed"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED = ("format", "format_version", "split", "seq_len", "num_rows", "dtypes", "pad_token_id", "tokenizer",
            "tasks", "task_stats", "shards")


@dataclass
class TaskStats:
    """Counts for one task in one split. ``pad_share`` is this task's share of the padding of the rows it is
    in (padding of a row split in proportion to each task's tokens there), so per-task utilisation is
    ``tokens / (tokens + pad_share)``: exact for single-task rows, a fair attribution for mixed ones."""

    samples: int = 0
    rows: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    pad_share: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        util = self.tokens / (self.tokens + self.pad_share) if self.tokens else 0.0
        return {"samples": self.samples, "rows": self.rows, "tokens": self.tokens, "loss_tokens": self.loss_tokens,
                "truncated": self.truncated, "dropped": dict(sorted(self.dropped.items())),
                "skipped": dict(sorted(self.skipped.items())), "utilisation": round(util, 6)}


class SplitStats:
    """Accumulates :class:`TaskStats` for every task of a split as rows are written."""

    def __init__(self, num_tasks: int, seq_len: int) -> None:
        self.tasks = [TaskStats() for _ in range(num_tasks)]
        self.seq_len = seq_len
        self.rows = 0
        self.tokens = 0

    def add_row(self, row: Row) -> None:
        self.rows += 1
        used: dict[int, int] = {}
        for sample in row:
            stats = self.tasks[sample.task]
            stats.samples += 1
            stats.tokens += sample.size
            stats.loss_tokens += sample.loss_tokens
            used[sample.task] = used.get(sample.task, 0) + sample.size
        total = sum(used.values())
        self.tokens += total
        pad = self.seq_len - total
        for task, n in used.items():
            self.tasks[task].rows += 1
            self.tasks[task].pad_share += pad * n / total

    def summary(self, names: list[str]) -> dict[str, Any]:
        capacity = self.rows * self.seq_len
        return {
            "task_stats": {name: stats.to_dict() for name, stats in zip(names, self.tasks)},
            "totals": {"rows": self.rows, "tokens": self.tokens,
                       "loss_tokens": sum(s.loss_tokens for s in self.tasks),
                       "samples": sum(s.samples for s in self.tasks)},
            "utilisation": round(self.tokens / capacity, 6) if capacity else 0.0,
        }


def write(directory: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, indent=2, sort_keys=False, ensure_ascii=False) + "\n"
    (directory / MANIFEST).write_text(text, encoding="utf-8")


def load(directory: str | Path) -> dict[str, Any]:
    """Read and sanity-check a split's manifest; every problem is one :class:`UserError` naming the file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: prepared data directory not found")
    path = directory / MANIFEST
    if not path.is_file():
        raise UserError(f"{path}: no manifest (not a prepared split, or an interrupted prep run)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: unreadable manifest: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: format version {manifest.get('format_version')} is not supported "
                        f"(this version reads {FORMAT_VERSION}); prepare the data again")
    missing = [key for key in REQUIRED if key not in manifest]
    if missing:
        raise UserError(f"{path}: manifest lacks {', '.join(missing)}")
    return manifest
