"""The unbiased pass@k estimator against hand computations and the binomial formula."""
from __future__ import annotations

import math

import pytest

from mftcoder_coba.evaluation import mean_pass_at_k, pass_at_k


def test_hand_computation_n5_c2() -> None:
    # 1 - C(3,k)/C(5,k): k=1: 1 - 3/5; k=2: 1 - 3/10; k=5: C(3,5) = 0, every draw holds a correct sample
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4, abs=1e-15)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7, abs=1e-15)
    assert pass_at_k(5, 2, 5) == 1.0
    assert pass_at_k(5, 0, 5) == 0.0 and pass_at_k(5, 5, 1) == 1.0


@pytest.mark.parametrize("n,c,k", [(200, 3, 1), (200, 3, 10), (200, 3, 100), (1000, 17, 50), (20, 19, 2)])
def test_product_form_equals_binomials_where_they_fit(n: int, c: int, k: int) -> None:
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)


def test_k_must_not_exceed_n_and_mean_over_problems() -> None:
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(5, 2, 6)
    with pytest.raises(ValueError, match=r"c=6"):
        pass_at_k(5, 6, 1)
    assert mean_pass_at_k([(5, 2), (5, 0)], [1, 2]) == {"pass@1": pytest.approx(0.2), "pass@2": pytest.approx(0.35)}
