"""``manifest.json``: what a split holds, how it was made, and how to check it.

Written last by prep, after every shard is complete, so a manifest beside shards means the shards are whole.
Readers (:class:`mftcoder_coba.data.PackedDataset`, ``inspect``, ``verify``) go through :func:`load`,
which refuses unknown formats and names the file and the missing key instead of failing later.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mftcoder_coba.errors import UserError

FORMAT = "mftcoder-coba-packed"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED = ("format", "format_version", "split", "seq_len", "num_rows", "dtypes", "pad_token_id", "tokenizer",
            "tasks", "task_stats", "shards")


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
