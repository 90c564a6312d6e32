"""pass@k with the unbiased estimator of Chen et al. (2021), "Evaluating Large Language Models Trained on Code".

Drawing k of a problem's n samples without replacement, the chance that at least one of the c correct ones
is among them is ``1 - C(n-c, k) / C(n, k)``. The binomials overflow for n in the hundreds, so the ratio is
computed as the product ``prod_{i=n-c+1}^{n} (1 - k/i)``, which is the same number and stays in [0, 1].
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``c`` correct samples out of ``n``; needs ``1 <= k <= n``."""
    if not 0 <= c <= n:
        raise ValueError(f"correct samples c={c} must lie in [0, n={n}]")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n (n={n} samples per problem)")
    if n - c < k:  # every draw of k samples holds a correct one
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def mean_pass_at_k(results: Iterable[tuple[int, int]], ks: Sequence[int]) -> dict[str, float]:
    """``{"pass@k": mean over problems}`` for every k in ``ks`` from per-problem ``(n, c)`` pairs."""
    pairs = list(results)
    if not pairs:
        raise ValueError("no problems to score")
    return {f"pass@{k}": float(np.mean([pass_at_k(n, c, k) for n, c in pairs])) for k in ks}
