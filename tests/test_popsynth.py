"""The exact population-synthesis stand-in: normalisation, sampler vs exact marginals, support."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import special, stats

from tfgalflow import popsynth
from tfgalflow.errors import InputError

# on-grid corners, an interior node and two off-grid labels
LABELS = [(1e-4, 0.5), (0.03, 5.0), (popsynth.Z_GRID[6], 3.0), (3e-3, 2.2), (4.4e-4, 0.7)]


def _triangle_integral(labels, n: int = 400) -> float:
    """∫_3^60 dm0 ∫_0^m0 dm1' p(m0, m1') by iterated Gauss-Legendre (inner interval [0, m0])."""
    g, w = np.polynomial.legendre.leggauss(n)
    m0 = 3.0 + (g + 1) * 28.5  # [3, 60]
    s, ws = (g + 1) / 2, w / 2
    M0, S = np.meshgrid(m0, s, indexing="ij")
    m1 = M0 * S  # inner nodes on [0, m0], weights m0 ws
    lp = popsynth.log_prob(np.stack([M0.ravel(), m1.ravel()], 1), labels).reshape(M0.shape)
    return float(np.sum(w[:, None] * 28.5 * M0 * ws[None, :] * np.exp(lp)))


@pytest.mark.parametrize("labels", LABELS)
def test_exact_density_integrates_to_one(labels):
    # 400^2 Gauss-Legendre nodes; the least smooth factor (1 - q)^(B-1), B >= 2.5, converges below
    # 1e-5, while a missing Jacobian 1/m0 or a wrong truncation constant is off by O(1) or O(1e-3).
    assert _triangle_integral(labels) == pytest.approx(1.0, abs=1e-5)


def test_density_is_zero_outside_the_support():
    lp = popsynth.log_prob([[2.9, 1.0], [61.0, 10.0], [10.0, 10.5], [10.0, -1.0]], [1e-3, 1.0])
    assert np.all(lp == -np.inf)


@pytest.mark.parametrize("labels", [(popsynth.Z_GRID[3], 1.0), (2.2e-3, 4.0)])
def test_simulated_events_match_exact_marginals(labels):
    events, c = popsynth.simulate(np.array([labels]), n_per_node=8000, seed=3)
    assert np.allclose(c, labels) and popsynth.physical_support(events).all()
    mu, sigma = popsynth.mass_parameters([labels])
    lo, hi = special.ndtr((np.log(3.0) - mu) / sigma), special.ndtr((np.log(60.0) - mu) / sigma)

    def mass_cdf(m):
        return (special.ndtr((np.log(m) - mu) / sigma) - lo) / (hi - lo)

    a, b = popsynth.ratio_parameters([labels])
    # KS against the exact CDFs: fixed seed, p > 0.01 (a wrong shape parameter gives p ~ 0 at 8e3)
    assert stats.kstest(events[:, 0], mass_cdf).pvalue > 0.01
    assert stats.kstest(events[:, 1] / events[:, 0], stats.beta(a[0], b[0]).cdf).pvalue > 0.01
    # chi^2 of the secondary-mass marginal against bin probabilities from the exact 2-D density:
    # P(m1' in [u, v]) = ∫ p_m(m) [F_q(v/m) - F_q(u/m)] dm (quadrature), an independent route.
    edges = np.quantile(events[:, 1], np.linspace(0, 1, 21))
    edges[0], edges[-1] = 0.0, 60.0
    g, w = np.polynomial.legendre.leggauss(2000)
    m = 3.0 + (g + 1) * 28.5
    pm = np.exp(popsynth.log_prob_mass(m, labels)) * w * 28.5
    fq = stats.beta(a[0], b[0]).cdf(np.clip(edges[None, :] / m[:, None], 0, 1))
    probs = (pm[:, None] * np.diff(fq, axis=1)).sum(0)
    assert probs.sum() == pytest.approx(1.0, abs=1e-6)
    counts = np.histogram(events[:, 1], edges)[0]
    chi2 = np.sum((counts - len(events) * probs) ** 2 / (len(events) * probs))
    assert stats.chi2(len(probs) - 1).sf(chi2) > 0.01


def test_grid_layout_and_held_out_nodes():
    grid = popsynth.grid_labels()
    assert grid.shape == (60, 2) and np.isclose(grid[0, 0], 1e-4) and np.isclose(grid[-1, 0], 0.03)
    assert popsynth.training_labels().shape == (58, 2)
    held = popsynth.held_out_labels()
    assert not any(np.allclose(h, t) for h in held for t in popsynth.training_labels())
    events, labels = popsynth.simulate("grid", n_per_node=3, seed=1)
    assert events.shape == (180, 2) and np.allclose(labels[::3], grid)
    again, _ = popsynth.simulate("grid", n_per_node=3, seed=1)
    assert np.array_equal(events, again)


def test_physical_support_per_column():
    ok = popsynth.physical_support(np.array([[10.0, 5.0], [2.0, 1.0], [10.0, 11.0], [70.0, -1.0]]))
    assert ok.tolist() == [[True, True], [False, True], [True, False], [False, False]]
    frac = popsynth.unphysical_fraction(
        np.array([[10.0, 5.0], [2.0, 1.0], [10.0, 11.0], [70.0, -1.0]])
    )
    assert frac == {"m0": 0.5, "m1": 0.5, "any": 0.75}


def test_labels_outside_the_hull_are_refused():
    with pytest.raises(InputError, match="alpha must lie in the grid's hull"):
        popsynth.log_prob([[10.0, 5.0]], [1e-3, 7.0])
    with pytest.raises(InputError, match="Z must lie"):
        popsynth.simulate([[0.1, 1.0]], 10)
