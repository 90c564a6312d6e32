"""Per-task mixing: exact exposure counts, seeded subsets, held-out records never repeated into training,
recorded in the manifest and shown by inspect; ``--overlong truncate-left`` keeps the answer."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from prep_helpers import packed_samples

from mftcoder_coba.commands.prep import parse_mix
from mftcoder_coba.data import PackedDataset
from mftcoder_coba.data_prep.pipeline import PrepOptions, prepare
from mftcoder_coba.data_prep.report import mix_and_fim_lines
from mftcoder_coba.data_prep.tokens import load_tokenizer
from mftcoder_coba.data_prep.truncate import left_cut
from mftcoder_coba.demo_data import TOKENIZER_DIR
from mftcoder_coba.errors import UserError

EOS = "<|im_end|>"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER_DIR)


def _data(tmp_path: Path, name: str, n: int) -> Path:
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{name} question {i}", "answer": f"{name} answer {i}"}) + "\n"
                            for i in range(n)))
    return path


def _seen(out: Path, split: str, tokenizer) -> Counter:
    """How many times each (task, record number) appears in a split, read back from the packed rows."""
    found = Counter()
    for text, _ in packed_samples(PackedDataset(out / split), tokenizer):
        task, i = re.search(r"(\w+) question (\d+)", text).groups()
        found[task, int(i)] += 1
    return found


def _prep(tmp_path: Path, out: str, mix: dict, **kw) -> dict:
    tasks = {"a": _data(tmp_path, "a", 40), "b": _data(tmp_path, "b", 40), "c": _data(tmp_path, "c", 40),
             "d": _data(tmp_path, "d", 40)}
    return prepare(PrepOptions(tasks=tasks, tokenizer=TOKENIZER_DIR, seq_len=128, out=tmp_path / out,
                               valid_samples_per_task=4, progress=False, mix=mix, **kw))


def test_mix_counts_and_no_train_held_out_leakage(tmp_path, tokenizer):
    manifest = _prep(tmp_path, "out", {"a": 2, "b": 0.5, "c": 1.5})
    train, valid = _seen(tmp_path / "out", "train", tokenizer), _seen(tmp_path / "out", "valid", tokenizer)
    for task in "abcd":
        held = {i for t, i in valid if t == task}
        times = Counter(n for (t, _), n in train.items() if t == task)
        assert len(held) == 4 and all(valid[task, i] == 1 for i in held)
        assert not held & {i for t, i in train if t == task}  # a repeated record is never on both sides
        expected = {"a": {2: 36}, "b": {1: 18}, "c": {1: 18, 2: 18}, "d": {1: 36}}[task]
        assert dict(times) == expected, task
    stats = manifest["task_stats"]
    assert [stats[t]["samples"] for t in "abcd"] == [72, 18, 54, 36]
    assert manifest["mix"] == {"a": {"factor": 2.0, "records": 36, "samples": 72},
                               "b": {"factor": 0.5, "records": 36, "samples": 18},
                               "c": {"factor": 1.5, "records": 36, "samples": 54}}
    assert manifest["arguments"]["mix"] == {"a": 2.0, "b": 0.5, "c": 1.5}
    assert "mix" not in json.loads((tmp_path / "out" / "valid" / "manifest.json").read_text())
    assert mix_and_fim_lines(manifest)[0] == "mix: task 'a' x2: 36 training records -> 72 samples"
    # the seeded half is the same for the same seed, another for another seed
    _prep(tmp_path, "again", {"a": 2, "b": 0.5, "c": 1.5})
    assert _seen(tmp_path / "again", "train", tokenizer) == train
    _prep(tmp_path, "other_seed", {"b": 0.5}, seed=99)
    other = _seen(tmp_path / "other_seed", "train", tokenizer)
    assert {i for t, i in other if t == "b"} != {i for t, i in train if t == "b"}


def test_mix_errors(tmp_path):
    assert parse_mix("a=1.5") == ("a", 1.5)
    for bad in ("a", "a=0", "a=-1", "a=x", "=2", "a=inf"):
        with pytest.raises(UserError, match=r"expected NAME=FACTOR with FACTOR > 0"):
            parse_mix(bad)
    with pytest.raises(UserError, match=r"^--mix: no task named 'zzz'"):
        _prep(tmp_path, "out", {"zzz": 2})
    with pytest.raises(UserError, match=r"^--mix: task 'a': FACTOR must be a number > 0, got 0"):
        _prep(tmp_path, "out", {"a": 0})
    with pytest.raises(UserError, match=r"task 'a': 0 training rows"):  # 0.01 of 36 records is none
        _prep(tmp_path, "out", {"a": 0.01})
    assert not (tmp_path / "out").exists()


def test_left_cut_drops_whole_earlier_turns_first_then_the_prompt_start():
    # context 0-3, reply 4-5, context 6-9, reply 10-11: a 12-token sample
    mask = np.array([0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1], dtype=np.uint8)
    assert left_cut(mask, 11) == 6  # the first round goes whole (not just its first token)
    assert left_cut(mask, 6) == 6   # exactly the last round
    assert left_cut(mask, 4) == 8   # the last prompt's start is cut
    assert left_cut(mask, 2) == 9   # the reply alone: one context token kept so its first token is a target
    assert left_cut(np.ones(12, dtype=np.uint8), 5) == 0  # text: nothing to keep but the start


def test_truncate_left_keeps_the_answer_and_is_counted(tmp_path, tokenizer):
    long_context = " ".join(f"word{i}" for i in range(150))
    records = [{"chat_rounds": [{"role": "user", "content": f"old {long_context}"},
                                {"role": "assistant", "content": "old reply"},
                                {"role": "user", "content": "new question"},
                                {"role": "assistant", "content": f"new reply {i}"}]} for i in range(6)]
    records.append({"prompt": f"{long_context} tail", "answer": "short answer"})  # one long prompt
    records.append({"prompt": "hi", "answer": "there"})  # fits: the right-truncated run keeps a training row
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    common = {"tasks": {"t": data}, "tokenizer": TOKENIZER_DIR, "seq_len": 64, "valid_samples_per_task": 0,
              "progress": False}
    left = prepare(PrepOptions(out=tmp_path / "left", overlong="truncate-left", **common))
    right = prepare(PrepOptions(out=tmp_path / "right", **common))
    assert left["task_stats"]["t"]["truncated"] == 7 and not left["task_stats"]["t"]["dropped"]
    assert right["task_stats"]["t"]["dropped"] == {"no_loss_after_truncation": 7}  # the answers were cut off
    samples = packed_samples(PackedDataset(tmp_path / "left" / "train"), tokenizer)
    chats = [(text, loss) for text, loss in samples if "new reply" in text]
    assert len(chats) == 6
    for text, loss in chats:
        # the whole first round is gone (the cut is right after its reply's end marker, before the template's
        # newline between turns)
        assert text.startswith("\n<|im_start|>user\nnew question")
        assert re.fullmatch(r"new reply \d<\|im_end\|>", loss)
    (prompt_cut, loss), = [(text, loss) for text, loss in samples if "short answer" in text]
    assert loss == "short answer" + EOS and "tail" in prompt_cut and "word0 " not in prompt_cut
    assert json.loads((tmp_path / "left" / "train" / "manifest.json").read_text())["arguments"]["overlong"] == \
        "truncate-left"
