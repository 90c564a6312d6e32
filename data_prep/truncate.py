"""``--overlong truncate-left``: which tokens of an overlong sample to keep when the answer must stay.

The kept window ends where the sample ends (with the last reply and its end marker) and starts as late as
it has to: at the first round boundary (just after an earlier reply's end marker) that leaves the rest
within ``seq_len``, so earlier turns are cut whole, oldest first (the system prompt counts as the oldest
context); when even the last prompt does not fit, inside it, cutting its start. A last reply longer than
the row on its own keeps its start (and one token of context before it, so its first token is a target).
"""
from __future__ import annotations

import numpy as np


def left_cut(mask: np.ndarray, seq_len: int) -> int:
    """Tokens to drop from the start of a sample with loss flags ``mask`` longer than ``seq_len``."""
    lowest = len(mask) - seq_len
    flags = mask.astype(bool)
    rising = np.flatnonzero(flags[1:] & ~flags[:-1]) + 1  # where a reply starts (after context)
    last_reply = int(rising[-1]) if rising.size else 0
    if lowest >= last_reply:
        return max(last_reply - 1, 0)
    boundaries = np.flatnonzero(flags[:-1] & ~flags[1:]) + 1  # just after a reply ends
    fitting = boundaries[(boundaries >= lowest) & (boundaries < last_reply)]
    return int(fitting[0]) if fitting.size else lowest
