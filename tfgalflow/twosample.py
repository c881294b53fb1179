"""Two-sample tests that can fail: are samples ``a`` and ``b`` drawn from one distribution?

Every task compares a model's draws with held-out data (or two models with each other) through
this module. Each test returns a :class:`TestResult` whose p-value is calibrated under H0 (same
distribution) and small when the samples differ in a way the test can see:

=====================  ==========================================================  ============
test                   statistic                                                   p-value
=====================  ==========================================================  ============
``chi2_test``          Pearson chi^2 of the 2 x K table of RAW counts in N-D       chi^2(K - 1)
                       cells, sparse cells merged (NR 14.3.3, unequal sizes)
``ks_marginals``       KS distance of each marginal, on the samples themselves     Bonferroni
``classifier_test``    held-out AUC of a quadratic logistic regression and a kNN   Mann-Whitney
``energy_distance``    E = 2 E|X-Y| - E|X-X'| - E|Y-Y'| on standardised axes        permutation
``mmd_test``           MMD^2, Gaussian kernel, median-heuristic bandwidth          permutation
=====================  ==========================================================  ============

What each test is for (power measured in tests/test_twosample.py): a mean shift is seen by every
test, best by KS, energy distance and MMD; a width (scale) change best by the quadratic classifier
and MMD, weakly by the energy distance (its kernel -|x - y| is nearly linear at large separations)
and KS; a change of correlation with unchanged marginals is invisible to ``ks_marginals`` by
construction, weakly seen by energy and MMD with the median bandwidth, and is the job of the
quadratic classifier (its features include x_i x_j) and of chi^2 on joint cells. Run them together
with :func:`two_sample_report`.

This replaces the reference pipeline FEDHEX's checks: its chi^2 compared density-normalised
histograms (heights ~0.1-1 per bin whatever the sample size, so chi^2 ~ 0 and p ~ 1 always) and
its KS test ran on histogram bin heights; neither could ever reject.

NumPy and SciPy only: ``import tfgalflow.twosample`` does not import TensorFlow.

References: Press et al., Numerical Recipes 3rd ed. (2007) sec. 14.3; Lopez-Paz & Oquab 2017, ICLR
("Revisiting classifier two-sample tests"); Szekely & Rizzo 2004, InterStat 5 ("Testing for equal
distributions in high dimension"); Gretton et al. 2012, JMLR 13, 723 ("A kernel two-sample test");
Phipson & Smyth 2010, SAGMB 9, 39 (permutation p-values never zero).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import spatial, special, stats

from .atomic import json_ready
from .errors import InputError
from .validation import finite_matrix, integer, one_of, positive_number
from .validation import seed as check_seed

#: Names of the tests ``two_sample_report`` runs, in the order their seeds are spawned.
TESTS = ("chi2", "ks", "classifier", "energy", "mmd")
#: Classifiers of ``classifier_test``.
CLASSIFIERS = ("quadratic", "knn", "both")
#: Largest number of points per sample the permutation tests use (a random subsample beyond it):
#: the pooled N x N kernel is built in row chunks (~32 MB each), and the time grows as
#: N^2 (D + n_permutations).
MAX_PERMUTATION_SIZE = 2000
_CHUNK_ELEMENTS = 2**22          # pairwise entries per chunk of kernel rows (32 MB in float64)
_MEDIAN_HEURISTIC_POINTS = 1000  # points whose pairwise distances give the median heuristic


@dataclass(frozen=True)
class TestResult:
    """One two-sample test's outcome.

    Attributes:
        name: the test (``"chi2"``, ``"ks"``, ``"classifier"``, ``"energy"``, ``"mmd"``).
        statistic: the test statistic (its meaning is given in the test's docstring).
        p_value: probability under H0 (a and b from one distribution) of a statistic at least as
            extreme; reject at level alpha when ``p_value < alpha``.
        dof: degrees of freedom of the reference chi^2 distribution (chi^2 test only).
        extra: details for the report (per-axis values, sizes, seed, bandwidth, ...), JSON-able.
    """
    __test__ = False  # a class named Test* that pytest must not collect

    name: str
    statistic: float
    p_value: float
    dof: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python types only (NumPy scalars and arrays converted), for ``json.dump``."""
        return {"name": self.name, "statistic": float(self.statistic),
                "p_value": float(self.p_value), "dof": None if self.dof is None else int(self.dof),
                "extra": json_ready(self.extra, nonfinite_as_null=False)}


# ---- chi^2 on raw counts ------------------------------------------------------------------------

def chi2_test(a: Any, b: Any, bins: int | Sequence[Any] | None = None,
              range: Sequence[Any] | None = None, min_expected: float = 5.0) -> TestResult:
    """Two-sample chi^2 test on the raw counts of ``a`` and ``b`` in N-D cells.

    With A_i, B_i the counts of the two samples in cell i (sizes n_a = sum A_i, n_b = sum B_i,
    which may differ), the statistic is Pearson's chi^2 of the 2 x K contingency table, written as
    in Numerical Recipes eq. 14.3.3:

        chi^2 = sum_i (sqrt(n_b / n_a) A_i - sqrt(n_a / n_b) B_i)^2 / (A_i + B_i),

    referred to chi^2 with K_eff - 1 degrees of freedom, K_eff the number of cells after merging
    (the (2 - 1)(K - 1) of the contingency table; equal to scipy.stats.chi2_contingency without
    Yates' correction).

    Cells. ``bins`` per axis as in ``numpy.histogramdd``: an int (the same on every axis, e.g. 8
    -> 8 x 8 cells in 2-D), or one entry per axis, each an int or an increasing array of edges.
    None (default) takes k = min(8, max(2, floor((min(n_a, n_b) / (2 min_expected))^(1/D)))) per
    axis: 8 x 8 for two 2-D samples of >= 640 points, fewer per axis in higher dimension, so that
    the k^D cells keep about twice ``min_expected`` points of the smaller sample each. An int axis
    without ``range`` gets edges at the quantiles of the POOLED sample (equal-probability marginal
    bins; they depend on the pooled data only, which H0 leaves exchangeable, so the test stays
    calibrated). With ``range`` ([D, 2], or one (low, high) pair for all axes) an int axis gets
    equal-width edges on it. Points outside the edges (possible with ``range`` or explicit edges)
    are counted in one extra overflow cell, never dropped.

    Merging rule (it uses the pooled counts c_i = A_i + B_i only, never the labels, so it cannot
    bias the test): empty cells are dropped; a cell is sparse when its smaller expected count
    min(n_a, n_b) c_i / N is below ``min_expected``. The sparse cells are sorted by c_i (ties by
    cell index) and pooled greedily, in that order, into groups that just reach ``min_expected``;
    a last group that stays below it joins the previous group (or, if there is none, the least
    populated adequate cell). Merged cells need not be adjacent: any partition of space fixed
    before the labels are seen gives a valid chi^2 test, and grouping by count pools the tails.

    Args:
        a: [n_a, D] first sample.
        b: [n_b, D] second sample (same D).
        bins: cells per axis (see above; None: the rule above).
        range: [D, 2] lower and upper edges per axis for int ``bins`` (None: pooled quantiles).
        min_expected: smallest expected count per cell (5, the usual rule, e.g. NR 14.3).

    Returns:
        TestResult("chi2", chi^2, p, dof=K_eff - 1, extra={cells, merged cells, ...}).

    Raises:
        InputError: bad shapes, NaN/inf, bad ``bins``/``range``, or too few points for two cells.

    Example:
        >>> chi2_test(model_draws, held_out, bins=8).p_value   # 8 x 8 cells for 2-D samples
    """
    a, b = _pair(a, b)
    min_expected = positive_number(min_expected, "min_expected")
    n_a, n_b = len(a), len(b)
    if bins is None:
        per_axis = (min(n_a, n_b) / (2.0 * min_expected)) ** (1.0 / a.shape[1])
        bins = min(8, max(2, math.floor(per_axis)))
    pooled = np.concatenate([a, b])
    edges = _axis_edges(pooled, bins, range)
    cell = _cell_index(pooled, edges)
    counts_a = np.bincount(cell[:n_a], minlength=cell.max() + 1)
    counts_b = np.bincount(cell[n_a:], minlength=cell.max() + 1)
    occupied = (counts_a + counts_b) > 0
    counts_a, counts_b = counts_a[occupied], counts_b[occupied]
    group = _merge_sparse(counts_a + counts_b, min(n_a, n_b) / (n_a + n_b), min_expected)
    A, B = np.bincount(group, weights=counts_a), np.bincount(group, weights=counts_b)
    k_eff = len(A)
    if k_eff < 2:
        raise InputError(f"chi2_test: {n_a} and {n_b} points give fewer than two cells with "
                         f">= {min_expected:g} expected counts; use fewer bins or more points")
    statistic = float(np.sum((math.sqrt(n_b / n_a) * A - math.sqrt(n_a / n_b) * B) ** 2 / (A + B)))
    dof = k_eff - 1
    return TestResult("chi2", statistic, float(stats.chi2.sf(statistic, dof)), dof, {
        "n_a": n_a, "n_b": n_b, "cells_per_axis": [len(e) - 1 for e in edges],
        "cells_occupied": int(occupied.sum()), "cells_used": k_eff,
        "cells_sparse_merged": int(len(group) - np.sum(np.bincount(group) == 1)),
        "min_expected": min_expected})


def _axis_edges(pooled: np.ndarray, bins: Any, range_: Any) -> list[np.ndarray]:
    """Edges [k_d + 1] per axis: pooled quantiles, equal widths on ``range_``, or as given."""
    width = pooled.shape[1]
    if isinstance(bins, (int, np.integer)) and not isinstance(bins, (bool, np.bool_)):
        bins = [bins] * width
    if not isinstance(bins, (list, tuple)) or len(bins) != width:
        raise InputError(f"bins = {bins!r}: expected an int or one entry per axis ({width})")
    if range_ is not None:
        limits = np.asarray(range_, dtype=float)
        if limits.shape == (2,):
            limits = np.tile(limits, (width, 1))
        if limits.shape != (width, 2) or not np.all(np.isfinite(limits)) \
                or np.any(limits[:, 1] <= limits[:, 0]):
            raise InputError(f"range has shape {list(limits.shape)} or empty/non-finite limits; "
                             f"expected [{width}, 2] finite (low, high) with low < high")
    edges = []
    for d, spec in enumerate(bins):
        if isinstance(spec, (int, np.integer)) and not isinstance(spec, (bool, np.bool_)):
            k = integer(spec, f"bins[{d}]", low=1)
            if range_ is None:
                edge = np.quantile(pooled[:, d], np.linspace(0.0, 1.0, k + 1))
                edge[0], edge[-1] = -np.inf, np.inf   # every point inside, no overflow
            else:
                edge = np.linspace(limits[d, 0], limits[d, 1], k + 1)
            edges.append(np.unique(edge))            # ties in discrete data collapse bins
        else:
            edge = np.asarray(spec, dtype=float)
            if edge.ndim != 1 or edge.size < 2 or not np.all(np.isfinite(edge)) \
                    or np.any(np.diff(edge) <= 0):
                raise InputError(f"bins[{d}] must be an int or >= 2 finite increasing edges")
            edges.append(edge)
    return edges


def _cell_index(x: np.ndarray, edges: list[np.ndarray]) -> np.ndarray:
    """Flat cell index [N] of each row; rows outside the edges share overflow cell prod(k_d)."""
    shape = tuple(len(e) - 1 for e in edges)
    per_axis, outside = [], np.zeros(len(x), dtype=bool)
    for d, e in enumerate(edges):
        outside |= (x[:, d] < e[0]) | (x[:, d] > e[-1])
        per_axis.append(np.clip(np.searchsorted(e, x[:, d], side="right") - 1, 0, len(e) - 2))
    flat = np.ravel_multi_index(per_axis, shape)
    return np.where(outside, math.prod(shape), flat)


def _merge_sparse(pooled_counts: np.ndarray, smaller_fraction: float,
                  min_expected: float) -> np.ndarray:
    """Group label [K] of each occupied cell after the merging rule of ``chi2_test`` (0..K_eff-1).

    A loop over the sparse cells (not over points): the greedy pooling is sequential by nature.
    """
    expected = smaller_fraction * pooled_counts           # the smaller expected count per cell
    group = np.arange(len(pooled_counts))
    sparse = np.flatnonzero(expected < min_expected)
    if sparse.size == 0:
        return group
    order = sparse[np.argsort(pooled_counts[sparse], kind="stable")]
    member = np.empty(len(order), dtype=int)
    label, total = 0, 0.0
    for i, e in enumerate(expected[order]):
        member[i] = label
        total += e
        if total >= min_expected:                         # group complete: start the next one
            label, total = label + 1, 0.0
    if total > 0:                                         # a last group below min_expected
        if label > 0:
            member[member == label] = label - 1
        else:
            adequate = np.flatnonzero(expected >= min_expected)
            if adequate.size:                             # all sparse cells join one adequate cell
                group[order] = adequate[np.argmin(pooled_counts[adequate])]
                return np.unique(group, return_inverse=True)[1]
    group[order] = len(pooled_counts) + member            # new labels, disjoint from cell indices
    return np.unique(group, return_inverse=True)[1]


# ---- KS per marginal ----------------------------------------------------------------------------

def ks_marginals(a: Any, b: Any) -> TestResult:
    """Kolmogorov-Smirnov two-sample test on every marginal, Bonferroni-combined.

    For each axis d, D_d = sup_x |F_a,d(x) - F_b,d(x)| on the samples themselves
    (``scipy.stats.ks_2samp``: exact p-value up to 10^4 points per sample, asymptotic above). The
    combined p-value is Bonferroni's, p = min(1, D min_d p_d): valid whatever the dependence
    between axes, conservative for correlated axes, nearly exact at small p for independent ones
    (P(p <= alpha) = 1 - (1 - alpha/D)^D ~ alpha). It sees marginals only: a change of
    correlation with unchanged marginals is invisible to it by construction (``chi2_test`` and
    the classifier see it).

    Args:
        a: [n_a, D] first sample.
        b: [n_b, D] second sample (same D).

    Returns:
        TestResult("ks", max_d D_d, p, extra={"statistics": [D_d], "p_values": [p_d]}).
    """
    a, b = _pair(a, b)
    results = [stats.ks_2samp(a[:, d], b[:, d]) for d in range(a.shape[1])]
    distances = [float(r.statistic) for r in results]
    p_values = [float(r.pvalue) for r in results]
    p = min(1.0, a.shape[1] * min(p_values))
    return TestResult("ks", max(distances), p, None, {
        "statistics": distances, "p_values": p_values, "combination": "bonferroni",
        "n_a": len(a), "n_b": len(b)})


# ---- classifier two-sample test -----------------------------------------------------------------

def classifier_test(a: Any, b: Any, seed: int | None = None, classifier: str = "both",
                    test_fraction: float = 0.7, k: int | None = None,
                    l2: float = 1e-4) -> TestResult:
    """Classifier two-sample test (Lopez-Paz & Oquab 2017): can a classifier tell a from b?

    Each sample is split at random into a training part and a held-out part (``test_fraction``).
    A classifier is fitted on the training parts; its scores s on the held-out points give the AUC,

        AUC = U / (m_a m_b),  U = #{(i, j): s(b_j) > s(a_i)} + #ties / 2  (Mann-Whitney),

    with m_a, m_b held-out points. Under H0 the held-out labels are exchangeable given the fitted
    classifier (trained on other points), so U has the Mann-Whitney null distribution: mean
    m_a m_b / 2 and, without ties, var(AUC) = (m_a + m_b + 1) / (12 m_a m_b); the one-sided p-value
    (AUC > 1/2) is the tie-corrected normal approximation of ``scipy.stats.mannwhitneyu``. A
    classifier worse than chance is no evidence of a difference, hence one-sided. Do not swap the
    halves and add the two AUCs: for near-linear scorers they are almost fully correlated under H0.

    Classifiers (NumPy/SciPy, no TensorFlow):
      * ``"quadratic"``: logistic regression on [1, x, x_i x_j (i <= j)] of the standardised data,
        class-balanced, with a small ridge ``l2``. The log-ratio of two Gaussians is quadratic, so
        it is the optimal classifier for shifts, width and correlation changes of Gaussian-like
        samples. Few parameters, hence the default ``test_fraction`` 0.7 (more held-out points,
        smaller null spread of the AUC).
      * ``"knn"``: fraction of the k nearest training neighbours from b (class-balanced), default
        k = round(sqrt(training points)): sees non-quadratic differences (multimodality, edges).
      * ``"both"`` (default): both, p = min(1, 2 min(p_quadratic, p_knn)) (Bonferroni); the
        statistic is the AUC of the classifier with the smaller p.

    Args:
        a: [n_a, D] first sample, >= 4 points.
        b: [n_b, D] second sample (same D), >= 4 points.
        seed: seed of the split (None: fresh entropy, recorded in extra["seed"]).
        classifier: one of ``CLASSIFIERS``.
        test_fraction: fraction of each sample held out, in (0, 1).
        k: neighbours of the kNN classifier (None: sqrt rule).
        l2: ridge penalty of the logistic regression (on the mean loss; intercept not penalised).

    Returns:
        TestResult("classifier", AUC, p, extra={"auc": {...}, "p_values": {...},
        "auc_null_std", "n_test_a", "n_test_b", ...}).
    """
    a, b = _pair(a, b, minimum=4)
    classifier = one_of(classifier, "classifier", CLASSIFIERS)
    test_fraction = positive_number(test_fraction, "test_fraction")
    if test_fraction >= 1:
        raise InputError(f"test_fraction = {test_fraction!r}: expected a number in (0, 1)")
    l2 = positive_number(l2, "l2", allow_zero=True)
    seed = check_seed(seed)
    rng = np.random.default_rng(seed)
    train_a, test_a = _split(a, test_fraction, rng)
    train_b, test_b = _split(b, test_fraction, rng)
    x_train = np.concatenate([train_a, train_b])
    y_train = np.concatenate([np.zeros(len(train_a)), np.ones(len(train_b))])
    centre, scale = x_train.mean(axis=0), x_train.std(axis=0)
    scale[scale == 0] = 1.0
    x_train = (x_train - centre) / scale
    x_test_a, x_test_b = (test_a - centre) / scale, (test_b - centre) / scale

    scorers: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    if classifier in ("quadratic", "both"):
        scorers["quadratic"] = _quadratic_logistic(x_train, y_train, l2)
    if classifier in ("knn", "both"):
        k_used = integer(k, "k") if k is not None else max(1, round(math.sqrt(len(x_train))))
        scorers["knn"] = _knn_scorer(x_train, y_train, min(k_used, len(x_train)))
    auc, p_values = {}, {}
    for name, score in scorers.items():
        u = stats.mannwhitneyu(score(x_test_b), score(x_test_a), alternative="greater",
                               method="asymptotic")
        auc[name] = float(u.statistic) / (len(x_test_a) * len(x_test_b))
        p_values[name] = float(u.pvalue)
    best = min(p_values, key=p_values.get)
    p = min(1.0, len(p_values) * p_values[best])
    m_a, m_b = len(x_test_a), len(x_test_b)
    return TestResult("classifier", auc[best], p, None, {
        "auc": auc, "p_values": p_values, "combination": "bonferroni", "best": best,
        "auc_null_std": math.sqrt((m_a + m_b + 1) / (12 * m_a * m_b)),
        "n_test_a": m_a, "n_test_b": m_b, "n_train_a": len(train_a), "n_train_b": len(train_b),
        "seed": seed})


def _split(x: np.ndarray, test_fraction: float,
           rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) rows of x at random, each with at least 2 rows."""
    n_test = min(len(x) - 2, max(2, round(test_fraction * len(x))))
    order = rng.permutation(len(x))
    return x[order[n_test:]], x[order[:n_test]]


def _quadratic_features(x: np.ndarray) -> np.ndarray:
    """[N, 1 + D + D(D+1)/2]: 1, x_i, x_i x_j (i <= j)."""
    i, j = np.triu_indices(x.shape[1])
    return np.concatenate([np.ones((len(x), 1)), x, x[:, i] * x[:, j]], axis=1)


def _quadratic_logistic(x: np.ndarray, y: np.ndarray,
                        l2: float) -> Callable[[np.ndarray], np.ndarray]:
    """Scorer x -> w . phi(x) of a class-balanced ridge logistic regression on quadratic features.

    Minimises the convex L(w) = sum_n c_n softplus(-s_n w . phi_n) + l2 |w_1:|^2 (s_n = +-1,
    c_n = 1 / (2 n_class), intercept w_0 not penalised) by Newton's method with backtracking:
    grad = -Phi^T (c s q) + 2 l2 w and Hessian = Phi^T diag(c q (1 - q)) Phi + 2 l2 I, with
    q = sigmoid(-s Phi w). (Not scipy's L-BFGS-B: its BLAS calls stall on a busy multi-core host.)
    """
    phi = _quadratic_features(x)
    sign = 2.0 * y - 1.0
    weight = np.where(y == 1, 1.0 / max(1, int(y.sum())), 1.0 / max(1, int((1 - y).sum())))
    weight /= weight.sum()
    penalty = np.full(phi.shape[1], l2)
    penalty[0] = 0.0

    def loss(w: np.ndarray) -> float:
        margin = sign * (phi @ w)
        return float(np.sum(weight * np.logaddexp(0.0, -margin)) + np.sum(penalty * w**2))

    w = np.zeros(phi.shape[1])
    current = loss(w)
    for _ in range(100):
        margin = sign * (phi @ w)
        miss = special.expit(-margin)                      # sigmoid(-s w.phi)
        gradient = phi.T @ (-weight * sign * miss) + 2.0 * penalty * w
        curvature = weight * miss * (1.0 - miss)
        hessian = (phi * curvature[:, None]).T @ phi + np.diag(2.0 * penalty + 1e-12)
        step = np.linalg.solve(hessian, gradient)
        decrease = float(gradient @ step)                  # Newton decrement^2, >= 0
        if decrease < 1e-14:
            break
        t = 1.0
        while loss(w - t * step) > current - 0.25 * t * decrease and t > 1e-10:
            t *= 0.5                                       # Armijo backtracking
        w = w - t * step
        current = loss(w)
    return lambda z: _quadratic_features(z) @ w


def _knn_scorer(x: np.ndarray, y: np.ndarray, k: int) -> Callable[[np.ndarray], np.ndarray]:
    """Scorer z -> class-balanced fraction of z's k nearest training points that come from b."""
    tree = spatial.cKDTree(x)
    n_b, n_a = max(1, int(y.sum())), max(1, int((1 - y).sum()))

    def score(z: np.ndarray) -> np.ndarray:
        _, index = tree.query(z, k=k)
        from_b = y[index.reshape(len(z), k)].sum(axis=1)
        rate_b, rate_a = from_b / n_b, (k - from_b) / n_a
        return rate_b / (rate_a + rate_b)

    return score


# ---- permutation tests: energy distance and MMD -------------------------------------------------

def energy_distance_test(a: Any, b: Any, n_permutations: int = 500, seed: int | None = None,
                         max_size: int = MAX_PERMUTATION_SIZE) -> TestResult:
    """Energy-distance two-sample test with a permutation p-value (Szekely & Rizzo 2004).

        E = 2 mean_{i,j} |a_i - b_j| - mean_{i,i'} |a_i - a_i'| - mean_{j,j'} |b_j - b_j'|   (>= 0)

    (V-statistic form) on axes standardised by the pooled standard deviation, so E is in units of
    that; E = 0 iff the distributions are equal. Strong against location shifts, weaker against
    pure scale and correlation changes. For 1-D data, E in data units is the square of
    ``scipy.stats.energy_distance``.

    Args:
        a: [n_a, D] first sample.
        b: [n_b, D] second sample (same D).
        n_permutations: label permutations for the p-value (>= 1; 99 allow p down to 0.01).
        seed: seed of the subsample and the permutations (None: fresh entropy, recorded).
        max_size: samples larger than this are randomly subsampled to it (without replacement).

    Returns:
        TestResult("energy", E, p, extra={"null_mean", "null_std", "n_used_a", ...}), with
        p = (1 + #{E_perm >= E}) / (1 + n_permutations) (Phipson & Smyth 2010).
    """
    return _permutation_test("energy", a, b, n_permutations, seed, max_size, bandwidth=None)


def mmd_test(a: Any, b: Any, n_permutations: int = 500, seed: int | None = None,
             bandwidth: float | None = None, max_size: int = MAX_PERMUTATION_SIZE) -> TestResult:
    """Maximum mean discrepancy test, Gaussian kernel, permutation p-value (Gretton et al. 2012).

        MMD^2 = mean_{i,i'} k(a_i, a_i') + mean_{j,j'} k(b_j, b_j') - 2 mean_{i,j} k(a_i, b_j),
        k(x, y) = exp(-|x - y|^2 / (2 sigma^2))

    (biased V-statistic; the permutation p-value is that of the unbiased one, since the diagonal
    adds the constant k(0)(1/n_a + 1/n_b)) on axes standardised by the pooled standard deviation.
    sigma defaults to the median heuristic: the median pairwise distance of (at most 1000 of) the
    pooled, standardised points (Gretton et al. 2012, sec. 8). Strong against location and scale
    changes; with the median bandwidth, weak against correlation changes.

    Args:
        a: [n_a, D] first sample.
        b: [n_b, D] second sample (same D).
        n_permutations: label permutations (>= 1).
        seed: seed of the subsample, the median heuristic and the permutations (None: fresh
            entropy, recorded).
        bandwidth: sigma in standardised units (None: median heuristic).
        max_size: samples larger than this are randomly subsampled to it.

    Returns:
        TestResult("mmd", MMD^2, p, extra={"bandwidth", "null_mean", "null_std", ...}).
    """
    if bandwidth is not None:
        bandwidth = positive_number(bandwidth, "bandwidth")
    return _permutation_test("mmd", a, b, n_permutations, seed, max_size, bandwidth=bandwidth,
                             median_heuristic=bandwidth is None)


def _permutation_test(name: str, a: Any, b: Any, n_permutations: int, seed: int | None,
                      max_size: int, bandwidth: float | None,
                      median_heuristic: bool = False) -> TestResult:
    """T(w) = w^T K w for label weights w_i = 1/n_a (a) or -1/n_b (b), observed and permuted.

    K = -|x - y| (energy) or the Gaussian kernel (MMD); w^T K w is then exactly E or MMD^2. All
    permutations share one pass over K: rows of K are built chunk by chunk and multiplied by the
    [N, 1 + n_permutations] weight matrix, so there is no Python loop over points or permutations.
    """
    a, b = _pair(a, b, minimum=2)
    n_permutations = integer(n_permutations, "n_permutations")
    max_size = integer(max_size, "max_size", low=2)
    seed = check_seed(seed)
    rng = np.random.default_rng(seed)
    n_full_a, n_full_b = len(a), len(b)
    if len(a) > max_size:
        a = a[rng.choice(len(a), max_size, replace=False)]
    if len(b) > max_size:
        b = b[rng.choice(len(b), max_size, replace=False)]
    x = np.concatenate([a, b])
    scale = x.std(axis=0)
    scale[scale == 0] = 1.0
    x = (x - x.mean(axis=0)) / scale
    n_a, n_b = len(a), len(b)

    if median_heuristic:
        subset = x[rng.choice(len(x), min(len(x), _MEDIAN_HEURISTIC_POINTS), replace=False)]
        bandwidth = float(np.median(spatial.distance.pdist(subset)))
        if bandwidth == 0:
            bandwidth = 1.0
    labels = np.concatenate([np.ones(n_a, dtype=bool), np.zeros(n_b, dtype=bool)])
    permuted = rng.permuted(np.tile(labels, (n_permutations, 1)), axis=1)
    is_a = np.concatenate([labels[None, :], permuted]).T            # [N, 1 + P]
    weights = np.where(is_a, 1.0 / n_a, -1.0 / n_b)

    squared_norm = np.sum(x**2, axis=1)
    totals = np.zeros(weights.shape[1])
    chunk = max(1, _CHUNK_ELEMENTS // len(x))
    for start in np.arange(0, len(x), chunk):
        rows = slice(start, start + chunk)
        d2 = squared_norm[rows, None] + squared_norm[None, :] - 2.0 * x[rows] @ x.T
        d2 = np.maximum(d2, 0.0)                                    # rounding near the diagonal
        kernel = -np.sqrt(d2) if name == "energy" else np.exp(-d2 / (2.0 * bandwidth**2))
        totals += np.sum(weights[rows] * (kernel @ weights), axis=0)
    observed, null = float(totals[0]), totals[1:]
    p = (1.0 + np.count_nonzero(null >= observed)) / (1.0 + n_permutations)
    extra = {"n_permutations": n_permutations, "null_mean": float(null.mean()),
             "null_std": float(null.std()), "n_a": n_full_a, "n_b": n_full_b, "n_used_a": n_a,
             "n_used_b": n_b, "max_size": max_size, "seed": seed, "standardised": True}
    if name == "mmd":
        extra["bandwidth"] = bandwidth
        extra["bandwidth_rule"] = "median heuristic" if median_heuristic else "given"
    return TestResult(name, observed, float(p), None, extra)


# ---- all of them --------------------------------------------------------------------------------

def two_sample_report(a: Any, b: Any, seed: int | None = None, tests: Sequence[str] = TESTS,
                      n_permutations: int = 500) -> dict[str, TestResult]:
    """Run several two-sample tests on (a, b) with their default settings.

    Each test draws from its own child of ``numpy.random.SeedSequence(seed)``, fixed by its
    position in ``TESTS``, so a test's result does not depend on which other tests run.

    Args:
        a: [n_a, D] first sample.
        b: [n_b, D] second sample (same D).
        seed: master seed (None: fresh entropy; each result records its own seed).
        tests: names from ``TESTS`` ("chi2", "ks", "classifier", "energy", "mmd").
        n_permutations: for "energy" and "mmd".

    Returns:
        {name: TestResult} in the order of ``tests``; ``{k: r.to_dict() for k, r in ...}`` is JSON.

    Example:
        >>> report = two_sample_report(flow_draws, held_out, seed=0)
        >>> failed = [name for name, r in report.items() if r.p_value < 0.01]
    """
    a, b = _pair(a, b)
    if isinstance(tests, str):
        tests = (tests,)
    for name in tests:
        one_of(name, "test", TESTS)
    seed = check_seed(seed)
    children = np.random.SeedSequence(seed).spawn(len(TESTS))
    child_seed = {name: int(children[i].generate_state(1)[0]) for i, name in enumerate(TESTS)}
    run = {
        "chi2": lambda: chi2_test(a, b),
        "ks": lambda: ks_marginals(a, b),
        "classifier": lambda: classifier_test(a, b, seed=child_seed["classifier"]),
        "energy": lambda: energy_distance_test(a, b, n_permutations, seed=child_seed["energy"]),
        "mmd": lambda: mmd_test(a, b, n_permutations, seed=child_seed["mmd"]),
    }
    return {name: run[name]() for name in tests}


# ---- boundary checks and JSON -------------------------------------------------------------------

def _pair(a: Any, b: Any, minimum: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) as finite float64 [n_a, D], [n_b, D]: the same D, at least ``minimum`` rows."""
    a = finite_matrix(a, "a")
    width = a.shape[1]
    b = finite_matrix(b, "b", width=width, expected=f"[M, {width}] (the width of a)")
    for name, x in (("a", a), ("b", b)):
        if len(x) < minimum:
            raise InputError(f"{name} has {len(x)} row(s); this test needs at least {minimum}")
    return a, b


