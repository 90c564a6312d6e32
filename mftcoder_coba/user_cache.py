"""Where the project keeps what it may recompute: ``$XDG_CACHE_HOME/mftcoder-coba/NAME`` (``~/.cache/...`` when
the variable is unset or empty).

Every cache under it is an optimisation only: a file that cannot be read, parsed or written means the work is
done again, never an error and never a skipped check.
"""
from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir(name: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mftcoder-coba" / name
