"""Best-fit packing of whole samples into rows of exactly ``seq_len`` tokens, streaming.

A sample is never split across rows, so no sample loses its beginning or attends to a stranger's tokens,
and padding only ever sits at the end of a row. Samples are gathered in a bounded buffer; each full buffer
is placed longest-first into the open row with the least room that still fits (best-fit decreasing), and
rows stay open across buffers so later short samples fill earlier gaps. Only a bounded number of rows stay
open (the fullest are emitted first when there are too many), so memory is independent of corpus size and
the output is a deterministic function of the sample order.
"""
from __future__ import annotations

from bisect import bisect_left, insort

import numpy as np


class Sample:
    """One tokenised sample: task id, token ids, and 1 where the token is a loss target.

    A slotted class with the length stored once: the packer reads it several times per sample.
    ``loss_tokens`` counts the tokens that are targets of an earlier token (``mask[1:]``); the pipeline
    passes it in, computed for a whole batch at once.
    """

    __slots__ = ("task", "ids", "mask", "size", "loss_tokens")

    def __init__(self, task: int, ids: np.ndarray, mask: np.ndarray, loss_tokens: int | None = None) -> None:
        self.task = task
        self.ids = ids
        self.mask = mask
        self.size = len(ids)
        self.loss_tokens = int(np.count_nonzero(mask[1:])) if loss_tokens is None else loss_tokens

    def __len__(self) -> int:
        return self.size


Row = list[Sample]


class BestFitPacker:
    """Collects samples with :meth:`add` and returns completed rows; :meth:`finish` returns the rest."""

    def __init__(self, seq_len: int, buffer_tokens: int | None = None, max_open_rows: int = 256) -> None:
        self.seq_len = seq_len
        self.buffer_tokens = buffer_tokens if buffer_tokens is not None else 256 * seq_len
        self.max_open_rows = max_open_rows
        self._buffer: list[Sample] = []
        self._buffered = 0
        self._rows: dict[int, Row] = {}  # serial -> samples, open rows only
        self._spaces: list[tuple[int, int]] = []  # sorted (free tokens, serial) of open rows
        self._serial = 0

    def add(self, sample: Sample) -> list[Row]:
        if not 0 < sample.size <= self.seq_len:
            raise ValueError(f"sample of {sample.size} tokens cannot be packed into rows of {self.seq_len}")
        self._buffer.append(sample)
        self._buffered += sample.size
        return self._place() if self._buffered >= self.buffer_tokens else []

    def finish(self) -> list[Row]:
        done = self._place()
        done += [self._rows.pop(serial) for serial in sorted(self._rows)]
        self._spaces.clear()
        return done

    def _place(self) -> list[Row]:
        finished: list[int] = []
        buffer = self._buffer
        for i in sorted(range(len(buffer)), key=lambda i: (-buffer[i].size, i)):
            sample = buffer[i]
            n = sample.size
            j = bisect_left(self._spaces, (n, -1))
            if j < len(self._spaces):
                space, serial = self._spaces.pop(j)
                self._rows[serial].append(sample)
            else:
                space, serial = self.seq_len, self._serial
                self._serial += 1
                self._rows[serial] = [sample]
            if space - n > 0:
                insort(self._spaces, (space - n, serial))
            else:
                finished.append(serial)
        self._buffer.clear()
        self._buffered = 0
        excess = len(self._spaces) - self.max_open_rows
        if excess > 0:
            finished += [serial for _, serial in self._spaces[:excess]]
            del self._spaces[:excess]
        return [self._rows.pop(serial) for serial in sorted(finished)]
