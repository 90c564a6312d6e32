"""Per-task and per-split counts gathered as rows are written: the manifest's ``task_stats``, ``totals`` and
``utilisation`` (the manifest itself is :mod:`mftcoder_coba.data.manifest`)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from mftcoder_coba.data_prep.pack import Row


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
