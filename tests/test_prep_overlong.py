"""``--overlong``: every packed sample holds tokens of one record only, whatever the mode and the row length.

A reference prep with rows long enough for every record gives each record's whole tokens and loss targets;
in the runs under test each packed segment must then be, for its own task, a record's first ``seq_len``
tokens (``truncate``), a record's end (``truncate-left``) or a whole record (``drop``), each record used at
most once. A segment that ran on into the next sample of its batch (issue 22, item 1) matches no record.
Tokenizer batches of a few records put truncated samples at batch ends, where the old overshoot crashed.
"""
from __future__ import annotations

import itertools
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from mftcoder_coba.data import PackedDataset
from mftcoder_coba.data_prep.pipeline import PrepOptions, prepare
from mftcoder_coba.demo_data import DEMO_TASKS, TOKENIZER_DIR

GPT2 = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "gpt2"
RECORDS_PER_TASK = 120
Segment = tuple[int, tuple[int, ...], tuple[int, ...]]  # task id, token ids, labels but the segment's last


def _corpus(tmp_path: Path) -> dict[str, Path]:
    """The first records of each shipped demo task (all four record shapes of the demo corpus)."""
    tasks = {}
    for name, path in DEMO_TASKS.items():
        with open(path, encoding="utf-8") as src:
            lines = list(itertools.islice(src, RECORDS_PER_TASK))
        tasks[name] = tmp_path / f"{name}.jsonl"
        tasks[name].write_text("".join(lines), encoding="utf-8")
    return tasks


def _segments(out: Path) -> list[Segment]:
    """Every packed sample of both splits."""
    found = []
    for split in ("train", "valid"):
        ds = PackedDataset(out / split)
        if not len(ds):
            continue
        rows = ds.rows(np.arange(len(ds)))
        for ids, labels, pos, tasks in zip(rows["input_ids"], rows["labels"], rows["position_ids"], rows["task_ids"]):
            starts = np.flatnonzero(pos == 0).tolist() + [len(ids)]
            for a, b in zip(starts[:-1], starts[1:]):
                if tasks[a] >= 0:
                    assert (tasks[a:b] == tasks[a]).all()
                    found.append((int(tasks[a]), tuple(ids[a:b].tolist()), tuple(labels[a:b - 1].tolist())))
    return found


def _owner(segment: Segment, records: list[Segment], used: set[int], mode: str, seq_len: int) -> int | None:
    """The unused record of the segment's task that the segment is the expected part of, if any."""
    task, ids, labels = segment
    n = len(ids)
    for k, (rtask, rids, rlabels) in enumerate(records):
        if k in used or rtask != task or len(rids) < n:
            continue
        # truncate keeps a record's start; truncate-left its end, or, for a last reply longer than the row,
        # seq_len tokens from just before that reply; a sample cut before its record's end has no target
        # for its last token
        offsets = range(len(rids) - n + 1) if mode == "truncate-left" else [0]
        for at in offsets:
            ends = at + n == len(rids)
            if (ends or n == seq_len) and rids[at:at + n] == ids and rlabels[at:at + n - 1] == labels:
                return k
    return None


@pytest.mark.parametrize(("tokenizer", "seq_lens"), [(TOKENIZER_DIR, (110, 128, 150)), (GPT2, (128, 150, 180))],
                         ids=["demo", "gpt2"])
def test_no_packed_sample_holds_tokens_of_another_record(tmp_path: Path, tokenizer: Path, seq_lens) -> None:
    tasks = _corpus(tmp_path)
    common = {"tasks": tasks, "tokenizer": tokenizer, "valid_samples_per_task": 5, "progress": False,
              "batch_records": 7}
    whole = prepare(PrepOptions(out=tmp_path / "whole", seq_len=4096, overlong="drop", **common))
    assert not any(s["truncated"] or s["dropped"] for s in whole["task_stats"].values())
    records = _segments(tmp_path / "whole")
    assert len(records) == 4 * RECORDS_PER_TASK
    records.sort(key=lambda r: -len(r[1]))  # longest first, so a prefix is matched to a record, not a shorter copy
    by_task = defaultdict(list)
    for r in records:
        by_task[r[0]].append(r)
    lengths = [len(r[1]) for r in records]
    for seq_len, mode in itertools.product(seq_lens, ("truncate", "truncate-left", "drop")):
        out = tmp_path / f"{mode}-{seq_len}"
        prepare(PrepOptions(out=out, seq_len=seq_len, overlong=mode, **common))
        stats = [s for split in ("train", "valid")
                 for s in json.loads((out / split / "manifest.json").read_text())["task_stats"].values()]
        cut = sum(s["truncated"] + sum(s["dropped"].values()) for s in stats)
        assert cut == sum(n > seq_len for n in lengths) > 0, (mode, seq_len)
        used: dict[int, set[int]] = defaultdict(set)
        for segment in _segments(out):
            own = by_task[segment[0]]
            k = _owner(segment, own, used[segment[0]], mode, seq_len)
            assert k is not None, (f"{mode} at {seq_len}: a packed sample of {len(segment[1])} tokens is no "
                                   "record's own part")
            used[segment[0]].add(k)
            if mode == "drop":
                assert len(own[k][1]) <= seq_len
        kept = sum(len(u) for u in used.values())
        dropped = sum(sum(s["dropped"].values()) for s in stats)
        assert kept + dropped == len(records), (mode, seq_len)
