"""Category specificity (interscope._specificity): exact answers on constructed interactions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from interscope import category_specificity


def _values(*pairs: list[float]) -> np.ndarray:
    """(samples, 1 order, pairs) from one list of per-sample values per pair."""
    return np.asarray(pairs, dtype=np.float64).T[:, None, :]


def test_one_pair_eta_squared_chance_and_adjusted_by_hand() -> None:
    # Values 1, 3 | 5, 7: grand mean 4, SS_total 20, class means 2 and 6, SS_between 16.
    result = category_specificity(_values([1, 3, 5, 7]), [0, 0, 1, 1])
    assert result.eta_squared == pytest.approx([0.8])
    assert result.chance == pytest.approx(1 / 3)  # (K-1)/(n-1)
    # epsilon^2 = 1 - (n-1)/(n-K) * SS_within/SS_total = 1 - 1.5 * 4/20.
    assert result.adjusted == pytest.approx([0.7])
    np.testing.assert_array_equal(result.classes, [0, 1])
    np.testing.assert_array_equal(result.class_counts, [2, 2])
    np.testing.assert_allclose(result.class_means[:, 0, 0], [2.0, 6.0])


def test_pairs_pool_their_sums_of_squares() -> None:
    # The second pair varies (SS_total 4) but not with class (SS_between 0): 16 / (20 + 4).
    # The third never varies and adds nothing to either sum.
    values = _values([1, 3, 5, 7], [1, -1, 1, -1], [2, 2, 2, 2])
    result = category_specificity(values, [0, 0, 1, 1])
    assert result.eta_squared == pytest.approx([2 / 3])


def test_zero_when_every_class_shares_the_pattern() -> None:
    rng = np.random.default_rng(0)
    shared = rng.normal(size=(3, 4, 5))  # three samples' patterns, 4 orders, 5 pairs
    values = np.concatenate([shared, shared])  # class 0 and class 1 hold the same samples
    result = category_specificity(values, [0, 0, 0, 1, 1, 1])
    np.testing.assert_allclose(result.eta_squared, 0.0, atol=1e-15)
    np.testing.assert_allclose(result.adjusted, -result.chance / (1 - result.chance))


def test_one_when_samples_equal_their_class_pattern() -> None:
    rng = np.random.default_rng(1)
    patterns = rng.normal(size=(3, 4, 6))  # per class, 4 orders, 6 pairs
    labels = np.array([0, 1, 2, 0, 1, 2, 2])
    result = category_specificity(patterns[labels], labels)
    np.testing.assert_allclose(result.eta_squared, 1.0)
    np.testing.assert_allclose(result.adjusted, 1.0)
    np.testing.assert_allclose(result.class_means, patterns)


def test_a_set_share_of_variance_per_order() -> None:
    # Sample = class effect + within-class deviation orthogonal to it: for order l the class
    # effect is scaled so that it explains exactly share[l] of the total.
    share = np.array([0.1, 0.5, 0.9])
    labels = np.repeat([0, 1, 2], 4)
    rng = np.random.default_rng(2)
    effect = rng.normal(size=(3, 8))
    effect -= effect.mean(axis=0)  # class effects sum to 0 (equal class sizes)
    noise = rng.normal(size=(12, 8))
    for c in range(3):  # within-class deviations of mean 0
        noise[labels == c] -= noise[labels == c].mean(axis=0)
    ss_between = 4 * (effect**2).sum()
    ss_within = (noise**2).sum()
    scale = np.sqrt(share / (1 - share) * ss_within / ss_between)
    values = scale[None, :, None] * effect[labels][:, None, :] + noise[:, None, :]
    result = category_specificity(values, labels)
    np.testing.assert_allclose(result.eta_squared, share)
    np.testing.assert_allclose(result.adjusted, 1 - (11 / 9) * (1 - share))


def test_chance_is_the_exact_mean_over_every_relabelling() -> None:
    # The permutation mean of eta^2 is (K-1)/(n-1) whatever the data: so the adjusted score
    # averages to exactly 0 over shuffled labels.
    rng = np.random.default_rng(3)
    values = rng.normal(size=(6, 2, 3)) * np.array([1.0, 5.0, 0.1])
    labels = np.array([0, 0, 1, 1, 2, 2])
    etas = [
        category_specificity(values[list(p)], labels).eta_squared
        for p in itertools.permutations(range(6))
    ]
    np.testing.assert_allclose(np.mean(etas, axis=0), 2 / 5)


def test_undefined_cases_are_nan_not_errors() -> None:
    values = np.arange(12.0).reshape(4, 1, 3)
    assert np.isnan(category_specificity(values, [3, 3, 3, 3]).eta_squared).all()  # one class
    assert np.isnan(category_specificity(values, [0, 1, 2, 3]).adjusted).all()  # K = n
    flat = category_specificity(np.ones((4, 2, 3)), [0, 0, 1, 1])
    assert np.isnan(flat.eta_squared).all()  # nothing varies
    with pytest.raises(ValueError, match="one label per sample"):
        category_specificity(values, [0, 1])


def test_jackknife_stderr_matches_leaving_each_sample_out_by_hand() -> None:
    rng = np.random.default_rng(4)
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 3])  # class 3 has one sample: K drops to 3
    values = rng.normal(size=(10, 3, 5)) + 2.0 * labels[:, None, None] * rng.normal(size=(3, 5))
    result = category_specificity(values, labels)
    left_out = np.array(
        [
            category_specificity(np.delete(values, i, axis=0), np.delete(labels, i)).adjusted
            for i in range(10)
        ]
    )
    expected = np.sqrt(9 / 10 * ((left_out - left_out.mean(axis=0)) ** 2).sum(axis=0))
    np.testing.assert_allclose(result.adjusted_stderr, expected, rtol=1e-10)
    assert (result.adjusted_stderr > 0).all()
