"""Checks of PAPER.md identities 1-5 on an exact computation, shared by the engine tests."""

from __future__ import annotations

import itertools
from math import factorial

import numpy as np
import pytest

from interscope_server.analysis.exact import ExactInteractions


def check_identities(e: ExactInteractions, atol: float) -> None:
    """Identities 1-5 of PAPER.md, each against an independent formula."""
    n, v = e.n, e.values
    inter = e.interactions

    # 1. SII from its own definition: sum_S |S|!(n-|S|-2)!/(n-1)! Delta v(i,j,S).
    sii = np.zeros((n, n))
    for i, j in itertools.combinations(range(n), 2):
        rest = [k for k in range(n) if k not in (i, j)]
        for m in range(n - 1):
            w = factorial(m) * factorial(n - m - 2) / factorial(n - 1)
            for s in itertools.combinations(rest, m):
                b = sum(1 << k for k in s)
                dv = v[b | 1 << i | 1 << j] - v[b | 1 << i] - v[b | 1 << j] + v[b]
                sii[i, j] += w * dv
    sii = sii + sii.T
    np.testing.assert_allclose(e.shapley_interaction, sii, atol=atol)
    np.testing.assert_allclose(e.shapley_interaction, inter.sum(axis=0) / (n - 1), atol=atol)

    # 2. Efficiency: v(N) - v(0) = sum mu_i + sum_{i != j} sum_m (n-1-m)/(n(n-1)) I^(m)(i,j).
    weights = (n - 1 - np.arange(n - 1)) / (n * (n - 1))
    assert weights.sum() == pytest.approx(0.5)
    rhs = (v[1 << np.arange(n)] - v[0]).sum() + np.einsum("m,mij->", weights, inter)
    assert v[-1] - v[0] == pytest.approx(rhs, abs=atol)
    assert abs(e.efficiency_residual()) < atol

    # 3. Order-wise Shapley from its definition, Shapley values, and their efficiency.
    for i in range(n):
        rest = [k for k in range(n) if k != i]
        for m in range(n):
            marg = [
                v[sum(1 << k for k in s) | 1 << i] - v[sum(1 << k for k in s)]
                for s in itertools.combinations(rest, m)
            ]
            assert e.order_shapley[m, i] == pytest.approx(np.mean(marg), abs=atol)
    np.testing.assert_allclose(e.shapley_values, e.order_shapley.sum(axis=0) / n, atol=atol)
    assert e.shapley_values.sum() == pytest.approx(v[-1] - v[0], abs=atol)

    # 4. Recurrence: phi^(m+1)(i) - phi^(m)(i) = mean_{j != i} I^(m)(i,j).
    step = e.order_shapley[1:] - e.order_shapley[:-1]
    np.testing.assert_allclose(step, inter.sum(axis=2) / (n - 1), atol=atol)

    # 5. Symmetry (linearity and dummies are tested on games built for them).
    np.testing.assert_allclose(inter, inter.transpose(0, 2, 1), atol=0)
