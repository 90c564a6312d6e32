"""Shard checksums checked before every training run, cheaply: each shard is hashed once, then remembered.

Why: one flipped byte in a shard trained silently (``mftcoder-coba verify`` caught it, ``train`` did not).
Hashing every shard at every start would cost minutes on a large corpus, so the verified state of each shard
is recorded in a small cache file in the user's cache directory (``$XDG_CACHE_HOME`` or ``~/.cache``, under
``mftcoder-coba/verified/``; never beside the shards, whose folders may be read-only): its absolute path,
size, mtime_ns, ctime_ns, device, inode and the manifest's sha256 entry. A shard is hashed again only when any
of them changes. ctime is part of it because mtime can be set back (``touch -d``) and ctime cannot, so an
edited file is always hashed again; copying or moving a dataset also means hashing it once more.

If the cache cannot be read or written, every shard is hashed (the check is never skipped). Several ranks
may verify at once: each writes the whole cache file under a hidden temporary name and renames it into place
(:func:`mftcoder_coba.atomic.atomic_write_text`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from mftcoder_coba.atomic import atomic_write_text
from mftcoder_coba.data import PackedDataset
from mftcoder_coba.data.layout import shard_problem
from mftcoder_coba.errors import UserError
from mftcoder_coba.user_cache import user_cache_dir

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/mftcoder-coba/verified`` (:func:`mftcoder_coba.user_cache.user_cache_dir`)."""
    return user_cache_dir("verified")


def _state(file: Path, sha256: str) -> dict[str, Any]:
    st = file.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "dev": st.st_dev,
            "inode": st.st_ino, "sha256": sha256}


def _cache_file(split: Path) -> Path:
    return cache_dir() / (hashlib.sha256(str(split).encode("utf-8")).hexdigest()[:32] + ".json")


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data.get("shards", {}) if isinstance(data, dict) and isinstance(data.get("shards"), dict) else {}


def _write(path: Path, split: Path, shards: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"split": str(split), "shards": shards}, indent=1))
    except OSError as exc:
        log.warning("could not record verified shards in %s (%s); they will be hashed again next time", path, exc)


def verify_split(dataset: PackedDataset) -> int:
    """Check every shard of ``dataset`` against its manifest checksum and scan its ids (input ids in the
    vocabulary, task ids in range); returns how many were checked now (the others were remembered unchanged).

    A mismatch or a bad id is one :class:`UserError` naming the shard file (and the row)."""
    split = dataset.path.resolve()
    cache = _cache_file(split)
    known = _read(cache)
    verified: dict[str, Any] = {}
    hashed, hashed_bytes, start = 0, 0, time.perf_counter()
    for index, entry in enumerate(dataset.manifest["shards"]):
        file = split / entry["file"]
        key = str(file)
        try:
            state = _state(file, entry["sha256"])
        except OSError:
            state = None
        if state is None or known.get(key) != state:
            problem = shard_problem(file, entry)
            if problem:
                raise UserError(f"{problem}; the split {split} does not match its manifest (run `mftcoder-coba "
                                "verify` on the prepared folder and prepare the data again)")
            dataset.check_shard_ids(index)  # the file is in the page cache now: the id scan costs little
            hashed += 1
            hashed_bytes += state["size"] if state else 0
            if state != _state(file, entry["sha256"]):  # changed while being hashed: not remembered
                continue
        verified[key] = state
    if hashed:
        seconds = time.perf_counter() - start
        log.log(logging.INFO if seconds >= 2 else logging.DEBUG,  # a start that hashed for a while says why
                "verified %d shard(s) of %s (%.1f MB in %.1f s)", hashed, split, hashed_bytes / 1e6, seconds)
        _write(cache, split, verified)
    return hashed
