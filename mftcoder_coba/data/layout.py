"""Binary shard layout of a prepared split, and the checks a shard is held to.

A shard is a flat file of fixed-size row records (a NumPy structured dtype), so a reader memory-maps it
and gathers any rows with one fancy index, and a row's place on disk is ``row * itemsize``. Per token a
row stores the input id, a loss flag (1 where the *next* token is a loss target of the same sample, which is
all that is needed to derive labels), the task id (-1 on padding) and the position id (restarting at 0 for
every sample; padding forms its own segment). Ids take 2 bytes when the vocabulary fits, positions 2 bytes
when ``seq_len`` does. Prep's writer (``data_prep.shards.ShardWriter``) and the reader
(:class:`mftcoder_coba.data.PackedDataset`) both take the layout from here.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

SHARD_NAME = "shard-{:05d}.bin"
FIELDS = ("input_ids", "loss", "task_ids", "position_ids")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja",
                   "chat_template.json", "config.json")
"""The tokenizer files prep copies beside the splits (``OUT/tokenizer``) and the only ones a reader hands on;
any other file in that folder is never copied or read."""


def field_dtypes(vocab_size: int, seq_len: int, num_tasks: int) -> dict[str, str]:
    """The narrowest dtypes that hold every value of this dataset, written to the manifest."""
    return {
        "input_ids": "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "int32",
        "loss": "uint8",
        "task_ids": "int16" if num_tasks < np.iinfo(np.int16).max else "int32",
        "position_ids": "uint16" if seq_len <= np.iinfo(np.uint16).max + 1 else "int32",
    }


def row_dtype(dtypes: dict[str, str], seq_len: int) -> np.dtype:
    """The record of one row, from the manifest's ``dtypes``."""
    return np.dtype([(name, np.dtype(dtypes[name]), (seq_len,)) for name in FIELDS])


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
