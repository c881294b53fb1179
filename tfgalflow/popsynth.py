"""An exact stand-in for a population-synthesis grid: binary-black-hole masses given (Z, α).

SEVN-NF (REFERENCES.md, 002) emulates the merger masses (m0, m1) that the population-synthesis
code SEVN predicts on a grid of metallicity Z (15 values, 1e-4 ... 0.03) and common-envelope
efficiency α (0.5, 1, 3, 5). This module is a population with the same layout and a closed-form
density, so that an emulator and the hyperparameter inference built on it can be scored exactly.

With the normalised log-metallicity t = (log10 Z - log10 Z_min) / (log10 Z_max - log10 Z_min) in
[0, 1] and a = ln α:

    primary mass    m  ~ LogNormal(μ, σ) truncated to [3, 60] M☉,
                    μ = ln 22 - 0.8 t - 0.08 a,   σ = 0.25 + 0.1 t + 0.02 a
    mass ratio      q  ~ Beta(A, B),   A = 5 + 1.5 a + 1.0 t,   B = 2.5 + 0.5 t
    event           (m0, m1') = (m, q m),

so metal-poor populations make heavier black holes, and α shifts both the masses and the ratios
(which makes Z and α separately identifiable). The event density follows by the Jacobian of
(m, q) -> (m0, m1') = (m, q m), |∂(m0, m1')/∂(m, q)| = m:

    p(m0, m1' | Z, α) = p_m(m0) p_q(m1' / m0) / m0,        3 <= m0 <= 60,  0 < m1' < m0,

    p_m(m) = N((ln m - μ)/σ) / (σ m [Φ((ln 60 - μ)/σ) - Φ((ln 3 - μ)/σ)]),
    p_q(q) = q^(A-1) (1-q)^(B-1) / B(A, B).

The density is defined for every continuous (Z, α) in the grid's hull [1e-4, 0.03] x [0.5, 5].
Masses are in solar masses (M☉); Z is a mass fraction; α is dimensionless.

Example::

    >>> from tfgalflow import popsynth
    >>> events, labels = popsynth.simulate("grid", n_per_node=2000, seed=0)   # [120000, 2] each
    >>> popsynth.log_prob(events[:5], labels[:5])                              # [5], ln(1/M☉²)
    >>> popsynth.log_prob(events[:5], [0.003, 2.0])                            # one off-grid label
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import special

from .errors import InputError
from .validation import finite_matrix, integer, seed as check_seed

#: Metallicity grid: 15 values log-spaced from 1e-4 to 0.03 (mass fraction).
Z_GRID = np.logspace(-4.0, math.log10(0.03), 15)
#: Common-envelope efficiency grid.
ALPHA_GRID = np.array([0.5, 1.0, 3.0, 5.0])
#: Truncation of the primary mass (M☉).
M_MIN, M_MAX = 3.0, 60.0
#: Column names of events and labels, in order.
EVENT_NAMES = ("m0", "m1")
LABEL_NAMES = ("Z", "alpha")
#: The hull of the grid, per label column: (low, high).
LABEL_BOUNDS = (
    (float(Z_GRID[0]), float(Z_GRID[-1])),
    (float(ALPHA_GRID[0]), float(ALPHA_GRID[-1])),
)
#: The two whole nodes held out of training, as (Z index, α index) into the grids: interior nodes,
#: so that the emulator interpolates (never extrapolates) to them.
HELD_OUT_NODES = ((4, 1), (10, 2))

_LOG10_Z_SPAN = math.log10(Z_GRID[-1]) - math.log10(Z_GRID[0])


def grid_labels() -> np.ndarray:
    """Grid nodes (Z, α): [60, 2], Z-major (node k = (Z_GRID[k // 4], ALPHA_GRID[k % 4]))."""
    z, a = np.meshgrid(Z_GRID, ALPHA_GRID, indexing="ij")
    return np.stack([z.ravel(), a.ravel()], axis=1)


def node_index(z_index: int, alpha_index: int) -> int:
    """Row of node (Z_GRID[z_index], ALPHA_GRID[alpha_index]) in :func:`grid_labels`."""
    return int(z_index) * len(ALPHA_GRID) + int(alpha_index)


def held_out_labels() -> np.ndarray:
    """The held-out nodes' labels (Z, α): [2, 2]."""
    return grid_labels()[[node_index(i, j) for i, j in HELD_OUT_NODES]]


def training_labels() -> np.ndarray:
    """The grid minus the held-out nodes: [58, 2]."""
    keep = np.ones(len(Z_GRID) * len(ALPHA_GRID), bool)
    keep[[node_index(i, j) for i, j in HELD_OUT_NODES]] = False
    return grid_labels()[keep]


def check_labels(labels: Any, n: int | None = None, name: str = "labels") -> np.ndarray:
    """Labels (Z, α) as float64 [N, 2] (one [2] is broadcast to n rows) inside the grid's hull.

    Raises InputError naming the first label outside [1e-4, 0.03] x [0.5, 5].
    """
    arr = np.asarray(labels.numpy() if hasattr(labels, "numpy") else labels, dtype=np.float64)
    if arr.ndim == 1 and arr.shape == (2,):
        arr = np.tile(arr, (1 if n is None else n, 1))
    arr = finite_matrix(arr, name, width=2, expected="[N, 2] (Z, alpha)")
    if n is not None and arr.shape[0] != n:
        raise InputError(
            f"{name} have {arr.shape[0]} rows; expected [{n}, 2] (Z, alpha) or one [2]"
        )
    for k, (low, high) in enumerate(LABEL_BOUNDS):
        # a relative tolerance for grid values that went through float32 or text
        bad = (arr[:, k] < low * (1 - 1e-6)) | (arr[:, k] > high * (1 + 1e-6))
        if bad.any():
            i = int(np.argmax(bad))
            raise InputError(
                f"{name}[{i}] = {arr[i].tolist()}: {LABEL_NAMES[k]} must lie in the grid's "
                f"hull [{low:g}, {high:g}]"
            )
    arr[:, 0] = np.clip(arr[:, 0], *LABEL_BOUNDS[0])
    arr[:, 1] = np.clip(arr[:, 1], *LABEL_BOUNDS[1])
    return arr


def _coordinates(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(t, a) = (normalised log10 Z in [0, 1], ln α) for labels [N, 2]."""
    t = (np.log10(labels[:, 0]) - math.log10(Z_GRID[0])) / _LOG10_Z_SPAN
    return t, np.log(labels[:, 1])


def mass_parameters(labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """(μ, σ) of ln m before truncation, each [N].

    μ = ln 22 - 0.8 t - 0.08 ln α,   σ = 0.25 + 0.1 t + 0.02 ln α.
    """
    t, a = _coordinates(check_labels(labels))
    return math.log(22.0) - 0.8 * t - 0.08 * a, 0.25 + 0.1 * t + 0.02 * a


def ratio_parameters(labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Beta shapes (A, B) of q, each [N]: A = 5 + 1.5 ln α + t, B = 2.5 + 0.5 t."""
    t, a = _coordinates(check_labels(labels))
    return 5.0 + 1.5 * a + 1.0 * t, 2.5 + 0.5 * t


def _truncation(mu: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Φ(lower), Φ(upper)) of the standardised truncation points ln 3, ln 60."""
    return (
        special.ndtr((math.log(M_MIN) - mu) / sigma),
        special.ndtr((math.log(M_MAX) - mu) / sigma),
    )


def log_prob_mass(m: Any, labels: Any) -> np.ndarray:
    """ln p_m(m | Z, α) [N] of the truncated log-normal primary mass (ln 1/M☉); -inf off
    [3, 60].
    """
    m = np.asarray(m, dtype=np.float64).ravel()
    mu, sigma = mass_parameters(check_labels(labels, m.size))
    lo, hi = _truncation(mu, sigma)
    inside = (m >= M_MIN) & (m <= M_MAX)
    ln_m = np.log(np.where(inside, m, 1.0))
    z = (ln_m - mu) / sigma
    lp = -0.5 * z * z - 0.5 * math.log(2 * math.pi) - np.log(sigma) - ln_m - np.log(hi - lo)
    return np.where(inside, lp, -np.inf)


def log_prob_ratio(q: Any, labels: Any) -> np.ndarray:
    """ln p_q(q | Z, α) [N] of the Beta(A, B) mass ratio; -inf outside (0, 1)."""
    q = np.asarray(q, dtype=np.float64).ravel()
    a, b = ratio_parameters(check_labels(labels, q.size))
    inside = (q > 0) & (q < 1)
    qs = np.where(inside, q, 0.5)
    lp = (a - 1) * np.log(qs) + (b - 1) * np.log1p(-qs) - special.betaln(a, b)
    return np.where(inside, lp, -np.inf)


def log_prob(events: Any, labels: Any) -> np.ndarray:
    """ln p(m0, m1' | Z, α) [N] in ln(1/M☉²): p_m(m0) p_q(m1'/m0) / m0 (module docstring).

    Args:
        events: [N, 2] (m0, m1') in M☉.
        labels: [N, 2] (Z, α), or one [2] for every event; inside the grid's hull.
    Returns -inf for events outside the support (m0 outside [3, 60], m1' outside (0, m0)).
    """
    x = finite_matrix(events, "events", width=2, expected="[N, 2] (m0, m1) in Msun")
    c = check_labels(labels, x.shape[0])
    m0, m1 = x[:, 0], x[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(m0 > 0, m1 / np.where(m0 > 0, m0, 1.0), -1.0)
        lp = log_prob_mass(m0, c) + log_prob_ratio(q, c) - np.log(np.where(m0 > 0, m0, 1.0))
    return np.where(np.isfinite(lp), lp, -np.inf)


def simulate(
    labels: Any = "grid", n_per_node: int = 2000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Exact draws: n_per_node events per label row, sorted by label row (as the grid's files are).

    Args:
        labels: "grid" (the 60 nodes of :func:`grid_labels`), or nodes [K, 2] / [2] (Z, α) in the
            hull.
        n_per_node: events per label row (>= 1).
        seed: NumPy seed (>= 0); the same seed gives the same events.

    Returns:
        (events [K n, 2] (m0, m1') in M☉, labels [K n, 2] (Z, α)); rows k n ... (k+1) n - 1
        belong to node k.

    m by inverse-CDF sampling of the truncated normal in ln m; q by NumPy's Beta sampler.
    """
    nodes = grid_labels() if isinstance(labels, str) and labels == "grid" else check_labels(labels)
    n = integer(n_per_node, "n_per_node", low=1)
    rng = np.random.default_rng(check_seed(seed))
    c = np.repeat(nodes, n, axis=0)
    mu, sigma = mass_parameters(c)
    lo, hi = _truncation(mu, sigma)
    u = lo + (hi - lo) * rng.uniform(size=c.shape[0])
    m = np.clip(np.exp(mu + sigma * special.ndtri(u)), M_MIN, M_MAX)
    a, b = ratio_parameters(c)
    q = rng.beta(a, b)
    return np.stack([m, q * m], axis=1), c


def physical_support(events: Any) -> np.ndarray:
    """Per-column physical validity [N, 2] bool: m0 in [3, 60] M☉; 0 < m1' <= m0."""
    x = np.asarray(events.numpy() if hasattr(events, "numpy") else events, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 2:
        raise InputError(f"events have shape {list(x.shape)}; expected [N, 2] (m0, m1) in Msun")
    m0, m1 = x[:, 0], x[:, 1]
    with np.errstate(invalid="ignore"):
        return np.stack([(m0 >= M_MIN) & (m0 <= M_MAX), (m1 > 0) & (m1 <= m0)], axis=1)


def unphysical_fraction(events: Any) -> dict[str, float]:
    """Fraction of events outside the physical support, per column and in any column.

    Returns {"m0": P(m0 outside [3, 60]), "m1": P(m1' outside (0, m0]), "any": P(either)}, e.g. for
    emulator samples ``unphysical_fraction(flow.sample(n, labels))``.
    """
    ok = physical_support(events)
    frac = 1.0 - ok.mean(axis=0)
    return {"m0": float(frac[0]), "m1": float(frac[1]), "any": float(1.0 - ok.all(axis=1).mean())}


__all__ = [
    "Z_GRID",
    "ALPHA_GRID",
    "M_MIN",
    "M_MAX",
    "EVENT_NAMES",
    "LABEL_NAMES",
    "LABEL_BOUNDS",
    "HELD_OUT_NODES",
    "grid_labels",
    "node_index",
    "held_out_labels",
    "training_labels",
    "check_labels",
    "mass_parameters",
    "ratio_parameters",
    "log_prob_mass",
    "log_prob_ratio",
    "log_prob",
    "simulate",
    "physical_support",
    "unphysical_fraction",
]
