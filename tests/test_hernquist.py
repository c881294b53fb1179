"""Physics tests of tfgalflow.hernquist, each against an independent reference.

References used: scipy quadrature of the defining integrals (mass, potential, phase-space
normalisation, velocity moments, Jeans equation), central finite differences, the literal closed
forms of Hernquist (1990) eqs. 10 and 17 where they are numerically safe, and the NumPy
implementation for the TF twin. Non-unit (M, a, G) are used throughout so that a wrong power of G,
M or a cannot cancel.
"""
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import integrate

from tfgalflow.errors import InputError
from tfgalflow.exact import ExactDF
from tfgalflow.hernquist import Hernquist

UNIT = Hernquist()
SCALED = Hernquist(M=2.5, a=0.7, G=1.3)
MODELS = [pytest.param(UNIT, id="unit"), pytest.param(SCALED, id="M2.5_a0.7_G1.3")]
KINDS = ["iso", "aniso"]


def _point(r, v_r, v_t):
    """x = (r, 0, 0), v = (v_r, v_t, 0) as [1, 3] arrays."""
    return np.array([[r, 0.0, 0.0]]), np.array([[v_r, v_t, 0.0]])


def _f(model, kind, r, v_r, v_t):
    x, v = _point(r, v_r, v_t)
    return float(model.df(x, v, kind)[0])


def _density_from_df(model, kind, r, weight=lambda v_r, v_t: 1.0):
    """int d^3v weight * f at radius r, as a genuine 2-D quadrature over (v_r, v_t >= 0) with
    d^3v = 2 pi v_t dv_t dv_r.

    The 1/L = 1/(r v_t) singularity of the aniso DF is cancelled analytically by the 2 pi v_t
    Jacobian (the integrand 2 pi v_t f is finite); quad never evaluates the endpoint v_t = 0.
    """
    v_esc = float(model.escape_speed(r))
    value, _ = integrate.dblquad(
        lambda v_t, v_r: 2.0 * np.pi * v_t * weight(v_r, v_t) * _f(model, kind, r, v_r, v_t),
        -v_esc, v_esc, 0.0, lambda v_r: math.sqrt(max(v_esc**2 - v_r**2, 0.0)),
        epsabs=0.0, epsrel=1e-7)
    return value


# ---- structure -------------------------------------------------------------------------------

@pytest.mark.parametrize("model", MODELS)
def test_enclosed_mass_equals_integral_of_density(model):
    # quad of 4 pi r^2 rho to epsrel 1e-12 -> agreement to 1e-9 rejects any wrong factor or power.
    for R in (0.01, 0.7, 3.0, 50.0):
        mass, _ = integrate.quad(
            lambda r: 4 * np.pi * r**2 * model.density(r),
            0.0,
            R,
            epsabs=0,
            epsrel=1e-12,
            limit=200,
        )
        assert mass == pytest.approx(float(model.enclosed_mass(R)), rel=1e-9)
    total, _ = integrate.quad(
        lambda r: 4 * np.pi * r**2 * model.density(r), 0.0, np.inf, epsrel=1e-10, limit=200
    )
    assert total == pytest.approx(model.M, rel=1e-8)


@pytest.mark.parametrize("model", MODELS)
def test_potential_equals_integral_of_force(model):
    # Phi(r) = -int_r^inf G M(<r') / r'^2 dr' (Phi -> 0 at infinity); quad to 1e-12 -> compare at
    # 1e-9.
    for r in (0.05, 1.0, 20.0):
        phi, _ = integrate.quad(
            lambda s: -model.G * model.enclosed_mass(s) / s**2, r, np.inf, epsrel=1e-12
        )
        assert float(model.potential(r)) == pytest.approx(phi, rel=1e-9)
        assert float(model.relative_potential(r)) == pytest.approx(-phi, rel=1e-9)
        assert float(model.escape_speed(r)) == pytest.approx(math.sqrt(-2 * phi), rel=1e-9)


@pytest.mark.parametrize("model", MODELS)
def test_acceleration_is_minus_gradient_of_potential(model):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 3)) * 2.0
    h = 1e-5
    numeric = np.empty_like(x)
    for j in range(3):
        step = np.zeros(3)
        step[j] = h
        numeric[:, j] = -(model.potential(np.linalg.norm(x + step, axis=1))
                          - model.potential(np.linalg.norm(x - step, axis=1))) / (2 * h)
    # central differences: truncation h^2 |Phi'''| ~ 1e-10, round-off eps |Phi| / h ~ 1e-11; rel
    # 1e-7 is safe and still 10^6 times smaller than a wrong factor.
    np.testing.assert_allclose(model.acceleration(x), numeric, rtol=1e-7, atol=1e-9)
    # radial: g points inwards
    assert np.all(np.sum(model.acceleration(x) * x, axis=1) < 0)


@pytest.mark.parametrize("model", MODELS)
def test_limits_at_centre_and_infinity(model):
    # exact limits: M(<0) = 0, M(<inf) = M, Psi(0) = G M / a, Psi(inf) = 0, v_c and sigma vanish at
    # both ends, sigma_r^2(aniso, 0) = G M / (4 a).
    r = np.array([0.0, np.inf])
    np.testing.assert_array_equal(model.enclosed_mass(r), [0.0, model.M])
    np.testing.assert_allclose(
        model.relative_potential(r), [model.G * model.M / model.a, 0.0], rtol=1e-15
    )
    np.testing.assert_array_equal(model.circular_speed(r), [0.0, 0.0])
    np.testing.assert_array_equal(model.sigma_r(r, "iso"), [0.0, 0.0])
    np.testing.assert_allclose(
        model.sigma_r(r, "aniso") ** 2, [model.G * model.M / (4 * model.a), 0.0], rtol=1e-15
    )
    np.testing.assert_array_equal(model.acceleration(np.zeros((1, 3))), np.zeros((1, 3)))


@pytest.mark.parametrize("model", MODELS)
def test_circular_speed_squared_is_r_times_acceleration(model):
    r = np.array([0.01, 0.3, 1.0, 7.0, 100.0])
    x = np.stack([r / math.sqrt(3)] * 3, axis=1)
    g = np.linalg.norm(model.acceleration(x), axis=1)
    # identity: round-off only
    np.testing.assert_allclose(model.circular_speed(r) ** 2, r * g, rtol=1e-13)


# ---- distribution functions ------------------------------------------------------------------

def test_f_iso_bracket_against_quadrature_and_eq17():
    # Independent truth for eq. 17's bracket: B(q) = 128 int_0^q t^4 (1 - t^2)^(3/2) dt
    # (dB/dq by hand), which has no cancellation. quad to 1e-13 -> compare at 1e-11 over q from
    # 1e-4 (deep in the series branch, where the literal eq. 17 loses ~q^-4 digits) to 0.999
    # (the direct branch).
    prefactor = 1.0 / (8 * math.sqrt(2) * math.pi**3)
    for q in (1e-4, 0.01, 0.3, 0.7, 0.7072, 0.9, 0.999):
        bracket, _ = integrate.quad(
            lambda t: 128 * t**4 * (1 - t * t) ** 1.5, 0.0, q, epsabs=0, epsrel=1e-13
        )
        expected = prefactor * (1 - q * q) ** -2.5 * bracket
        assert float(UNIT.f_iso(q * q)) == pytest.approx(expected, rel=1e-11)
    # literal eq. 17 where it is well conditioned (q >= 0.3: cancellation costs < 100 ulp)
    for q in (0.3, 0.6, 0.9, 0.99):
        literal = (
            prefactor
            * (1 - q * q) ** -2.5
            * (
                3 * math.asin(q)
                + q * math.sqrt(1 - q * q) * (1 - 2 * q * q) * (8 * q**4 - 8 * q * q - 3)
            )
        )
        assert float(UNIT.f_iso(q * q)) == pytest.approx(literal, rel=1e-12)
    assert float(UNIT.f_iso(0.0)) == 0.0 and float(UNIT.f_iso(-0.1)) == 0.0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model", MODELS)
def test_df_normalised_to_total_mass(model, kind):
    """int f d^3x d^3v = M, quadrature over r (mapped to u = r/(r+a) in (0,1)) and speed v.

    iso: rho(r) = 4 pi int v^2 f dv. aniso: f = g(E) / (r v sin eta) with eta the angle between x
    and v, so int sin(eta) f d(eta) over (0, pi) = pi f(eta = pi/2) analytically and
    rho(r) = 2 pi^2 int v^2 f(eta=pi/2) dv.
    """
    def rho_from_df(r):
        v_esc = float(model.escape_speed(r))
        angular = 4 * np.pi if kind == "iso" else 2 * np.pi**2
        inner, _ = integrate.quad(
            lambda v: angular * v * v * _f(model, kind, r, 0.0, v),
            0.0,
            v_esc,
            epsabs=0,
            epsrel=1e-8,
            limit=200,
        )
        return inner

    def integrand(u):
        r = model.a * u / (1 - u)
        return 4 * np.pi * r * r * rho_from_df(r) * model.a / (1 - u) ** 2

    total, _ = integrate.quad(integrand, 0.0, 1.0, epsabs=0, epsrel=1e-7, limit=200)
    # quadrature tolerance 1e-7; the brief asks for 1e-3, we hold 1e-6
    # (a wrong G, M or a power is O(1)).
    assert total == pytest.approx(model.M, rel=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model", MODELS)
def test_velocity_integral_of_df_is_density(model, kind):
    # genuine 2-D quadrature over (v_r, v_t) to epsrel 1e-7 (measured error ~1e-12) -> compare at
    # 1e-6.
    for r in (0.05, 1.0, 20.0):
        assert _density_from_df(model, kind, r) == pytest.approx(float(model.density(r)), rel=1e-6)


def test_aniso_df_scaling_formula():
    # f(E, L) = 3 (aE/GM)^2 / (4 pi^3 G a L) reduces to 3 E^2 / (4 pi^3 L) in model units, and
    # scales as the dimensional argument says: f -> f M / (a^3 v_g^3) when E -> E GM/a,
    # L -> L a v_g.
    E, L = 0.3, 0.4
    assert float(UNIT.f_aniso(E, L)) == pytest.approx(3 * E**2 / (4 * math.pi**3 * L), rel=1e-14)
    m = SCALED
    vg = math.sqrt(m.G * m.M / m.a)
    assert float(m.f_aniso(E * m.G * m.M / m.a, L * m.a * vg)) == pytest.approx(
        float(UNIT.f_aniso(E, L)) * m.M / (m.a**3 * vg**3), rel=1e-13)
    # likewise for the isotropic DF
    assert float(m.f_iso(E * m.G * m.M / m.a)) == pytest.approx(
        float(UNIT.f_iso(E)) * m.M / (m.a**3 * vg**3), rel=1e-13
    )


def test_df_is_consistent_with_relative_energy():
    rng = np.random.default_rng(3)
    x, v = rng.normal(size=(200, 3)), rng.normal(size=(200, 3))
    E = SCALED.relative_energy(x, v)
    iso = SCALED.df(x, v, "iso")
    # two routes to q^2: round-off only
    np.testing.assert_allclose(iso, SCALED.f_iso(E), rtol=1e-12)
    L = np.linalg.norm(np.cross(x, v), axis=1)
    np.testing.assert_allclose(SCALED.df(x, v, "aniso"), SCALED.f_aniso(E, L), rtol=1e-12)
    unbound = E <= 0
    assert unbound.any() and (~unbound).any()
    assert np.all(np.isneginf(SCALED.log_df(x[unbound], v[unbound])))
    assert np.all(SCALED.df(x[unbound], v[unbound], "aniso") == 0)


# ---- Jeans -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model", MODELS)
def test_sigma_r_solves_jeans_equation(model, kind):
    # Spherical Jeans with constant beta:
    # r^(2 beta) rho sigma_r^2 = int_r^inf r'^(2 beta) rho G M(<r') / r'^2 dr'.
    # quad to 1e-12 -> compare at 1e-9, from deep in the cusp (1e-3 a) to far out (1e3 a:
    # closed-form eq. 10 cancels there; our series must not).
    b2 = 2 * float(model.beta(1.0, kind))
    for r in (1e-3, 0.1, 0.7, 1.0, 5.0, 1e3):
        integral, _ = integrate.quad(
            lambda s: s**b2 * model.density(s) * model.G * model.enclosed_mass(s) / s**2,
            r, np.inf, epsabs=0, epsrel=1e-12, limit=200)
        expected = integral / (r**b2 * float(model.density(r)))
        assert float(model.sigma_r(r, kind)) ** 2 == pytest.approx(expected, rel=1e-9)
    r = np.array([0.0, 0.2, 2.0])
    np.testing.assert_allclose(
        model.sigma_t(r, kind) ** 2, (1 - b2 / 2) * model.sigma_r(r, kind) ** 2, rtol=1e-14
    )


def test_sigma_r_iso_equals_hernquist_eq10():
    # literal eq. 10 where its cancellation is mild (r <= 3a: < 1e-12 lost); both branches of ours
    # covered.
    m = SCALED
    r = np.array([0.01, 0.3, 0.69, 0.7, 0.71, 1.5, 2.1])
    s = r / m.a
    eq10 = m.G * m.M / (12 * m.a) * (12 * s * (1 + s) ** 3 * np.log((1 + s) / s)
                                     - s / (1 + s) * (25 + 52 * s + 42 * s**2 + 12 * s**3))
    np.testing.assert_allclose(m.sigma_r(r, "iso") ** 2, eq10, rtol=1e-11)
    assert float(m.sigma_r(0.0, "iso")) == 0.0
    # far out sigma_r^2 -> G M / (5 r) (leading term of the series)
    assert float(m.sigma_r(1e8, "iso")) ** 2 == pytest.approx(m.G * m.M / (5 * 1e8), rel=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_dispersions_are_velocity_moments_of_df(kind):
    # sigma_r^2 = <v_r^2>, sigma_t^2 = <v_t^2>/2 by 2-D quadrature of the DF
    # (epsrel 1e-7) -> compare at 1e-6. This ties f(E, L) to the Jeans profiles:
    # beta = 1 - sigma_t^2 / sigma_r^2 is 0 (iso) and 1/2 (aniso).
    m = SCALED
    for r in (0.3, 2.0):
        rho = _density_from_df(m, kind, r)
        s_r2 = _density_from_df(m, kind, r, lambda v_r, v_t: v_r * v_r) / rho
        s_t2 = _density_from_df(m, kind, r, lambda v_r, v_t: 0.5 * v_t * v_t) / rho
        assert s_r2 == pytest.approx(float(m.sigma_r(r, kind)) ** 2, rel=1e-6)
        assert s_t2 == pytest.approx(float(m.sigma_t(r, kind)) ** 2, rel=1e-6)
        assert 1 - s_t2 / s_r2 == pytest.approx(float(m.beta(r, kind)), abs=1e-6)


# ---- TensorFlow twin -------------------------------------------------------------------------

def _phase_points(n, seed):
    """Mixed bound/unbound points spanning both branches of eq. 17, including near-centre ones."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)) * rng.lognormal(0.0, 1.0, size=(n, 1))
    v = rng.normal(size=(n, 3)) * rng.uniform(0.0, 1.2, size=(n, 1))
    x[:5] *= 1e-4                      # close to the centre: q -> 1
    v[:5] *= 1e-3
    return x, v


@pytest.mark.parametrize("kind", KINDS)
def test_tf_log_df_matches_numpy_float64(kind):
    x, v = _phase_points(400, 1)
    expected = SCALED.log_df(x, v, kind)
    got = SCALED.tf_log_df(x, v, kind).numpy()
    assert got.dtype == np.float64
    bound = np.isfinite(expected)
    assert 0.2 < bound.mean() < 0.95
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(expected))
    # same formulas, same dtype: only op-order round-off, a few ulp of |log f| ~ 10
    np.testing.assert_allclose(got[bound], expected[bound], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        SCALED.tf_df(x, v, kind).numpy(), SCALED.df(x, v, kind), rtol=1e-11, atol=0
    )


@pytest.mark.parametrize("kind", KINDS)
def test_tf_log_df_float32_accuracy(kind):
    x, v = _phase_points(400, 2)
    x32, v32 = x.astype(np.float32), v.astype(np.float32)
    got = SCALED.tf_log_df(x32, v32, kind).numpy()
    assert got.dtype == np.float32
    # same (rounded) inputs
    expected = SCALED.log_df(x32.astype(np.float64), v32.astype(np.float64), kind)
    q2 = SCALED.relative_energy(x32, v32) / SCALED.energy_scale
    r = np.linalg.norm(x32.astype(np.float64), axis=1)
    p2 = (
        r / (r + SCALED.a)
        + 0.5 * np.sum(v32.astype(np.float64) ** 2, axis=1) / SCALED.energy_scale
    )
    ok = np.isfinite(expected) & (q2 > 1e-3)
    # q^2 and p^2 = 1 - q^2 are each formed from O(1) terms with a few roundings
    # (abs error <~ 4 eps32), and log f depends on them through 5/2 log p^2 + log B(q)
    # (d log B / d log q^2 <= 5/2) and 2 log q^2 (aniso), so |error| <~ 2.5 * 4 eps32
    # (1/q^2 + 1/p^2) + a few eps32 |log f|; we allow 64 eps32 (...) on top.
    eps = np.finfo(np.float32).eps
    tol = 64 * eps * (1 + 1 / q2[ok] + 1 / p2[ok] + np.abs(expected[ok]))
    assert np.all(np.abs(got[ok] - expected[ok]) <= tol)
    # and in absolute terms for the well-bound majority (q^2 > 0.05): 1e-4 in log f
    # (measured 3.6e-6; 10^4 below an O(1) slip)
    well = ok & (q2 > 0.05)
    assert well.sum() > 50 and np.max(np.abs(got[well] - expected[well])) < 1e-4
    # near the centre the relative error stays small although f ~ (1 - q^2)^-5/2 is huge
    assert np.max(np.abs(got[:5] - expected[:5])) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_tf_gradients_match_finite_differences(kind):
    import tensorflow as tf

    rng = np.random.default_rng(4)
    x = rng.normal(size=(64, 3))
    v = rng.normal(size=(64, 3)) * 0.5
    q2 = SCALED.relative_energy(x, v) / SCALED.energy_scale
    L = np.linalg.norm(np.cross(x, v), axis=1)
    keep = (q2 > 0.02) & (L > 0.05) & (np.linalg.norm(x, axis=1) > 0.05)
    x, v = x[keep], v[keep]
    # both branches of eq. 17
    assert len(x) >= 20 and (q2[keep] < 0.5).any() and (q2[keep] > 0.5).any()
    xt, vt = tf.constant(x), tf.constant(v)
    with tf.GradientTape() as tape:
        tape.watch([xt, vt])
        log_f = SCALED.tf_log_df(xt, vt, kind)
    gx, gv = (g.numpy() for g in tape.gradient(log_f, [xt, vt]))
    h = 1e-6
    for grad, which in ((gx, 0), (gv, 1)):
        numeric = np.empty_like(grad)
        for j in range(3):
            step = np.zeros(3)
            step[j] = h
            args_p = [x, v]
            args_m = [x, v]
            args_p[which] = args_p[which] + step
            args_m[which] = args_m[which] - step
            numeric[:, j] = (SCALED.log_df(*args_p, kind) - SCALED.log_df(*args_m, kind)) / (2 * h)
        # truncation h^2 |f'''| <~ 1e-10, round-off eps |log f| / h ~ 1e-9: 1e-6 leaves margin, and
        # a wrong sign or factor in any term would be O(|grad|).
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_tf_gradients_finite_in_mixed_batch(kind):
    import tensorflow as tf

    x, v = _phase_points(200, 5)
    x[5] = 0.0                        # centre
    v[6] = 0.0                        # at rest (L = 0 for aniso)
    v[7] = 10.0                       # far unbound
    xt, vt = tf.constant(x, tf.float32), tf.constant(v, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch([xt, vt])
        log_f = SCALED.tf_log_df(xt, vt, kind)
        bound = tf.math.is_finite(log_f)
        loss = tf.reduce_sum(tf.where(bound, log_f, tf.zeros_like(log_f)))
    gx, gv = (g.numpy() for g in tape.gradient(loss, [xt, vt]))
    assert np.all(np.isfinite(gx)) and np.all(np.isfinite(gv))
    unbound = ~bound.numpy()
    assert unbound.sum() > 10
    assert np.all(gx[unbound] == 0) and np.all(gv[unbound] == 0)
    assert np.isneginf(log_f.numpy()[7])


def test_tf_acceleration_matches_numpy():
    x, _ = _phase_points(100, 6)
    x[0] = 0.0
    g64 = SCALED.tf_acceleration(x).numpy()
    np.testing.assert_allclose(g64, SCALED.acceleration(x), rtol=1e-14, atol=0)
    g32 = SCALED.tf_acceleration(x.astype(np.float32)).numpy()
    assert g32.dtype == np.float32
    # a handful of float32 roundings (each eps32 = 1.2e-7) on an O(1)-conditioned formula
    np.testing.assert_allclose(g32, SCALED.acceleration(x.astype(np.float32)), rtol=1e-6, atol=0)


def test_exact_density_adapter():
    import tensorflow as tf

    for kind in KINDS:
        df = SCALED.exact_density(kind)
        assert isinstance(df, ExactDF) and df.dim == 6 and df.label_dim == 0
        x, v = _phase_points(50, 7)
        w = np.concatenate([x, v], axis=1).astype(np.float32)
        wt = tf.constant(w)
        with tf.GradientTape() as tape:
            tape.watch(wt)
            log_p = df.log_prob(wt)
            masked = tf.where(tf.math.is_finite(log_p), log_p, tf.zeros_like(log_p))
        assert log_p.dtype == tf.float32 and log_p.shape == (50,)
        eager = SCALED.tf_log_df(w[:, :3], w[:, 3:], kind).numpy()
        np.testing.assert_array_equal(np.isneginf(log_p.numpy()), np.isneginf(eager))
        # the traced graph may fuse/reorder float32 ops (Grappler): allow a few ulp of
        # |log f| <~ 25
        np.testing.assert_allclose(
            log_p.numpy(), eager, rtol=4 * np.finfo(np.float32).eps, atol=1e-5
        )
        assert np.all(np.isfinite(tape.gradient(masked, wt).numpy()))
        # one float32 ulp of |log f| <~ 25 is 2e-6 relative in f (tf.exp vs np.exp, graph rounding)
        np.testing.assert_allclose(df.prob(w).numpy(), np.exp(log_p.numpy()), rtol=1e-5)
        with pytest.raises(InputError, match=r"\[N, 6\]"):
            df.log_prob(w[:, :5])
        with pytest.raises(InputError, match="labels"):
            df.log_prob(w, labels=np.zeros((50, 1), np.float32))


# ---- errors and import weight ----------------------------------------------------------------

def test_input_errors():
    x, v = np.zeros((4, 3)), np.zeros((4, 3))
    for call in (lambda: UNIT.log_df(x, v, "plummer"), lambda: UNIT.df(x, v, "plummer"),
                 lambda: UNIT.sigma_r(1.0, "plummer"), lambda: UNIT.beta(1.0, "plummer"),
                 lambda: UNIT.tf_log_df(x, v, "plummer"), lambda: UNIT.exact_density("plummer")):
        with pytest.raises(InputError, match=r"'plummer'.*'iso', 'aniso'"):
            call()
    for call in (
        lambda: UNIT.log_df(np.zeros((4, 2)), v),
        lambda: UNIT.relative_energy(x, np.zeros(3)),
        lambda: UNIT.acceleration(np.zeros((4, 3, 1))),
        lambda: UNIT.tf_log_df(x, np.zeros((4, 4))),
        lambda: UNIT.tf_acceleration(np.zeros((4, 2))),
    ):
        with pytest.raises(InputError, match=r"\[N, 3\]"):
            call()
    with pytest.raises(InputError, match="same N"):
        UNIT.df(x, np.zeros((3, 3)))
    with pytest.raises(InputError, match="NaN"):
        UNIT.df(np.full((1, 3), np.nan), np.zeros((1, 3)))
    with pytest.raises(InputError, match="radius"):
        UNIT.density(-1.0)
    for bad in (dict(M=0.0), dict(a=-1.0), dict(G=float("nan")), dict(M="heavy")):
        with pytest.raises(InputError, match=next(iter(bad))):
            Hernquist(**bad)


def test_import_does_not_load_tensorflow():
    code = "import sys, tfgalflow.hernquist as h; h.Hernquist().df([[1,0,0]], [[0,0.1,0]]); " \
           "print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
