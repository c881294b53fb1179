"""The density contract (tfgalflow.density.Density): one set of generic checks over every
implementation.

Each implementation only says how to build itself (a ``Case``); every check runs on every case. A
new density must be added to ``CASES`` (``test_every_density_class_has_a_case`` fails otherwise).

Independent truths used here: normalisation ∫ p dx = 1 by importance sampling from a Student-t
proposal (or, for the exact Hernquist DF, by quadrature against its known mass M(r) = r²/(r + a)²);
consistency of samples and log_prob through the identity E_{x~p}[q(x)/p(x)] = 1 for a normalised q
whose tails are lighter than p's; gradients against central finite differences of log_prob.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
from scipy import integrate, stats

import tfgalflow
from tfgalflow.density import Density, DerivedDensity
from tfgalflow.errors import InputError
from tfgalflow.dehnen import Dehnen
from tfgalflow.exact import DehnenFamilyDF, ExactDF
from tfgalflow.export import ExportedModel, export_model, load
from tfgalflow.flows import FlowConfig
from tfgalflow.hernquist import Hernquist
from tfgalflow.model import Ensemble, Flow
from tfgalflow.axisymmetric_df import AxisymmetricDF, cylindrical_coordinates
from tfgalflow.spherical_df import SphericalDF, reduced_coordinates
from tfgalflow.symmetry import SphericalAverage


def _gaussian_data(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(dim, dim)) * 0.3 + np.eye(dim)
    return rng.normal(size=(n, dim)) @ a.T + np.arange(dim)


def _flow(dim: int, label_dim: int = 0, seed: int = 0, isotropic: bool = False,
          context_blocks: int = 0) -> Flow:
    """A small flow adapted (not trained) to correlated Gaussian data (or N(0, I) data): any
    density is a fair test case (``context_blocks`` > 0: the labels through a context network)."""
    x = (
        np.random.default_rng(seed).normal(size=(2000, dim))
        if isotropic
        else _gaussian_data(2000, dim, seed)
    )
    labels = (
        np.random.default_rng(seed + 1).uniform(-1, 1, size=(2000, label_dim))
        if label_dim
        else None
    )
    # tanh: a smooth density, so finite differences are a fair check of its gradient (ReLU kinks
    # are not).
    return Flow(
        FlowConfig(
            dim=dim, label_dim=label_dim, layers=2, hidden=(16, 16), activation="tanh", seed=seed,
            context_blocks=context_blocks, context_width=16,
        )
    ).adapt(x + (labels[:, :1] if label_dim else 0), labels)


def _reduced_flow(seed: int = 0) -> Flow:
    """A 3-D flow of (r, v_r, v_t) (logs of r and v_t, as training with coordinates='spherical'
    builds it) adapted to the reduced coordinates of a 6-D Gaussian: the base of a SphericalDF."""
    u = reduced_coordinates(np.random.default_rng(seed).normal(size=(2000, 6)))
    return Flow(
        FlowConfig(dim=3, layers=2, hidden=(16, 16), activation="tanh", log_columns=(0, 2),
                   seed=seed)
    ).adapt(u.astype(np.float32))


def _bounded_reduced_flow(seed: int = 0, r_max: float = 3.0) -> Flow:
    """As :func:`_reduced_flow`, for a 6-D Gaussian cut at r < r_max, with r bounded by it
    (``log(r / (r_max − r))``, as training with ``support_r_max`` builds it)."""
    u = reduced_coordinates(np.random.default_rng(seed).normal(size=(3000, 6)))
    return Flow(
        FlowConfig(dim=3, layers=2, hidden=(16, 16), activation="tanh", log_columns=(0, 2),
                   upper_bounds=((0, r_max),), seed=seed)
    ).adapt(u[u[:, 0] < r_max].astype(np.float32))


def _conditionally_rescaled_flow(seed: int = 0) -> Flow:
    """A conditional flow whose rescaler moves and widens with the label (FlowConfig.
    conditional_rescaling), adapted to data that do: x = 2c + e^{0.5 c} ε."""
    rng = np.random.default_rng(seed)
    labels = rng.uniform(-1, 1, size=(2000, 1))
    x = _gaussian_data(2000, 2, seed) * np.exp(0.5 * labels) + 2 * labels
    return Flow(
        FlowConfig(dim=2, label_dim=1, layers=2, hidden=(16, 16), activation="tanh",
                   conditional_rescaling=True, seed=seed)
    ).adapt(x.astype(np.float32), labels.astype(np.float32))


def _cylindrical_flow(seed: int = 0) -> Flow:
    """A conditional 6-D flow of (R, z, v_R, v_phi, v_z, e) (log R, as training with
    coordinates='cylindrical' builds it; e a 7th catalogue column, e.g. [Fe/H]): the base of a
    7-D AxisymmetricDF."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(2000, 7))
    labels = rng.uniform(-1, 1, size=(2000, 1))
    return Flow(
        FlowConfig(dim=6, label_dim=1, layers=2, hidden=(16, 16), activation="tanh",
                   log_columns=(0,), seed=seed)
    ).adapt(cylindrical_coordinates(w).astype(np.float32), labels.astype(np.float32))


@dataclass
class Case:
    name: str
    build: Callable[[], Density]
    # one label row, used for every point of a conditional case
    labels: np.ndarray | None = None
    normalisation: Callable[[Density], tuple[float, float]] | None = None   # (estimate, std error)


def _isotropic_mass_within(
    df: Density, model, labels=None, r_max: float = 50.0
) -> tuple[float, float]:
    """∫_{r<r_max} ∫ f d³v d³x / M(<r_max) by quadrature of an isotropic f(|x|, |v|) on a
    (log r, v/v_esc) grid; M(<r_max) from the model's closed-form enclosed mass."""
    r = np.geomspace(1e-3, r_max, 240)
    # v / v_esc(r), open interval
    u = np.linspace(0.0, 1.0, 201)[1:-1]
    v = model.escape_speed(r)[:, None] * u[None, :]
    w = np.zeros((r.size * u.size, 6), np.float32)
    w[:, 0] = np.repeat(r, u.size)
    w[:, 3] = v.ravel()
    c = None if labels is None else np.tile(np.asarray(labels, np.float32), (len(w), 1))
    f = np.exp(np.asarray(df.log_prob(w, c), np.float64)).reshape(r.size, u.size)
    rho = integrate.simpson(4 * np.pi * v**2 * f, x=v, axis=1)              # ∫ f d³v at each r
    # ∫ 4π r² ρ dr, dr = r dln r
    mass = integrate.simpson(4 * np.pi * r**3 * rho, x=np.log(r))
    return mass / float(model.enclosed_mass(r_max)), 0.0                   # should be 1


CASES = [
    Case("flow", lambda: _flow(2)),
    Case(
        "conditional flow",
        lambda: _flow(2, label_dim=1, seed=3),
        labels=np.array([0.4], np.float32),
    ),
    Case(
        "flow with a context network",
        lambda: _flow(2, label_dim=2, seed=11, context_blocks=2),
        labels=np.array([0.4, -0.6], np.float32),
    ),
    Case(
        "conditionally rescaled flow",
        lambda: _conditionally_rescaled_flow(seed=4),
        labels=np.array([0.7], np.float32),
    ),
    Case("ensemble", lambda: Ensemble([_flow(2, seed=s) for s in (5, 6)])),
    # About the origin, as a spherical system is (the average of an off-centre density is a shell).
    Case(
        "spherical average",
        lambda: SphericalAverage(_flow(6, seed=7, isotropic=True), n_rotations=4, seed=1),
    ),
    Case("spherical DF", lambda: SphericalDF(_reduced_flow(seed=8))),
    Case("spherical DF, bounded radius", lambda: SphericalDF(_bounded_reduced_flow(seed=10))),
    Case(
        "axisymmetric DF",
        # (even=False: one base evaluation per point; the mirror average has its own exact tests
        # in tests/test_axisymmetric_df.py)
        lambda: AxisymmetricDF(_cylindrical_flow(seed=9)),
        labels=np.array([0.2], np.float32),
    ),
    Case(
        "exact DF",
        lambda: Hernquist().exact_density("iso"),
        normalisation=lambda df: _isotropic_mass_within(df, df.model),
    ),
    # A conditional exact density: normalised at an isotropic label of the family (γ = 0.5).
    Case(
        "Dehnen family DF",
        DehnenFamilyDF,
        labels=np.array([0.5, 0.0], np.float32),
        normalisation=lambda df: _isotropic_mass_within(df, Dehnen(0.5, 0.0), [0.5, 0.0]),
    ),
    Case("exported model", None, labels=np.array([-0.3], np.float32)),
]
CASE_IDS = [c.name for c in CASES]


@pytest.fixture(scope="module")
def densities(tmp_path_factory) -> dict[str, Density]:
    built = {c.name: c.build() for c in CASES if c.build is not None}
    path = export_model(built["conditional flow"], tmp_path_factory.mktemp("contract") / "cond")
    built["exported model"] = load(path)
    return built


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request, densities) -> tuple[Case, Density]:
    return request.param, densities[request.param.name]


def _labels(case: Case, n: int):
    return (
        None if case.labels is None else np.broadcast_to(case.labels, (n, case.labels.size)).copy()
    )


def _points(case: Case, df: Density, n: int, seed: int) -> np.ndarray:
    """Points where the density is well inside its support: its own draws, or bound Hernquist
    orbits."""
    if df.can_sample:
        return np.asarray(df.sample(n, _labels(case, n), seed=seed))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    # |v| << v_esc near r ~ 1
    v = rng.normal(size=(n, 3)) * 0.2
    return np.hstack([x, v]).astype(np.float32)


def _package_density_classes() -> set[type]:
    # every module that defines densities
    for name in ("model", "symmetry", "spherical_df", "axisymmetric_df", "exact", "export"):
        getattr(tfgalflow, name)
    found, todo = set(), [Density]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__module__.startswith("tfgalflow.") and sub is not DerivedDensity:
                found.add(sub)          # (DerivedDensity: the shared base of the wrappers)
    return found


def test_every_density_class_has_a_case(densities):
    # Every Density subclass the package defines is exercised by the contract (a new one adds a
    # Case).
    assert _package_density_classes() <= {type(d) for d in densities.values()}
    assert tfgalflow.Density is Density


class TestDensityContract:
    def test_shapes_and_dtypes(self, case):
        case, df = case
        x = _points(case, df, 17, seed=1)
        c = _labels(case, 17)
        # Tensors from in-memory densities, NumPy from a loaded SavedModel: float32 either way.
        lp, grad = np.asarray(df.log_prob(x, c)), np.asarray(df.grad_log_prob(x, c))
        assert lp.shape == (17,) and lp.dtype == np.float32
        assert grad.shape == (17, df.dim) and grad.dtype == np.float32
        np.testing.assert_allclose(np.asarray(df.prob(x, c)), np.exp(lp), rtol=1e-6)
        assert isinstance(df.evaluations_per_row, int) and df.evaluations_per_row >= 1
        if df.can_sample:
            s = np.asarray(df.sample(5, None if c is None else case.labels, seed=3))
            assert s.shape == (5, df.dim) and s.dtype == np.float32
            # The same seed gives the same draws.
            np.testing.assert_array_equal(
                s, np.asarray(df.sample(5, None if c is None else case.labels, seed=3))
            )

    def test_finite_where_supported(self, case):
        case, df = case
        x = _points(case, df, 200, seed=2)
        c = _labels(case, 200)
        assert np.isfinite(df.log_prob(x, c)).all()
        assert np.isfinite(df.grad_log_prob(x, c)).all()

    def test_grad_matches_finite_differences(self, case):
        case, df = case
        x = _points(case, df, 8, seed=4).astype(np.float64)
        c = _labels(case, 8)
        grad = np.asarray(df.grad_log_prob(x, c))
        # Central differences of the float32 log p with a step of 1e-2 x the column scale:
        # truncation O(h²) ~ 1e-4 and round-off ~ 1e-7 |log p| / h ~ 1e-4, so 2e-2 relative to the
        # gradient's size is loose enough for float32 and tight enough to catch a wrong sign,
        # factor or column.
        h = 1e-2 * np.maximum(np.abs(x).mean(axis=0), 0.1)
        fd = np.empty_like(grad)
        for j in range(df.dim):
            step = np.zeros(df.dim)
            step[j] = h[j]
            up = np.asarray(df.log_prob((x + step).astype(np.float32), c), np.float64)
            down = np.asarray(df.log_prob((x - step).astype(np.float32), c), np.float64)
            fd[:, j] = (up - down) / (2 * h[j])
        scale = np.abs(grad).max()
        np.testing.assert_allclose(grad, fd, rtol=2e-2, atol=2e-2 * scale)

    def test_normalised(self, case):
        case, df = case
        if case.normalisation is not None:
            estimate, error = case.normalisation(df)
        else:
            estimate, error = _importance_normalisation(case, df, n=20000, seed=5)
        # 5 standard errors of the estimate plus 1e-3 for quadrature; a density off by a factor
        # (a missing rescaling Jacobian, a wrong ensemble or rotation weight) misses by far more.
        assert abs(estimate - 1.0) < 5 * error + 1e-3, (estimate, error)

    def test_samples_agree_with_log_prob(self, case):
        case, df = case
        if not df.can_sample:
            pytest.skip(f"{case.name} does not sample")
        x = np.asarray(df.sample(20000, _labels(case, 20000), seed=6), np.float64)
        mean, cov = x.mean(axis=0), np.cov(x.T)
        # q = N(mean, 0.6² cov) has lighter tails than p, so q/p is bounded and E_{x~p}[q/p] = ∫ q
        # = 1. If the draws did not come from the density log_prob describes, the mean ratio
        # differs from 1.
        q = stats.multivariate_normal(mean, 0.36 * cov)
        log_ratio = q.logpdf(x) - np.asarray(
            df.log_prob(x.astype(np.float32), _labels(case, len(x)))
        )
        ratio = np.exp(log_ratio)
        error = ratio.std() / math.sqrt(len(ratio))
        assert abs(ratio.mean() - 1.0) < 5 * error + 1e-3, (ratio.mean(), error)

    def test_bad_input_is_an_input_error(self, case):
        case, df = case
        x = _points(case, df, 4, seed=7)
        c = _labels(case, 4)
        bad = x.copy()
        bad[2, 0] = np.nan
        with pytest.raises(InputError, match="NaN"):
            df.log_prob(bad, c)
        with pytest.raises(InputError, match="shape"):
            df.log_prob(x[:, :-1], c)
        with pytest.raises(InputError, match=r"shape|labels"):
            df.grad_log_prob(x, np.zeros((4, df.label_dim + 1), np.float32))
        if df.label_dim:
            with pytest.raises(InputError, match="conditional"):
                df.log_prob(x)
            with pytest.raises(InputError, match="rows"):
                df.log_prob(x, c[:3])
        else:
            with pytest.raises(InputError, match="unconditional"):
                df.log_prob(x, np.zeros((4, 1), np.float32))
        if df.can_sample:
            with pytest.raises(InputError, match="n ="):
                df.sample(-5, None if c is None else case.labels)

    def test_export_round_trip(self, case, tmp_path):
        case, df = case
        if isinstance(df, (ExactDF, DehnenFamilyDF, ExportedModel)):
            pytest.skip("exact DFs are formulas, and an ExportedModel is already the round trip")
        loaded = load(export_model(df, tmp_path / "m", accelerations=False))
        assert isinstance(loaded, Density) and (loaded.dim, loaded.label_dim) == (
            df.dim,
            df.label_dim,
        )
        x = _points(case, df, 50, seed=8)
        c = _labels(case, 50)
        # The exported graph is the same float32 maths: equal to round-off.
        np.testing.assert_allclose(
            np.asarray(loaded.log_prob(x, c)), np.asarray(df.log_prob(x, c)), rtol=1e-5, atol=1e-5
        )


def _importance_normalisation(case: Case, df: Density, n: int, seed: int) -> tuple[float, float]:
    """∫ p dx ≈ mean of p(x)/q(x) over x ~ q, q a Student-t (ν = 5) around the density's own draws:
    heavier tails than a flow's, so p/q is bounded and the estimate has a finite variance."""
    draws = np.asarray(df.sample(5000, _labels(case, 5000), seed=seed), np.float64)
    q = stats.multivariate_t(draws.mean(axis=0), 1.5 * np.cov(draws.T), df=5, seed=seed)
    x = q.rvs(size=n)
    log_w = np.asarray(df.log_prob(x.astype(np.float32), _labels(case, n))) - q.logpdf(x)
    w = np.exp(log_w)
    return float(w.mean()), float(w.std() / math.sqrt(n))
