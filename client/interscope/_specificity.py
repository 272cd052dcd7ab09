"""Category specificity of pairwise interactions (docs/interactions.md), shared by SDK and server.

The paper claims adversarially trained networks owe their robustness to *category-specific*
low-order interactions. We measure that per order m as the share of the variance of the
per-pair interactions I^(m)(i,j) across samples that the samples' classes explain: a one-way
ANOVA per pair, pooled over pairs,

    eta^2(m) = sum_pairs SS_between / sum_pairs SS_total   (in [0, 1]),

the trace ratio of between-class to total scatter of the (pairs,) pattern vector. Pooling
weights each pair by its variance, so pairs that hardly vary (and carry mostly estimation noise)
do not count as much as the pairs that make up the pattern.

eta^2 is above 0 even when labels say nothing: under shuffled labels its expected value is
exactly chance = (K-1)/(n-1) for K classes among n samples, whatever the data (the permutation
mean of a between-group sum of squares is (K-1)/(n-1) of the total). The adjusted score
(eta^2 - chance) / (1 - chance) is Kelley's epsilon^2 = 1 - (n-1)/(n-K) * SS_within / SS_total;
it is 0 in expectation under shuffled labels and 1 when within-class variance is 0, and may be
slightly negative. Both live here, in the package the server imports too, so the SDK's summary
(recomputed from sample results) and the server's compute the same numbers with the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class CategorySpecificity:
    """Per order (indexed like the audit's orders): how class-specific the pair pattern is.

    eta_squared (L,) in [0, 1] and adjusted (L,) = (eta^2 - chance) / (1 - chance); NaN where
    undefined (fewer than 2 classes, as many classes as samples, or no variance at all).
    classes (K,) ascending labels with class_counts (K,); class_means (K, L, k) is each class's
    mean I^(m)(i,j) over its samples, for the pairs (k, 2).
    """

    eta_squared: np.ndarray
    adjusted: np.ndarray
    #: Jackknife (leave one sample out) standard error of `adjusted`, (L,); NaN below 3 samples.
    adjusted_stderr: np.ndarray
    chance: float
    n_samples: int
    classes: np.ndarray
    class_counts: np.ndarray
    pairs: np.ndarray
    class_means: np.ndarray


def category_specificity(
    values: npt.ArrayLike, labels: npt.ArrayLike, pairs: npt.ArrayLike | None = None
) -> CategorySpecificity:
    """Specificity of `values` (n samples, L orders, k pairs) under `labels` (n,).

    Raises ValueError when the shapes disagree.
    """
    y = np.asarray(values, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if y.ndim != 3 or labels.shape != (y.shape[0],):
        raise ValueError(
            f"values must be (samples, orders, pairs) with one label per sample; got "
            f"{y.shape} and {labels.shape}"
        )
    n, n_orders, k = y.shape
    pair_array = np.zeros((k, 2), np.int64) if pairs is None else np.asarray(pairs, np.int64)
    classes, index, counts = np.unique(labels, return_inverse=True, return_counts=True)
    means = np.zeros((len(classes), n_orders, k))
    np.add.at(means, index, y)
    means /= np.maximum(counts, 1)[:, None, None]
    nan = np.full(n_orders, np.nan)
    if n < 2 or len(classes) < 2 or len(classes) >= n:
        return CategorySpecificity(
            nan, nan.copy(), nan.copy(), np.nan, n, classes, counts, pair_array, means
        )
    grand = y.mean(axis=0)  # (L, k)
    total = ((y - grand) ** 2).sum(axis=(0, 2))  # (L,)
    between = (counts[:, None, None] * (means - grand) ** 2).sum(axis=(0, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        eta = np.where(total > 0, np.clip(between / total, 0.0, 1.0), np.nan)
    chance = (len(classes) - 1) / (n - 1)
    adjusted = (eta - chance) / (1.0 - chance)
    se = _jackknife_se(y - grand, index, counts, means - grand)
    return CategorySpecificity(eta, adjusted, se, chance, n, classes, counts, pair_array, means)


def _jackknife_se(
    y: np.ndarray, index: np.ndarray, counts: np.ndarray, means: np.ndarray
) -> np.ndarray:
    """Leave-one-out standard error of epsilon^2 from running sums: O(n L k), not O(n^2 L k).

    y (n, L, k) centred on the grand mean, means (K, L, k) centred the same way. Without
    sample i (class c, n_c members) the sums of squares are, per (order, pair),
        total_i  = sum y^2 - y_i^2 - (S - y_i)^2 / (n - 1)            (S = sum y = 0 here)
        within_i = within - (Q_c - S_c^2/n_c) + (Q_c - y_i^2 - (S_c - y_i)^2/(n_c - 1))
    with S_c, Q_c the class's sums of y and y^2; a class left empty drops out of K.
    """
    n = y.shape[0]
    if n < 3:
        return np.full(y.shape[1], np.nan)
    sums = counts[:, None, None] * means  # S_c
    squares = np.zeros_like(means)
    np.add.at(squares, index, y**2)  # Q_c
    within_c = (squares - sums**2 / counts[:, None, None]).sum(axis=2)  # (K, L)
    within = within_c.sum(axis=0)  # (L,)
    own = (y**2).sum(axis=2)  # (n, L): sum over pairs of y_i^2
    total = own.sum(axis=0)[None, :] - n / (n - 1) * own  # S = 0: total_i = Q - y_i^2 n/(n-1)
    n_c = counts[index]  # (n,)
    rest = np.maximum(n_c - 1, 1)[:, None, None]
    left = squares[index] - y**2 - (sums[index] - y) ** 2 / rest  # class c without sample i
    left = np.where((n_c > 1)[:, None, None], left, 0.0).sum(axis=2)  # (n, L)
    within_i = within[None, :] - within_c[index] + left
    k_i = len(counts) - (n_c == 1)  # (n,)
    scale = (n - 2) / np.maximum(n - 1 - k_i, 1)  # (n-1 samples - 1) / (n-1 samples - K_i)
    with np.errstate(invalid="ignore", divide="ignore"):
        adjusted_i = 1.0 - scale[:, None] * within_i / total
        adjusted_i = np.where((k_i >= 2)[:, None] & (n - 1 > k_i)[:, None], adjusted_i, np.nan)
        spread = ((adjusted_i - adjusted_i.mean(axis=0)) ** 2).sum(axis=0)
    return np.sqrt((n - 1) / n * spread)
