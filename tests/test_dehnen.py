"""Dehnen-OM models: each number against an independent truth."""

import math
import warnings

import numpy as np
import pytest
from scipy import integrate, stats

from tfgalflow.dehnen import LABEL_NAMES, Dehnen, check_labels, max_ra_inverse, tf_log_df
from tfgalflow.errors import InputError
from tfgalflow.hernquist import Hernquist
from tfgalflow.mocks import sample_dehnen, sample_dehnen_grid

# (gamma, a/r_a): isotropic and OM, cored, cuspy, Hernquist, Jaffe (limit 45.3), gamma > 2.
LABELS = [
    (0.0, 0.0),
    (0.0, 2.0),
    (0.5, 1.0),
    (1.0, 0.0),
    (1.0, 4.0),
    (1.5, 3.0),
    (2.0, 20.0),
    (2.5, 5.0),
]


def _random_phase_space(n=2000, seed=0, v_scale=0.5):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3)) * np.exp(rng.normal(size=(n, 1))), rng.normal(
        size=(n, 3)
    ) * v_scale


# ---- gamma = 1 is Hernquist --------------------------------------------------------------------


def test_hernquist_structure():
    # Same closed forms written differently (y-powers vs Hernquist's rational forms): round-off.
    d, h = Dehnen(1.0, M=2.0, a=1.5, G=0.7), Hernquist(M=2.0, a=1.5, G=0.7)
    r = np.logspace(-5, 5, 41)
    for name in (
        "density",
        "enclosed_mass",
        "relative_potential",
        "circular_speed",
        "escape_speed",
    ):
        np.testing.assert_allclose(
            getattr(d, name)(r), getattr(h, name)(r), rtol=1e-13, err_msg=name
        )
    x, _ = _random_phase_space()
    np.testing.assert_allclose(d.acceleration(x), h.acceleration(x), rtol=1e-13)
    # Jeans sigma_r: 96-node quadrature vs Hernquist's closed form (eq. 10); measured 3e-15.
    np.testing.assert_allclose(d.sigma_r(r), h.sigma_r(r), rtol=1e-10)


def test_hernquist_isotropic_df():
    d, h = Dehnen(1.0, M=2.0, a=1.5, G=0.7), Hernquist(M=2.0, a=1.5, G=0.7)
    Q = h.energy_scale * np.concatenate(
        [np.logspace(-10, -0.5, 30), 1.0 - np.logspace(-6, -0.5, 20)]
    )
    # Quadrature vs Hernquist (1990) eq. 17; measured <= 1e-14 (eq. 17 loses ~1e-11 near Q = 1).
    np.testing.assert_allclose(d.f(Q), h.f_iso(Q), rtol=1e-10)
    x, v = _random_phase_space()
    x, v = 1.5 * x, v * h.velocity_scale
    a, b = d.log_df(x, v), h.log_df(x, v, "iso")
    assert np.array_equal(np.isfinite(a), np.isfinite(b)) and np.isfinite(a).sum() > 300
    np.testing.assert_allclose(a[np.isfinite(a)], b[np.isfinite(b)], atol=1e-11)


def _hernquist_om_closed_form(Q, ra_inverse):
    """Hernquist (1990) eq. 44 in model units, q^2 = Q:
    f = f_iso(Q) + (a/r_a)^2 q (1 - 2 q^2) / (sqrt2 pi^3).

    Derivation of the anisotropic term: rho_1 = r^2 rho = Psi^2 (1 - Psi) / (2 pi) (r = 1/Psi - 1),
    so d^2 rho_1/dPsi^2 = (1 - 3 Psi)/pi and
    (1/(sqrt8 pi^2)) int_0^Q (1 - 3 Psi) dPsi / (pi sqrt(Q - Psi))
    = (2 sqrt(Q) - 4 Q^(3/2)) / (sqrt8 pi^3).
    """
    q = np.sqrt(Q)
    return Hernquist().f_iso(Q) + ra_inverse**2 * q * (1.0 - 2.0 * q * q) / (
        math.sqrt(2.0) * math.pi**3
    )


@pytest.mark.parametrize("ra_inverse", [0.5, 2.0, 4.9])
def test_hernquist_om_df(ra_inverse):
    Q = np.concatenate([np.logspace(-10, -0.5, 30), 1.0 - np.logspace(-6, -0.5, 20)])
    # Near the limit 4.94 f nearly vanishes at one Q; compare there to the size of its two terms.
    truth = _hernquist_om_closed_form(Q, ra_inverse)
    scale = Hernquist().f_iso(Q) + ra_inverse**2 * np.sqrt(Q) / (math.sqrt(2.0) * math.pi**3)
    assert np.max(np.abs(Dehnen(1.0, ra_inverse).f(Q) - truth) / scale) < 1e-11


# ---- galpy (independent Eddington code: quad over r of galpy's own density derivatives) ---------


@pytest.mark.parametrize(
    "gamma,ra_inverse", [(0.5, 0.0), (1.5, 1.0), (0.0, 2.0), (2.0, 20.0), (2.5, 2.0)]
)
def test_galpy_agreement(gamma, ra_inverse):
    galpy_potential = pytest.importorskip("galpy.potential")
    galpy_df = pytest.importorskip("galpy.df")
    # galpy's DehnenSphericalPotential has rho = amp / (4 pi a^3 r^gamma (1 + r)^(4 - gamma)),
    # so M = amp / (3 - gamma).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pot = galpy_potential.DehnenSphericalPotential(amp=3.0 - gamma, a=1.0, alpha=gamma)
        if ra_inverse == 0:
            df = galpy_df.eddingtondf(pot=pot, rmax=1e4, rmin=1e-8)
        else:
            df = galpy_df.osipkovmerrittdf(pot=pot, ra=1.0 / ra_inverse, rmax=1e4, rmin=1e-8)
        d = Dehnen(gamma, ra_inverse)
        Q = 0.7 * d.relative_potential(np.array([0.01, 0.3, 1.0, 3.0, 30.0]))
        theirs = np.array(
            [df.fE(np.array([-q]))[0] if ra_inverse == 0 else df.fQ(np.array([q]))[0] for q in Q]
        )
    # galpy integrates with scipy quad (epsrel 1.5e-8) and truncates at rmax = 1e4 (f(Q) with
    # Q < Psi(1e4) ~ 1e-4 is cut); measured agreement 2e-11.
    np.testing.assert_allclose(theirs, d.f(Q), rtol=1e-8)


# ---- moments of the DF: density, sigma_r, beta ------------------------------------------------


def _velocity_moment(d: Dehnen, r: float, power: int) -> float:
    """int |p|^power f(Psi - p^2/2) 4 pi p^2 dp / (1 + r^2/r_a^2), with p = sqrt(2) u."""
    psi = float(d.relative_potential(r))
    value = integrate.quad(
        lambda u: (
            4.0
            * math.pi
            * math.sqrt(2.0) ** (power + 3)
            * u ** (power + 2)
            * float(d.f(psi - u * u))
        ),
        0.0,
        math.sqrt(psi),
        epsrel=1e-12,
        epsabs=0,
        limit=400,
    )[0]
    return value / (1.0 + (d.ra_inverse * r) ** 2)


@pytest.mark.parametrize("gamma,ra_inverse", LABELS)
def test_df_integrates_to_density(gamma, ra_inverse):
    d = Dehnen(gamma, ra_inverse)
    radii = [1e-3, 0.1, 1.0, 10.0, 300.0]
    rho = np.array([_velocity_moment(d, r, 0) for r in radii])
    # Eddington's inversion is exact, so only quadrature errors remain (measured <= 5e-13).
    np.testing.assert_allclose(rho, d.density(radii), rtol=1e-9)


@pytest.mark.parametrize("gamma,ra_inverse", [(0.0, 2.0), (1.0, 4.0), (2.0, 20.0), (2.5, 5.0)])
def test_jeans_sigma_r_matches_df_moment(gamma, ra_inverse):
    d = Dehnen(gamma, ra_inverse)
    radii = np.array([1e-2, 0.3, 1.0, 5.0, 100.0])
    # <v_r^2> = <p^2> / 3 in the stretched variables; Jeans integral vs DF moment (measured 1e-13).
    moment = np.array([_velocity_moment(d, r, 2) / 3.0 for r in radii]) / d.density(radii)
    np.testing.assert_allclose(d.sigma_r(radii) ** 2, moment, rtol=1e-9)


def test_beta_from_tangential_moment():
    # Integrate f(x, v) itself (through Q(x, v), not f(Q)) over v = (v_r, v_t, 0) with measure
    # 2 pi v_t dv_r dv_t on the bound ellipse v_r^2 + v_t^2 (1 + r^2/r_a^2) < 2 Psi: checks the
    # L^2 / (2 r_a^2) term of Q and beta = r^2 / (r^2 + r_a^2) (sigma_t^2 = <v_t^2> / 2).
    # Coordinates v_r = v_esc sin(th), v_t = v_esc cos(th) eta / sqrt(stretch), with
    # eta = 1 - (1 - tau)^2, make Q = Psi cos^2(th) (1 - eta^2) vanish smoothly, so 200 x 200
    # Gauss-Legendre converges to ~1e-12.
    d = Dehnen(1.5, 3.0)
    nodes, weights = np.polynomial.legendre.leggauss(200)
    th, tau = np.meshgrid(0.5 * math.pi * nodes, 0.5 * (nodes + 1.0), indexing="ij")
    w2 = np.outer(0.5 * math.pi * weights, 0.5 * weights).ravel()
    for r in (0.1, 0.4, 2.0):
        v_esc, stretch = float(d.escape_speed(r)), 1.0 + (d.ra_inverse * r) ** 2
        eta = 1.0 - (1.0 - tau) ** 2
        v_r = (v_esc * np.sin(th)).ravel()
        v_t = (v_esc * np.cos(th) * eta / math.sqrt(stretch)).ravel()
        jacobian = (v_esc**2 * np.cos(th) ** 2 / math.sqrt(stretch) * 2.0 * (1.0 - tau)).ravel()
        f = d.df(np.tile([r, 0.0, 0.0], (v_r.size, 1)), np.stack([v_r, v_t, 0 * v_r], axis=1))
        measure = 2.0 * math.pi * v_t * f * jacobian * w2
        rho = measure.sum()
        s_r2, s_t2 = np.sum(measure * v_r**2) / rho, 0.5 * np.sum(measure * v_t**2) / rho
        assert abs(rho / float(d.density(r)) - 1.0) < 1e-9
        assert abs((1.0 - s_t2 / s_r2) - float(d.beta(r))) < 1e-9
        assert abs(s_r2 / float(d.sigma_r(r)) ** 2 - 1.0) < 1e-9


# ---- validity limit -----------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.0, 1.0, 1.5, 2.0])
def test_max_ra_inverse_is_where_f_touches_zero(gamma):
    kappa = max_ra_inverse(gamma)
    assert math.isfinite(kappa)
    Q = Dehnen(gamma).relative_potential(np.exp(np.linspace(-12, 12, 4001)))
    f0 = Dehnen(gamma).f(Q)
    f_limit = Dehnen(gamma, kappa).f(Q)
    f1 = (f_limit - f0) / kappa**2  # f is linear in (a/r_a)^2
    # At the limit min f / f0 is ~0 (grid step 0.006 in ln r_Q); 0.2 % beyond it f < 0 somewhere.
    assert np.min(f_limit / f0) > -1e-9 and np.min(f_limit / f0) < 1e-4
    assert np.min(f0 + (1.002 * kappa) ** 2 * f1) < 0
    with pytest.raises(InputError, match=r"a/r_a <= .*r_a >= "):
        Dehnen(gamma, 1.002 * kappa)


def test_no_limit_for_gamma_above_two():
    # Steep cusps support radial orbits (An & Evans 2006: gamma >= 2 beta(0)); f1 >= 0 everywhere.
    assert max_ra_inverse(2.5) == math.inf
    Dehnen(2.5, 1e3)


@pytest.mark.parametrize(
    "gamma,ra_inverse",
    [(3.0, 0.0), (-0.1, 0.0), (float("nan"), 0.0), (1.0, -0.5), (1.0, float("inf")), ("x", 0.0)],
)
def test_invalid_labels(gamma, ra_inverse):
    with pytest.raises(InputError, match="gamma|ra_inverse"):
        Dehnen(gamma, ra_inverse)


def test_check_labels():
    labels = check_labels([[1.0, 0.5], [2.0, 3.0]])
    assert labels.shape == (2, 2)
    with pytest.raises(InputError, match="r_a >= 0.20"):
        check_labels([[1.0, 0.5], [1.0, 6.0]])
    with pytest.raises(InputError, match=r"\[N, 2\]"):
        check_labels([[1.0, 0.5, 3.0]])


# ---- TensorFlow ---------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma,ra_inverse", [(0.0, 2.0), (1.0, 4.0), (2.0, 20.0), (2.5, 5.0)])
def test_tf_log_df_matches_numpy(gamma, ra_inverse):
    import tensorflow as tf

    d = Dehnen(gamma, ra_inverse, M=2.0, a=0.5)
    x, v = _random_phase_space(seed=1)
    x, v = 0.5 * x, v * d.velocity_scale
    ref = d.log_df(x, v)
    bound = np.isfinite(ref)
    assert bound.sum() > 50
    ours = d.tf_log_df(tf.constant(x), tf.constant(v)).numpy()
    assert np.array_equal(np.isfinite(ours), bound) and np.all(ours[~bound] == -np.inf)
    np.testing.assert_allclose(ours[bound], ref[bound], atol=1e-11)  # same float64 quadrature
    ours32 = d.tf_log_df(tf.constant(x, tf.float32), tf.constant(v, tf.float32)).numpy()
    # float32: Q = Psi - K loses eps Psi / Q; d log f / d log Q <= 5/2: |error| <~ 3 eps Psi / Q.
    q = d.om_energy(x, v)[bound]
    psi = d.relative_potential(np.linalg.norm(x, axis=1))[bound]
    tolerance = 5e-6 + 20 * np.finfo(np.float32).eps * psi / q
    assert np.all(np.abs(ours32[bound] - ref[bound]) < tolerance)


@pytest.mark.parametrize("gamma,ra_inverse", [(0.0, 2.0), (1.0, 4.0), (2.0, 20.0), (2.5, 5.0)])
def test_tf_gradient_matches_finite_differences(gamma, ra_inverse):
    import tensorflow as tf

    d = Dehnen(gamma, ra_inverse)
    x, v = _random_phase_space(n=500, seed=2, v_scale=0.3)
    xt, vt = tf.constant(x), tf.constant(v)
    with tf.GradientTape() as tape:
        tape.watch([xt, vt])
        log_f = d.tf_log_df(xt, vt)
    gx, gv = (g.numpy() for g in tape.gradient(log_f, [xt, vt]))
    bound = np.isfinite(log_f.numpy())
    assert np.all(np.isfinite(gx)) and np.all(gx[~bound] == 0)
    h = 1e-6
    for i in range(3):
        e = np.zeros(3)
        e[i] = h
        with np.errstate(invalid="ignore"):
            fdx = (d.log_df(x + e, v) - d.log_df(x - e, v)) / (2 * h)
            fdv = (d.log_df(x, v + e) - d.log_df(x, v - e)) / (2 * h)
        ok = bound & np.isfinite(fdx) & np.isfinite(fdv)
        # Central differences: O(h^2 log f''') + O(eps / h) ~ 1e-9 of the gradient's scale.
        np.testing.assert_allclose(gx[ok, i], fdx[ok], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(gv[ok, i], fdv[ok], rtol=1e-6, atol=1e-6)


def test_tf_per_row_labels_in_tf_function():
    import tensorflow as tf

    x, v = _random_phase_space(n=3000, seed=3, v_scale=0.4)
    rng = np.random.default_rng(4)
    nodes = np.array([[0.5, 1.0], [1.0, 0.0], [2.2, 5.0]])
    labels = nodes[rng.integers(0, 3, len(x))]
    fn = tf.function(
        tf_log_df,
        input_signature=[tf.TensorSpec([None, 3], tf.float64)] * 2
        + [tf.TensorSpec([None, 2], tf.float64)],
    )
    ours = fn(tf.constant(x), tf.constant(v), tf.constant(labels)).numpy()
    ref = np.empty(len(x))
    for gamma, kappa in nodes:
        rows = np.all(labels == [gamma, kappa], axis=1)
        ref[rows] = Dehnen(gamma, kappa).log_df(x[rows], v[rows])
    bound = np.isfinite(ref)
    assert np.array_equal(np.isfinite(ours), bound)
    np.testing.assert_allclose(ours[bound], ref[bound], atol=1e-11)
    fixed = tf_log_df(tf.constant(x), tf.constant(v), tf.constant([1.0, 0.0], tf.float64)).numpy()
    np.testing.assert_allclose(
        fixed[np.isfinite(fixed)], Hernquist().log_df(x, v)[np.isfinite(fixed)], atol=1e-11
    )


# ---- samplers -----------------------------------------------------------------------------------


def _check_kinematics(d: Dehnen, cat, bins=8):
    """Per radial bin: means of v_r^2 / sigma_r^2(r_i) and v_t^2 / (2 sigma_t^2(r_i)) are 1 within
    4 standard errors."""
    r = cat.r
    r_hat = cat.pos / r[:, None]
    v_r = np.sum(cat.vel * r_hat, axis=1)
    v_t2 = np.sum(cat.vel**2, axis=1) - v_r**2
    radial = v_r**2 / d.sigma_r(r) ** 2
    tangential = v_t2 / (2.0 * d.sigma_t(r) ** 2)
    edges = np.quantile(r, np.linspace(0.02, 0.98, bins + 1))
    for lo, hi in zip(edges[:-1], edges[1:]):
        rows = (r >= lo) & (r < hi)
        for ratio in (radial[rows], tangential[rows]):
            standard_error = ratio.std() / math.sqrt(ratio.size)
            assert abs(ratio.mean() - 1.0) < 4.0 * standard_error, (
                lo,
                hi,
                ratio.mean(),
                standard_error,
            )


@pytest.mark.parametrize("gamma,ra_inverse", [(0.0, 2.0), (1.0, 0.0), (1.5, 3.0), (2.5, 5.0)])
def test_sampler_reproduces_mass_profile_and_kinematics(gamma, ra_inverse):
    d = Dehnen(gamma, ra_inverse)
    cat = sample_dehnen(40_000, gamma, ra_inverse, seed=11)
    assert cat.pos.shape == (40_000, 3) and np.all(np.isfinite(cat.vel))
    # Radii: KS against M(<r) (fixed seed; a wrong exponent gives p ~ 0).
    assert stats.kstest(cat.r, lambda r: d.enclosed_mass(r)).pvalue > 0.01
    assert np.all(d.om_energy(cat.pos, cat.vel) > 0)
    _check_kinematics(d, cat)


def test_sampler_r_max_and_meta():
    cat = sample_dehnen(5000, 0.5, 1.0, seed=3, r_max=10.0)
    d = Dehnen(0.5, 1.0)
    assert cat.r.max() < 10.0

    def truncated(r):
        return d.enclosed_mass(np.minimum(r, 10.0)) / d.enclosed_mass(10.0)

    assert stats.kstest(cat.r, truncated).pvalue > 0.01
    assert cat.meta["gamma"] == 0.5 and cat.meta["ra_inverse"] == 1.0 and cat.meta["seed"] == 3
    same = sample_dehnen(5000, 0.5, 1.0, seed=3, r_max=10.0)
    np.testing.assert_array_equal(cat.vel, same.vel)
    with pytest.raises(InputError, match="r_a >= "):
        sample_dehnen(10, 1.0, 10.0, seed=1)


def test_grid_sampler(tmp_path):
    cat = sample_dehnen_grid([0.5, 1.5], [0.0, 1.0], 4000, seed=5, r_max=50.0)
    assert (
        len(cat) == 16_000 and cat.label_names == LABEL_NAMES and cat.labels.shape == (16_000, 2)
    )
    nodes, counts = np.unique(cat.labels, axis=0, return_counts=True)
    np.testing.assert_array_equal(nodes, [[0.5, 0.0], [0.5, 1.0], [1.5, 0.0], [1.5, 1.0]])
    assert np.all(counts == 4000)
    assert len(np.unique(cat.labels[:8], axis=0)) > 1  # rows are shuffled across nodes
    for gamma, kappa in nodes:
        rows = np.all(cat.labels == [gamma, kappa], axis=1)
        d = Dehnen(gamma, kappa)
        assert (
            stats.kstest(
                cat.r[rows], lambda r: d.enclosed_mass(np.minimum(r, 50.0)) / d.enclosed_mass(50.0)
            ).pvalue
            > 0.01
        )
    loaded = type(cat).load(cat.save(tmp_path / "grid.npz"))
    np.testing.assert_array_equal(loaded.labels, cat.labels)
    assert tuple(loaded.label_names) == LABEL_NAMES
    with pytest.raises(InputError, match="r_a >= "):
        sample_dehnen_grid([1.0], [0.0, 6.0], 10, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("gamma,ra_inverse", [(0.0, 2.2), (1.0, 4.9), (2.0, 45.0), (2.9, 0.0)])
def test_sampler_kinematics_large(gamma, ra_inverse):
    d = Dehnen(gamma, ra_inverse)
    cat = sample_dehnen(400_000, gamma, ra_inverse, seed=12)
    assert stats.kstest(cat.r, lambda r: d.enclosed_mass(r)).pvalue > 0.01
    _check_kinematics(d, cat, bins=16)
