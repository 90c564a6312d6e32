"""``--mix NAME=FACTOR``: how many times each training record of a task is used.

A factor is a whole number of passes over the task's training records plus a fractional part, drawn as
a seeded subset of exactly ``round(fraction * training records)`` records taken once more (``2``: every
record twice; ``0.5``: a seeded half; ``1.5``: all once, and a seeded half again). The held-out records are
chosen before, from the unique records, and used once: a repeated record is never on both sides. Each
pass re-reads the task's inputs (memory stays flat), so the copies of a record lie a pass apart in the
stream rather than side by side; the copy number of an exposure is the pass it comes from.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MixPlan:
    """Which records of a task each pass over its inputs takes."""

    factor: float
    whole: int
    """Passes that take every training record."""
    extra: np.ndarray | None
    """Per record: taken once more in the pass after the whole ones (the fractional part); None if none."""
    valid: np.ndarray
    """Per record: held out (taken in pass 0 only)."""

    @property
    def passes(self) -> int:
        return max(1, self.whole + (self.extra is not None))

    @property
    def plain(self) -> bool:
        """One pass taking every record: the stream needs no selection."""
        return self.whole == 1 and self.extra is None

    def takes(self, index: int, copy: int) -> bool:
        """Whether pass ``copy`` takes record ``index``."""
        if self.valid[index]:
            return copy == 0
        return copy < self.whole or (self.extra is not None and copy == self.whole and bool(self.extra[index]))

    @property
    def train_records(self) -> int:
        return int(len(self.valid) - self.valid.sum())

    @property
    def train_exposures(self) -> int:
        return self.whole * self.train_records + (int(self.extra.sum()) if self.extra is not None else 0)

    @property
    def exposures(self) -> int:
        """Records the task's stream yields: held-out ones once, training ones by the factor."""
        return int(self.valid.sum()) + self.train_exposures


def plan_mix(name: str, factor: float, valid: np.ndarray, seed: int) -> MixPlan:
    """The plan of a task whose held-out records are ``valid``; the extra subset is seeded by (seed, name)."""
    whole = math.floor(factor)
    train = np.flatnonzero(~valid)
    count = round((factor - whole) * len(train))
    extra = None
    if count:
        rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8")), 0x6D6978])  # "mix"
        extra = np.zeros(len(valid), dtype=bool)
        extra[rng.choice(train, size=count, replace=False)] = True
    return MixPlan(float(factor), whole, extra, valid)
