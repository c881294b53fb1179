"""Tests of tfgalflow.cbe: DF gradients, velocity sampling at fixed x, the batched CBE least
squares.

Every numerical check compares with an independent truth: the analytic Hernquist acceleration and
Jeans dispersions, finite differences of the NumPy DF, the exact speed distribution p(|v| | r) by
quadrature (KS test at a fixed seed), NumPy's lstsq, or a closed-form toy DF.
"""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from scipy import integrate, stats

from tfgalflow import cbe
from tfgalflow.density import Density
from tfgalflow.errors import InputError
from tfgalflow.flows import FlowConfig
from tfgalflow.hernquist import Hernquist
from tfgalflow.model import Ensemble, Flow

H = Hernquist()
KINDS = ("iso", "aniso")


def random_directions(n: int, rng: np.random.Generator) -> np.ndarray:
    d = rng.normal(size=(n, 3))
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def relative_error(a: np.ndarray, truth: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a - truth, axis=1) / np.linalg.norm(truth, axis=1)


# ---- toy DFs with closed-form answers -----------------------------------------------------------

class Harmonic(Density):
    """log f = -k|x|^2 - |v|^2/2 = -(|v|^2/2 + Φ), Φ = k|x|^2: steady state in a = -∇Φ = -2k x
    (default k = 2: a = -4x)."""
    dim, label_dim = 6, 0

    def __init__(self, k: float = 2.0):
        self.k = k

    def log_prob_tensor(self, w, labels=None):
        return -self.k * tf.reduce_sum(tf.square(w[:, :3]), 1) - 0.5 * tf.reduce_sum(
            tf.square(w[:, 3:]), 1
        )


class OpaqueHarmonic(Harmonic):
    """Harmonic whose maths XLA may not inline (as a loaded SavedModel's functions): plain graph
    only."""

    inlinable = False


class Ball(Density):
    """f = 1 for |x| < 1 and |v| < 1, else 0: no support outside, and no gradients (singular CBE)
    inside."""

    dim, label_dim = 6, 0

    def log_prob_tensor(self, w, labels=None):
        inside = (tf.norm(w[:, :3], axis=1) < 1) & (tf.norm(w[:, 3:], axis=1) < 1)
        return tf.where(inside, tf.zeros_like(w[:, 0]), tf.fill(tf.shape(w[:, 0]), -np.inf))


class Sheared(Density):
    """log f = -|x|^2/2 - |v|^2/2 - x.v/2: not a steady state of any potential (the CBE has no
    solution)."""

    dim, label_dim = 6, 0

    def log_prob_tensor(self, w, labels=None):
        x, v = w[:, :3], w[:, 3:]
        return (
            -0.5 * tf.reduce_sum(x * x, 1)
            - 0.5 * tf.reduce_sum(v * v, 1)
            - 0.5 * tf.reduce_sum(x * v, 1)
        )


# ---- gradients ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_df_gradients_match_finite_differences_of_numpy_log_df(kind):
    rng = np.random.default_rng(11)
    n = 64
    r = np.geomspace(0.1, 10.0, n)
    x = r[:, None] * random_directions(n, rng)
    speed = rng.uniform(0.1, 0.9, n) * H.escape_speed(r)          # bound, away from E = 0
    v = speed[:, None] * random_directions(n, rng)
    g_x, g_v = (
        t.numpy().astype(np.float64) for t in cbe.df_gradients(H.exact_density(kind), x, v)
    )
    # Central differences of the float64 NumPy DF, step 1e-6 relative: truncation ~1e-12, rounding
    # ~1e-10.
    fd = np.zeros((n, 6))
    w = np.concatenate([x, v], axis=1)
    for j in range(6):
        step = 1e-6 * np.maximum(np.abs(w[:, j]), 1e-2)
        up, down = w.copy(), w.copy()
        up[:, j] += step
        down[:, j] -= step
        fd[:, j] = (
            H.log_df(up[:, :3], up[:, 3:], kind) - H.log_df(down[:, :3], down[:, 3:], kind)
        ) / (2 * step)
    # float32 autodiff: measured max 5.7e-7 (iso) and 5.4e-7 (aniso) per row; 1e-4 fails on any
    # wrong term.
    for got, want in ((g_x, fd[:, :3]), (g_v, fd[:, 3:])):
        err = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
        assert err.max() < 1e-4, err.max()


# ---- the least-squares layer --------------------------------------------------------------------

def test_cbe_layer_matches_numpy_lstsq_per_system():
    rng = np.random.default_rng(3)
    b_sys, k = 20, 40
    g_v = rng.normal(size=(b_sys, k, 3)) * rng.uniform(0.1, 10, size=(b_sys, 1, 3))
    v = rng.normal(size=(b_sys, k, 3))
    # inconsistent systems: residual well above 0
    g_x = rng.normal(size=(b_sys, k, 3))
    mask = rng.uniform(size=(b_sys, k)) > 0.2
    a, residual, condition = (
        t.numpy() for t in cbe.CBELayer()((g_x, g_v, v, mask.astype(np.float32)))
    )
    # reference: one NumPy least-squares solve per system
    for i in range(b_sys):
        rows = mask[i]
        G, b = g_v[i, rows], np.sum(v[i, rows] * g_x[i, rows], axis=1)
        ref, *_ = np.linalg.lstsq(G, -b, rcond=None)
        # float32 inputs/outputs around a float64 solve: 1e-5 relative.
        np.testing.assert_allclose(a[i], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        np.testing.assert_allclose(
            residual[i], np.linalg.norm(b + G @ ref) / np.linalg.norm(b), rtol=1e-5
        )
        np.testing.assert_allclose(condition[i], np.linalg.cond(G.T @ G), rtol=1e-4)
    assert np.all(residual > 0.3)                        # random g_x: the CBE cannot hold


def test_cbe_layer_exact_consistent_system_and_singular_system():
    rng = np.random.default_rng(4)
    k = 32
    a_true = rng.normal(size=(5, 3))
    g_v = rng.normal(size=(5, k, 3))
    v = rng.normal(size=(5, k, 3))
    # g_x along v with v.g_x = -a.g_v: the CBE holds exactly at every velocity.
    g_x = -np.einsum("bi,bki->bk", a_true, g_v)[..., None] * v / np.sum(v * v, -1, keepdims=True)
    a, residual, _ = (t.numpy() for t in cbe.CBELayer()((g_x, g_v, v)))
    np.testing.assert_allclose(a, a_true, rtol=0, atol=1e-5)     # float32 inputs of O(1): ~1e-6
    assert residual.max() < 1e-5
    # All g_v parallel: the normal matrix has rank 1 -> no acceleration, infinite condition.
    g_par = rng.normal(size=(1, k, 1)) * np.array([1.0, 2.0, 0.5])
    a, residual, condition = (t.numpy() for t in cbe.CBELayer()((g_x[:1], g_par, v[:1])))
    assert np.all(np.isnan(a)) or condition[0] > 1e12
    # NaN rows are dropped: poisoning one row leaves the consistent solution intact.
    g_nan = g_v.copy()
    g_nan[:, 0, :] = np.nan
    a, _, _ = (t.numpy() for t in cbe.CBELayer()((g_x, g_nan, v)))
    np.testing.assert_allclose(a, a_true, rtol=0, atol=1e-5)


# ---- exact DFs: the chain recovers the analytic acceleration ------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_exact_hernquist_df_recovers_analytic_acceleration(kind):
    rng = np.random.default_rng(5)
    n = 48
    x = np.geomspace(0.1, 10.0, n)[:, None] * random_directions(n, rng)
    res = cbe.accelerations(H.exact_density(kind), x, n_velocities=256, seed=1)
    err = relative_error(res.acceleration, H.acceleration(x))
    # The CBE holds exactly for the exact DF, so only float32 gradient rounding remains: measured
    # max 3e-7 (iso) and 2e-6 (aniso, 1/L gradients). 1e-4 is the required accuracy.
    assert err.max() < 1e-4, err.max()
    assert res.residual.max() < 1e-4          # measured ~1e-7: the steady state is recognised
    assert not res.flagged.any(), res.reasons[res.flagged]
    assert res.spread is None


def test_float64_solve_is_needed_for_the_aniso_df():
    # Same gradients, two solve precisions. Measured at 400 positions 0.1a..10a (K = 256):
    # iso  float32 max 2.6e-6, float64 2.9e-7;  aniso float32 max 1.2e-2 (1/L rows make the normal
    # matrix ill-conditioned), float64 7.4e-7. Here: float64 < 1e-5 everywhere.
    rng = np.random.default_rng(6)
    n, k = 64, 256
    x = (np.geomspace(0.1, 10.0, n)[:, None] * random_directions(n, rng)).astype(np.float32)
    df = H.exact_density("aniso")
    v = cbe.sample_velocities(df, x, k, seed=2)
    g_x, g_v = cbe.df_gradients(df, np.repeat(x, k, 0), tf.reshape(v, [-1, 3]))
    inputs = (tf.reshape(g_x, [n, k, 3]), tf.reshape(g_v, [n, k, 3]), v)
    err64 = relative_error(cbe.CBELayer("float64")(inputs)[0].numpy(), H.acceleration(x))
    err32 = relative_error(cbe.CBELayer("float32")(inputs)[0].numpy(), H.acceleration(x))
    assert err64.max() < 1e-5, err64.max()
    assert err32.max() > err64.max()


def test_harmonic_toy_df_and_sign():
    x = np.array([[0.5, 0.0, 0.0], [3.0, -1.0, 2.0], [0.0, 0.2, 0.1]])
    res = cbe.accelerations(Harmonic(), x, n_velocities=64, seed=0)
    np.testing.assert_allclose(res.acceleration, -4.0 * x, rtol=1e-5, atol=1e-6)   # a = -∇(2|x|^2)


def test_many_dfs_in_one_process_give_their_own_field_and_no_retracing_warning():
    """Each DF gets its own solver, traced once; TF's frequent-retracing detector (5 traces of one
    source line) used to warn when a script evaluated several DFs. The accelerations must stay
    each DF's own (a = -2k x, exact for the Harmonic family)."""
    import io
    import logging

    log = io.StringIO()
    handler = logging.StreamHandler(log)
    tf.get_logger().addHandler(handler)
    x = np.array([[0.5, 0.0, 0.0], [1.0, -1.0, 2.0]])
    try:
        for k in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0):
            res = cbe.accelerations(Harmonic(k), x, n_velocities=64, seed=0)
            np.testing.assert_allclose(res.acceleration, -2.0 * k * x, rtol=1e-5, atol=1e-6)
    finally:
        tf.get_logger().removeHandler(handler)
    assert "retracing" not in log.getvalue()


# ---- velocity sampling --------------------------------------------------------------------------

def speed_cdf(kind: str, r: float, psi_factor: float = 1.0):
    """Exact CDF of |v| at radius r: p(v | r) ∝ v^2 f(Ψ - v^2/2) (iso) or ∝ v (Ψ - v^2/2)^2 (aniso:
    ∫ dΩ_v 1/L = 2π^2 / (r v) for f ∝ E^2/L), by trapezoidal quadrature on 20001 points."""
    psi = psi_factor * float(H.relative_potential(r))
    grid = np.linspace(0.0, np.sqrt(2 * psi), 20001)
    e = psi - grid**2 / 2
    pdf = grid**2 * H.f_iso(e) if kind == "iso" else grid * e**2
    cdf = integrate.cumulative_trapezoid(pdf, grid, initial=0.0)
    return lambda s: np.interp(s, grid, cdf / cdf[-1])


@pytest.mark.parametrize("kind", KINDS)
def test_sampled_speeds_follow_the_exact_marginal(kind):
    rng = np.random.default_rng(7)
    radii = np.array([0.2, 1.0, 5.0])
    dirs = random_directions(3, rng)
    k = 2000
    v, ess = cbe.sample_velocities(H.exact_density(kind), radii[:, None] * dirs, k, seed=7,
                                   sampler=cbe.SamplerConfig(candidates=16 * k), return_ess=True)
    v = v.numpy().astype(np.float64)
    # M = 16K candidates: ESS measured 1e4-3e4, so ~5 % of the K draws repeat; the KS test is then
    # close to its nominal level. Fixed seed; measured p-values 0.18-0.93.
    assert np.all(ess.numpy() > 4 * k)
    for i, r in enumerate(radii):
        speed = np.linalg.norm(v[i], axis=1)
        assert stats.kstest(speed, speed_cdf(kind, r)).pvalue > 0.01
        # Power: the same draws against the marginal of a 20 % shallower potential are rejected.
        assert stats.kstest(speed, speed_cdf(kind, r, psi_factor=0.8)).pvalue < 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_sampled_dispersions_match_jeans(kind):
    rng = np.random.default_rng(8)
    radii = np.array([0.3, 1.0, 3.0])
    dirs = random_directions(3, rng)
    k = 4000
    v = (
        cbe.sample_velocities(
            H.exact_density(kind),
            radii[:, None] * dirs,
            k,
            seed=8,
            sampler=cbe.SamplerConfig(candidates=8 * k),
        )
        .numpy()
        .astype(np.float64)
    )
    for i, r in enumerate(radii):
        v_r = v[i] @ dirs[i]
        sigma_r = np.sqrt(np.mean(v_r**2))
        # one tangential component
        sigma_t = np.sqrt((np.mean(np.sum(v[i] ** 2, 1)) - sigma_r**2) / 2)
        # Statistical error of a dispersion from K = 4000 (with ~10 % repeats): ~1.5-2.5 %;
        # measured deviations <= 2.5 %. 7 % still separates beta = 1/2 (sigma_t/sigma_r = 0.71)
        # from beta = 0.
        np.testing.assert_allclose(sigma_r, H.sigma_r(r, kind), rtol=0.07)
        np.testing.assert_allclose(sigma_t, H.sigma_t(r, kind), rtol=0.07)
        np.testing.assert_allclose(1 - sigma_t**2 / sigma_r**2, H.beta(r, kind), atol=0.1)


def test_sir_normaliser_estimates_the_density():
    # log ∫ f d^3v = log rho(r) for the normalised exact DF; the SIR mean weight estimates it.
    rng = np.random.default_rng(9)
    r = np.geomspace(0.1, 10.0, 24)
    res = cbe.accelerations(
        H.exact_density("iso"), r[:, None] * random_directions(24, rng), seed=3
    )
    # M = 1024 weights with ESS ~800: relative error ~4 % per position (measured max 0.06 in log).
    np.testing.assert_allclose(res.log_density, np.log(H.density(r)), atol=0.15)


# ---- a learned flow -----------------------------------------------------------------------------

def sample_hernquist_iso(n: int, seed: int, r_max: float = 20.0) -> np.ndarray:
    """Exact draws [n, 6] of the isotropic Hernquist model (G = M = a = 1) with r < r_max.

    r by inverting M(<r) = r^2/(r+1)^2; q = |v|/v_esc by rejection from p(q) ∝ q^2 (proposal) with
    acceptance f(Ψ(1 - q^2))/f(Ψ) (f increases with E); isotropic directions.
    """
    rng = np.random.default_rng(seed)
    s = np.sqrt(rng.uniform(0.0, (r_max / (r_max + 1)) ** 2, n))
    r = s / (1 - s)
    psi = H.relative_potential(r)
    q = np.empty(n)
    todo = np.arange(n)
    while todo.size:
        trial = rng.uniform(size=todo.size) ** (1 / 3)
        accept = rng.uniform(size=todo.size) * H.f_iso(psi[todo]) < H.f_iso(
            psi[todo] * (1 - trial**2)
        )
        q[todo[accept]] = trial[accept]
        todo = todo[~accept]
    speed = q * np.sqrt(2 * psi)
    return np.concatenate(
        [r[:, None] * random_directions(n, rng), speed[:, None] * random_directions(n, rng)], 1
    )


def within_tolerance(a_radial: np.ndarray, truth: np.ndarray, tol: float = 0.35) -> bool:
    """Median over directions of the recovered radial acceleration within ``tol`` of the truth,
    every radius."""
    return bool(np.all(np.abs(np.median(a_radial, axis=1) / truth - 1) < tol))


@pytest.mark.slow          # trains a flow (~15 s)
def test_small_trained_flow_recovers_acceleration():
    import tf_keras as keras

    w = sample_hernquist_iso(30_000, seed=0)
    keras.utils.set_random_seed(0)
    flow = Flow(FlowConfig(dim=6, layers=3, hidden=(32, 32), seed=0)).adapt(w)
    epochs, steps = 20, -(-len(w) // 512)
    flow.compile(
        keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(3e-3, epochs * steps))
    )
    flow.fit(w.astype(np.float32), epochs=epochs, batch_size=512, verbose=0)

    radii = np.array([0.5, 1.0, 2.0, 3.0])
    dirs = random_directions(8, np.random.default_rng(5))
    x = (radii[:, None, None] * dirs[None]).reshape(-1, 3)
    res = cbe.accelerations(flow, x, n_velocities=256, seed=0)
    a_radial = (-np.sum(res.acceleration * x, 1) / np.linalg.norm(x, axis=1)).reshape(
        len(radii), -1
    )
    truth = H.enclosed_mass(radii) / radii**2                       # |a_r| = G M(<r) / r^2
    # Measured medians/truth 0.87-1.05 at this seed and 0.69-1.07 over seeds 0-4 (a small flow
    # smooths the central cusp and under-estimates |a| at small r; per-direction scatter 6-13 %).
    # 35 % passes every seed tried, yet fails on a factor of 2 (ratio 0.5 or 2) or a sign:
    assert within_tolerance(a_radial, truth), np.median(a_radial, axis=1) / truth
    assert not within_tolerance(a_radial, -truth)
    assert not within_tolerance(a_radial, 2 * truth) and not within_tolerance(a_radial, truth / 2)
    # The directions: tangential components small compared with the radial one (median vector error
    # measured 0.16-0.27 over seeds 0-4).
    assert np.median(relative_error(res.acceleration, H.acceleration(x))) < 0.35
    # Learned DFs are not exact steady states: median residual measured 0.34-0.49 over seeds 0-4.
    assert 0.05 < np.median(res.residual) < cbe.MAX_RESIDUAL


# ---- ensembles, graphs, export ------------------------------------------------------------------

def _small_flows(n: int) -> list[Flow]:
    w = np.random.default_rng(0).normal(size=(2000, 6))
    return [Flow(FlowConfig(dim=6, layers=2, hidden=(16, 16), seed=s)).adapt(w) for s in range(n)]


def test_ensemble_uses_mean_density_and_reports_member_spread():
    flows = _small_flows(3)
    ensemble = Ensemble(flows)
    x = np.random.default_rng(1).normal(size=(5, 3))
    res = cbe.accelerations(ensemble, x, n_velocities=32, seed=4)
    members = np.stack(
        [cbe.accelerations(f, x, n_velocities=32, seed=4).acceleration for f in flows]
    )
    np.testing.assert_allclose(res.spread, members.std(axis=0, ddof=1), rtol=1e-6)
    # Gradients of the ensemble are those of log of the mean density, Σ_k p_k ∇log p_k / Σ_k p_k.
    w = np.random.default_rng(2).normal(size=(7, 6)).astype(np.float32)
    g_x, g_v = cbe.df_gradients(ensemble, w[:, :3], w[:, 3:])
    p = np.stack([f.prob(w).numpy() for f in flows])
    grads = np.stack([f.grad_log_prob(w).numpy() for f in flows])
    expected = np.sum(p[..., None] * grads, 0) / p.sum(0)[:, None]
    np.testing.assert_allclose(np.concatenate([g_x, g_v], 1), expected, rtol=1e-4, atol=1e-5)


def test_acceleration_graph_is_core_tf_and_matches_accelerations():
    df = H.exact_density("iso")
    x = np.array([[0.5, 0.1, 0.0], [2.0, -1.0, 0.5], [0.0, 0.0, 7.0]], np.float32)
    graph = cbe.acceleration_graph(df, 64)
    out = graph(tf.constant(x), tf.constant([3, 0], tf.int64))
    res = cbe.accelerations(df, x, n_velocities=64, seed=3)
    np.testing.assert_array_equal(out["acceleration"].numpy(), res.acceleration.astype(np.float32))
    assert relative_error(out["acceleration"].numpy(), H.acceleration(x)).max() < 1e-4
    empty = graph(tf.zeros([0, 3]), tf.constant([3, 0], tf.int64))
    assert empty["acceleration"].shape == (0, 3) and empty["condition"].shape == (0,)
    library = graph.get_concrete_function().graph.as_graph_def().library
    ops = {node.op for fn in library.function for node in fn.node_def}
    assert "SelfAdjointEigV2" in ops and "StatelessMultinomial" in ops
    assert not ops & {"PyFunc", "EagerPyFunc", "PyFuncStateless"}


def test_exported_accelerations_signature_matches_python(tmp_path):
    from tfgalflow.export import export_model, load

    flow = _small_flows(1)[0]
    x = np.random.default_rng(3).normal(size=(6, 3))
    export_model(flow, tmp_path / "m", n_velocities=32)
    out = load(tmp_path / "m").accelerations(x.astype(np.float32), seed=4)
    np.testing.assert_array_equal(
        out.acceleration, cbe.accelerations(flow, x, 32, seed=4).acceleration.astype(np.float32)
    )


@pytest.mark.slow          # ~25 s: traces every cached graph kind once (make test-slow)
def test_cached_graphs_do_not_keep_the_model_alive():
    import gc
    import weakref

    flow = _small_flows(1)[0]
    cbe.accelerations(flow, [[1.0, 0.0, 0.0]], n_velocities=8)
    cbe.accelerations(flow, [[1.0, 0.0, 0.0]], n_velocities=8, chunk_size=1, jit_compile=True)
    cbe.df_gradients(flow, [[1.0, 0.0, 0.0]], [[0.0, 0.5, 0.0]])
    cbe.solve_cbe(flow, [[1.0, 0.0, 0.0]], np.ones((1, 4, 3)))
    cbe.solve_cbe(flow, [[1.0, 0.0, 0.0]], np.ones((1, 4, 3)), jit_compile=True)
    ref = weakref.ref(flow)
    del flow
    gc.collect()
    assert ref() is None


def test_chunking_does_not_change_accuracy():
    rng = np.random.default_rng(10)
    x = np.geomspace(0.2, 5, 10)[:, None] * random_directions(10, rng)
    res = cbe.accelerations(H.exact_density("iso"), x, n_velocities=16, seed=0, chunk_size=3)
    assert relative_error(res.acceleration, H.acceleration(x)).max() < 1e-4


# ---- the XLA-compiled path (jit_compile=True) ---------------------------------------------------

def test_inline_log_prob_is_the_dfs_log_prob():
    # XLA traces the DF's maths inline instead of calling its log_prob (Density.log_prob_tensor):
    # it must be the same function. Both run as traced graphs; 1e-6 relative allows only different
    # op fusion.
    w = np.random.default_rng(13).normal(size=(64, 6)) * [1.0, 1.0, 1.0, 0.3, 0.3, 0.3]
    flows = _small_flows(2)
    for df in (H.exact_density("iso"), H.exact_density("aniso"), flows[0], Ensemble(flows)):
        inline = tf.function(lambda w: df.log_prob_tensor(w), autograph=False)
        got, want = inline(tf.constant(w, tf.float32)).numpy(), df.log_prob(w).numpy()
        # mostly bound points: a real comparison
        assert np.isfinite(want).sum() > 40
        np.testing.assert_allclose(got, want, rtol=1e-6)
    # opaque DFs stay on the plain graph
    assert Harmonic().inlinable and not OpaqueHarmonic().inlinable


@pytest.mark.parametrize("kind", KINDS)
def test_xla_solve_matches_plain_graph_and_padding_never_changes_it(kind):
    rng = np.random.default_rng(14)
    n, k = 11, 64                      # chunks of 4: 4 + 4 + 3 (+ 1 padded row)
    x = np.geomspace(0.1, 10.0, n)[:, None] * random_directions(n, rng)
    df = H.exact_density(kind)
    v = cbe.sample_velocities(df, x, k, seed=3)
    plain = [t.numpy() for t in cbe.solve_cbe(df, x, v, chunk_size=4)]
    xla = [t.numpy() for t in cbe.solve_cbe(df, x, v, chunk_size=4, jit_compile=True)]
    assert relative_error(xla[0], H.acceleration(x)).max() < 1e-4
    # Same velocities, gradients rounded differently by XLA's fusions: measured max 1.6e-7 (a) and
    # 1.2e-6 (condition); 1e-5 would still fail on any wrong term.
    assert relative_error(xla[0], plain[0]).max() < 1e-5
    np.testing.assert_allclose(xla[2], plain[2], rtol=1e-5)
    # residual: the steady state is recognised
    assert xla[1].max() < 1e-4
    # Rows are independent and the layer solves each system alone, so a position's answer must not
    # depend on its slot in the chunk or on the padding: one row (B < chunk), odd B, several
    # chunks.
    for rows in (slice(0, 1), slice(3, 10), slice(2, 11), slice(10, 11), slice(1, 6)):
        part = [
            t.numpy()
            for t in cbe.solve_cbe(
                df, x[rows], tf.gather(v, np.arange(n)[rows]), chunk_size=4, jit_compile=True
            )
        ]
        for got, want in zip(part, xla):
            np.testing.assert_array_equal(got, want[rows])


@pytest.mark.slow          # ~30 s of XLA compilation; XLA vs plain is also covered by faster tests
def test_xla_accelerations_match_plain_graph():
    rng = np.random.default_rng(15)
    x = np.geomspace(0.2, 5, 10)[:, None] * random_directions(10, rng)
    df = H.exact_density("iso")
    # The random numbers are the plain graph's in both; XLA computes log f and the gradients.
    # Measured: a 1.4e-7, ESS 1e-6 relative, log density 1e-6 absolute; tolerances 1e-5. 3 chunks
    # of 4; one padded chunk
    for rows in (slice(0, 10), slice(0, 3)):
        plain = cbe.accelerations(df, x[rows], n_velocities=32, seed=2, chunk_size=4)
        xla = cbe.accelerations(
            df, x[rows], n_velocities=32, seed=2, chunk_size=4, jit_compile=True
        )
        assert relative_error(xla.acceleration, H.acceleration(x[rows])).max() < 1e-4
        assert relative_error(xla.acceleration, plain.acceleration).max() < 1e-5
        np.testing.assert_allclose(xla.ess, plain.ess, rtol=1e-5)
        np.testing.assert_allclose(xla.log_density, plain.log_density, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(xla.reasons, plain.reasons)
    # A flow: the resampling sees XLA's log f, so a velocity may (rarely: ~1e-4 per draw) be
    # another candidate; here none is (measured max difference 3.8e-7 at 24 positions x 32
    # velocities).
    flow = _small_flows(1)[0]
    x = np.random.default_rng(1).normal(size=(24, 3))
    plain = cbe.accelerations(flow, x, n_velocities=32, seed=4, chunk_size=8)
    xla = cbe.accelerations(flow, x, n_velocities=32, seed=4, chunk_size=8, jit_compile=True)
    assert relative_error(xla.acceleration, plain.acceleration).max() < 1e-5
    np.testing.assert_array_equal(xla.reasons, plain.reasons)


def test_jit_compile_leaves_other_dfs_on_the_plain_graph():
    x = np.array([[0.5, 0.0, 0.0], [3.0, -1.0, 2.0], [0.0, 0.2, 0.1]])
    plain = cbe.accelerations(OpaqueHarmonic(), x, n_velocities=64, seed=0)
    same = cbe.accelerations(OpaqueHarmonic(), x, n_velocities=64, seed=0, jit_compile=True)
    np.testing.assert_array_equal(same.acceleration, plain.acceleration)
    v = np.random.default_rng(2).normal(size=(3, 16, 3))
    plain_solve = cbe.solve_cbe(OpaqueHarmonic(), x, v)
    for got, want in zip(cbe.solve_cbe(OpaqueHarmonic(), x, v, jit_compile=True), plain_solve):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


@pytest.mark.slow          # compiles XLA CBE programs for several sizes (~15 s)
def test_default_jit_compile_is_xla_only_for_large_calls_of_xla_dfs(monkeypatch):
    # The default (jit_compile=None) decides from the call's size and the DF: never XLA for the
    # exact DFs (not jit_log_prob) or below XLA_MIN_EVALUATIONS model evaluations.
    flow = _small_flows(1)[0]
    assert flow.uses_xla and not H.exact_density("iso").uses_xla
    limit = cbe.XLA_MIN_EVALUATIONS
    assert cbe.xla_by_default(flow, limit // 256, 256)
    assert not cbe.xla_by_default(flow, limit // 256 - 1, 256)
    assert not cbe.xla_by_default(H.exact_density("iso"), 10 * limit, 256)
    # an ensemble counts one evaluation per member
    assert cbe.xla_by_default(Ensemble(_small_flows(2)), limit // 512, 256)
    x = np.random.default_rng(1).normal(size=(12, 3))
    # a small call: the plain graph, bit for bit
    plain = cbe.accelerations(flow, x, n_velocities=32, seed=4, chunk_size=8, jit_compile=False)
    default = cbe.accelerations(flow, x, n_velocities=32, seed=4, chunk_size=8)
    np.testing.assert_array_equal(default.acceleration, plain.acceleration)
    # a "large" call (threshold lowered): the XLA path, bit for bit, which agrees with the plain
    # graph to float32 round-off of the gradients (3.8e-7 relative for this flow in the slow XLA
    # test; 1e-5 still fails on any wrong term) as long as no resampled velocity moved
    monkeypatch.setattr(cbe, "XLA_MIN_EVALUATIONS", 12 * 32)
    xla = cbe.accelerations(flow, x, n_velocities=32, seed=4, chunk_size=8, jit_compile=True)
    default = cbe.accelerations(flow, x, n_velocities=32, seed=4, chunk_size=8)
    np.testing.assert_array_equal(default.acceleration, xla.acceleration)
    assert relative_error(default.acceleration, plain.acceleration).max() < 1e-5
    np.testing.assert_array_equal(default.reasons, plain.reasons)
    # the exact DF stays on the plain graph (XLA compiles its gradients to slower code) and still
    # recovers the analytic acceleration to float32 round-off (~1e-7; 1e-5 fails on a wrong sign)
    df = H.exact_density("iso")
    exact = cbe.accelerations(df, x, n_velocities=32, seed=4, chunk_size=8)
    same = cbe.accelerations(df, x, n_velocities=32, seed=4, chunk_size=8, jit_compile=False)
    np.testing.assert_array_equal(exact.acceleration, same.acceleration)
    assert relative_error(exact.acceleration, H.acceleration(x)).max() < 1e-5


def test_xla_path_compiles_once_for_any_number_of_positions():
    # Chunks are padded to the fixed chunk size: position counts below, at and above it (several
    # chunks, a partial last one) reuse the one compiled program of each XLA function.
    flow = _small_flows(1)[0]
    rng = np.random.default_rng(3)
    for b in (1, 3, 4, 7, 9):
        cbe.accelerations(flow, rng.normal(size=(b, 3)), n_velocities=16, seed=0, chunk_size=4,
                          jit_compile=True)
        v = rng.normal(size=(b, 16, 3))
        cbe.solve_cbe(flow, rng.normal(size=(b, 3)), v, chunk_size=4, jit_compile=True)
    solver = cbe._solver(flow, 16, None, None, chunk_size=4, jit_compile=True)
    assert solver._xla_weights.experimental_get_tracing_count() == 1
    assert solver._xla_normal_equations.experimental_get_tracing_count() == 1
    assert solver.solve.experimental_get_tracing_count() == 1
    solve = cbe._solve_fn(flow, 4, 16, True)
    assert solve.experimental_get_tracing_count() == 1


# ---- validation and flags -----------------------------------------------------------------------

def test_bad_inputs_raise_input_error():
    df = H.exact_density("iso")
    for bad in (
        np.zeros((4, 2)),
        np.zeros(3),
        np.zeros((0, 3)),
        [[1.0, np.nan, 0.0]],
        [[np.inf, 0, 0]],
        "x",
    ):
        with pytest.raises(InputError, match="positions"):
            cbe.accelerations(df, bad)
    for k in (4, 7, 8.5, True, None):
        with pytest.raises(InputError, match="n_velocities"):
            cbe.accelerations(df, [[1.0, 0, 0]], n_velocities=k)
    with pytest.raises(InputError, match="dim = 4"):
        cbe.accelerations(Flow(FlowConfig(dim=4, layers=1, hidden=(4,))), [[1.0, 0, 0]])
    with pytest.raises(InputError, match="conditional"):
        cbe.accelerations(
            Flow(FlowConfig(dim=6, label_dim=1, layers=1, hidden=(4,))), [[1.0, 0, 0]]
        )
    with pytest.raises(InputError, match="phase-space DF"):
        cbe.accelerations(object(), [[1.0, 0, 0]])
    with pytest.raises(InputError, match="seed"):
        cbe.accelerations(df, [[1.0, 0, 0]], seed=-1)
    with pytest.raises(InputError, match="rows"):
        cbe.df_gradients(df, np.ones((3, 3)), np.ones((2, 3)))
    with pytest.raises(InputError, match=r"\[B, K, 3\]"):
        cbe.CBELayer()((np.ones((2, 3)), np.ones((2, 3)), np.ones((2, 3))))
    with pytest.raises(InputError, match="candidates"):
        cbe.SamplerConfig(candidates=1)


def test_positions_without_support_or_solution_are_flagged():
    x = np.array([[0.5, 0.0, 0.0], [3.0, 0.0, 0.0]])
    ball = cbe.accelerations(Ball(), x, n_velocities=32, seed=0)
    # Inside: log f constant, no gradients -> singular; outside |x| < 1: f = 0 at every velocity.
    assert ball.flagged.all()
    assert "ill_conditioned" in ball.reasons[0] and "no_support" in ball.reasons[1]
    assert np.all(np.isnan(ball.acceleration))  # NaN, never a number that looks fine
    sheared = cbe.accelerations(
        Sheared(), [[0.05, 0.0, 0.0], [0.0, 0.02, 0.01]], n_velocities=64, seed=0
    )
    assert sheared.residual.min() > 0.9 and all("high_residual" in r for r in sheared.reasons)
    harmonic = cbe.accelerations(Harmonic(), x, n_velocities=64, seed=0)
    assert not harmonic.flagged.any()
    # Far beyond the bulk of the Hernquist sphere the density is tiny: flagged when a floor is set.
    far = cbe.accelerations(H.exact_density("iso"), [[1.0, 0, 0], [500.0, 0, 0]], n_velocities=32,
                            min_log_density=float(np.log(H.density(100.0))))
    assert list(far.reasons) == ["", "low_density"]


def test_solve_cbe_at_arbitrary_velocities():
    # The exact DF obeys the CBE at every bound velocity, not only at typical ones: uniform draws
    # in the ball |v| < 0.7 v_esc recover a as well (float32 rounding only, measured ~1e-7).
    rng = np.random.default_rng(12)
    n, k = 16, 64
    r = np.geomspace(0.1, 10.0, n)
    x = r[:, None] * random_directions(n, rng)
    v = (0.7 * H.escape_speed(r)[:, None, None] * rng.uniform(size=(n, k, 1)) ** (1 / 3)
         * random_directions(n * k, rng).reshape(n, k, 3))
    a, residual, condition = (
        t.numpy() for t in cbe.solve_cbe(H.exact_density("aniso"), x, v, chunk_size=5)
    )
    assert relative_error(a, H.acceleration(x)).max() < 1e-4
    assert residual.max() < 1e-4 and np.all(condition >= 1)
    with pytest.raises(InputError, match=r"\[B, K, 3\]"):
        cbe.solve_cbe(H.exact_density("iso"), x, v[:3])


# ---- conditional DFs f(x, v | c) ------------------------------------------------------------

class HernquistFamily(Density):
    """The exact Hernquist DFs of every scale radius a and mass M (G = 1), labels c = (a, M).

    By homology f_{a,M}(x, v) = M / (a v_g)^3 f_{1,1}(x / a, v / v_g) with v_g = sqrt(M / a), so
    each row is evaluated with its own (a, M) in TF;
    :func:`test_hernquist_family_is_the_exact_df_of_each_row` checks it against
    Hernquist(a, M).log_df row by row.
    """
    dim, label_dim = 6, 2

    def __init__(self, kind: str = "iso"):
        self.kind = kind

    def log_prob_tensor(self, w, labels=None):
        a, m = labels[:, :1], labels[:, 1:]
        v_g = tf.sqrt(m / a)
        log_f = H.tf_log_df(w[:, :3] / a, w[:, 3:] / v_g, self.kind)
        return log_f + tf.math.log(m[:, 0]) - 3.0 * tf.math.log(a[:, 0] * v_g[:, 0])


#: (a, M) of the rows: three scale radii and two masses, mixed so neighbours in a chunk differ.
FAMILY_LABELS = np.array([[0.5, 1.0], [1.0, 3.0], [2.0, 1.0], [0.5, 3.0], [1.0, 1.0], [2.0, 3.0]])


def family_positions(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n positions 0.1..10, labels (cycling FAMILY_LABELS), each row's analytic acceleration."""
    rng = np.random.default_rng(seed)
    x = np.geomspace(0.1, 10.0, n)[:, None] * random_directions(n, rng)
    labels = FAMILY_LABELS[np.arange(n) % len(FAMILY_LABELS)]
    truth = np.stack([Hernquist(a=a, M=m).acceleration(x[i:i + 1])[0]
                      for i, (a, m) in enumerate(labels)])
    return x, labels, truth


@pytest.mark.parametrize("kind", KINDS)
def test_hernquist_family_is_the_exact_df_of_each_row(kind):
    x, labels, _ = family_positions(24, seed=20)
    rng = np.random.default_rng(21)
    v_esc = np.array([Hernquist(a=a, M=m).escape_speed(np.linalg.norm(x[i]))
                      for i, (a, m) in enumerate(labels)])
    v = rng.uniform(0.1, 0.9, len(x))[:, None] * v_esc[:, None] * random_directions(len(x), rng)
    got = HernquistFamily(kind).log_prob(np.concatenate([x, v], 1), labels).numpy()
    want = np.array([Hernquist(a=a, M=m).log_df(x[i:i + 1], v[i:i + 1], kind)[0]
                     for i, (a, m) in enumerate(labels)])
    # float32 evaluation of O(1-10) log values: measured max 1.2e-6 absolute; a wrong power of a or
    # M shifts log f by >= 0.1.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("jit", [False, True])
def test_conditional_exact_df_recovers_each_rows_acceleration(kind, jit):
    # Labels [B, C]: six (a, M) in one call, chunks of 5 (padded under XLA). The CBE holds exactly
    # at each row's own label, so only float32 rounding remains: measured max 2.2e-7 (iso) and
    # 3.7e-7 (aniso), plain and XLA, for [B, C] and [C]. 1e-4 is the required accuracy; another
    # row's label is off by O(1).
    x, labels, truth = family_positions(14, seed=22)
    df = HernquistFamily(kind)
    res = cbe.accelerations(df, x, n_velocities=64, seed=1, labels=labels, chunk_size=5,
                            jit_compile=jit)
    err = relative_error(res.acceleration, truth)
    assert err.max() < 1e-4, err
    assert res.residual.max() < 1e-4 and not res.flagged.any(), res.reasons
    # Labels [C]: one halo (a = 2, M = 3) at every position.
    one = cbe.accelerations(df, x, n_velocities=64, seed=1, labels=[2.0, 3.0], chunk_size=5,
                            jit_compile=jit)
    assert relative_error(one.acceleration, Hernquist(a=2.0, M=3.0).acceleration(x)).max() < 1e-4
    tiled = cbe.accelerations(df, x, n_velocities=64, seed=1, labels=np.tile([2.0, 3.0], (14, 1)),
                              chunk_size=5, jit_compile=jit)
    np.testing.assert_array_equal(one.acceleration, tiled.acceleration)


def test_conditional_pieces_take_labels_per_row():
    x, labels, truth = family_positions(12, seed=23)
    df = HernquistFamily("aniso")
    # Velocities drawn at each row's label, then solved at given velocities (chunks of 5).
    v, ess = cbe.sample_velocities(df, x, 64, seed=2, labels=labels, return_ess=True)
    assert ess.numpy().min() > cbe.MIN_ESS
    for jit in (False, True):
        a, residual, _ = cbe.solve_cbe(df, x, v, chunk_size=5, labels=labels, jit_compile=jit)
        assert relative_error(a.numpy(), truth).max() < 1e-4 and residual.numpy().max() < 1e-4
    # Gradients w.r.t. (x, v) at fixed label are those of the exact DF of that (a, M).
    w = np.concatenate([x, v[:, 0].numpy()], 1)
    g_x, g_v = cbe.df_gradients(df, w[:, :3], w[:, 3:], labels)
    for i, (a, m) in enumerate(labels):
        exact = Hernquist(a=a, M=m).exact_density("aniso")
        ref = cbe.df_gradients(exact, w[i:i + 1, :3], w[i:i + 1, 3:])
        # same maths, rescaled inputs: float32 rounding only (measured 5e-7 of the largest entry)
        np.testing.assert_allclose(np.concatenate([g_x[i], g_v[i]]), np.concatenate(ref, 1)[0],
                                   rtol=1e-4, atol=1e-6)
    # The graph the export wraps takes labels [None, C] after (positions, seed).
    graph = cbe.acceleration_graph(df, 64)
    assert [s.name for s in graph.input_signature] == ["positions", "seed", "labels"]
    out = graph(tf.constant(x, tf.float32), tf.constant([2, 0], tf.int64),
                tf.constant(labels, tf.float32))
    res = cbe.accelerations(df, x, n_velocities=64, seed=2, labels=labels)
    np.testing.assert_array_equal(out["acceleration"].numpy(), res.acceleration.astype(np.float32))


@pytest.mark.slow          # ~13 s of CBE solves with rotations
def test_conditional_spherical_average_recovers_each_rows_acceleration():
    from tfgalflow.symmetry import SphericalAverage

    # f is spherical at every label, so the average over rotations is f itself: the exact answer
    # (float32 rounding of rotated coordinates only: measured max 1.4e-7 plain and XLA).
    x, labels, truth = family_positions(8, seed=24)
    avg = SphericalAverage(HernquistFamily("iso"), n_rotations=4, seed=1)
    for jit in (False, True):
        res = cbe.accelerations(avg, x, n_velocities=32, seed=3, labels=labels, chunk_size=3,
                                jit_compile=jit)
        err = relative_error(res.acceleration, truth)
        assert err.max() < 1e-4, err


def _conditional_flows(n: int) -> list[Flow]:
    rng = np.random.default_rng(0)
    c = rng.uniform(0.5, 2.0, size=(2000, 1))
    w = rng.normal(size=(2000, 6)) * np.concatenate([c, c, c, 1 / c, 1 / c, 1 / c], 1)
    return [Flow(FlowConfig(dim=6, label_dim=1, layers=2, hidden=(16, 16), seed=s)).adapt(w, c)
            for s in range(n)]


def test_conditional_flow_labels_c_equal_tiled_labels_and_ensemble_spread():
    flows = _conditional_flows(2)
    x = np.random.default_rng(5).normal(size=(7, 3))
    one = cbe.accelerations(flows[0], x, n_velocities=32, seed=4, labels=[1.5], chunk_size=3)
    tiled = cbe.accelerations(flows[0], x, n_velocities=32, seed=4, labels=np.full((7, 1), 1.5),
                              chunk_size=3)
    np.testing.assert_array_equal(one.acceleration, tiled.acceleration)
    np.testing.assert_array_equal(one.reasons, tiled.reasons)
    # The label matters: another label is another DF, so other accelerations.
    other = cbe.accelerations(flows[0], x, n_velocities=32, seed=4, labels=[0.6], chunk_size=3)
    assert np.abs(other.acceleration - one.acceleration).max() > 1e-3
    # Ensemble: member spread from the members' own conditional accelerations at the same labels.
    labels = np.linspace(0.6, 1.8, 7)[:, None]
    res = cbe.accelerations(Ensemble(flows), x, n_velocities=32, seed=4, labels=labels)
    members = np.stack([cbe.accelerations(f, x, n_velocities=32, seed=4, labels=labels)
                        .acceleration for f in flows])
    np.testing.assert_allclose(res.spread, members.std(axis=0, ddof=1), rtol=1e-6)
    # XLA: the resampling sees XLA's log f; here no velocity moves (measured max 5.6e-7 relative).
    xla = cbe.accelerations(flows[0], x, n_velocities=32, seed=4, labels=labels, chunk_size=3,
                            jit_compile=True)
    plain = cbe.accelerations(flows[0], x, n_velocities=32, seed=4, labels=labels, chunk_size=3)
    assert relative_error(xla.acceleration, plain.acceleration).max() < 1e-5


def test_bad_labels_raise_input_error_naming_the_shapes():
    df = HernquistFamily()
    x = np.ones((4, 3))
    cases = [(None, r"labels of shape \[2\] .* or \[B, 2\] with B = 4 are required"),
             (np.ones((4, 3)), r"labels have shape \[4, 3\]; expected \[2\]"),
             (np.ones(3), r"labels have shape \[3\]"),
             (np.ones((5, 2)), r"labels have shape \[5, 2\]"),
             (np.ones((1, 4, 2)), r"labels have shape \[1, 4, 2\]"),
             ([[1.0, np.nan]] * 4, "labels contains NaN or inf in 4 row"),
             ("a", "labels cannot be read")]
    for labels, message in cases:
        with pytest.raises(InputError, match=message):
            cbe.accelerations(df, x, labels=labels)
    with pytest.raises(InputError, match=r"unconditional \(label_dim = 0\)"):
        cbe.accelerations(H.exact_density("iso"), x, labels=[1.0])
    for call in (lambda: cbe.sample_velocities(df, x, 8, labels=np.ones((4, 1))),
                 lambda: cbe.solve_cbe(df, x, np.ones((4, 8, 3)), labels=np.ones((3, 2))),
                 lambda: cbe.df_gradients(df, x, x, labels=None)):
        with pytest.raises(InputError, match="labels"):
            call()


# ---- CLI ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from tfgalflow.training import TrainConfig, train

    run = tmp_path_factory.mktemp("cbe") / "run"
    config = TrainConfig(
        layers=1, hidden=(8,), epochs=2, batch_size=256, checkpoint_every=0, patience=0
    )
    train(sample_hernquist_iso(2000, seed=1), config, run, verbose=0)
    return run


@pytest.mark.slow          # ~20 s; the CLI accel path is also checked on a SavedModel below
def test_cli_accel_matches_python_api(tiny_run, tmp_path, capsys):
    from tfgalflow.cli import main
    from tfgalflow.training import load_run

    out = tmp_path / "acc.npz"
    assert main(["accel", str(tiny_run), "--radii", "0.5,1,2", "--directions", "2", "--seed", "3",
                 "--n-velocities", "32", "--out", str(out)]) == 0
    assert "wrote 6 accelerations" in capsys.readouterr().out
    with np.load(out) as z:
        positions, acceleration, reasons = z["positions"], z["acceleration"], z["reasons"]
        # positions are what the model saw: float32-rounded (relative 6e-8)
        np.testing.assert_allclose(
            np.linalg.norm(positions, axis=1), np.repeat([0.5, 1.0, 2.0], 2), rtol=2e-7
        )
        np.testing.assert_allclose(
            z["a_radial"], np.sum(acceleration * positions, 1) / z["radius"], rtol=1e-12
        )
    model = load_run(tiny_run)
    ref = cbe.accelerations(model, positions, n_velocities=32, seed=3)
    np.testing.assert_array_equal(acceleration, ref.acceleration)
    np.testing.assert_array_equal(reasons, ref.reasons)
    # --xla is accelerations(..., jit_compile=True)
    assert main(["accel", str(tiny_run), "--radii", "0.5,1,2", "--directions", "2", "--seed", "3",
                 "--n-velocities", "32", "--xla", "--out", str(out)]) == 0
    with np.load(out) as z:
        np.testing.assert_array_equal(z["acceleration"], cbe.accelerations(
            model, positions, n_velocities=32, seed=3, jit_compile=True).acceleration)
    # --positions from a text file, written as CSV: the same numbers (CSV keeps 9 significant
    # digits).
    np.savetxt(tmp_path / "pos.txt", positions)
    csv_out = tmp_path / "acc.csv"
    assert main(["accel", str(tiny_run), "--positions", str(tmp_path / "pos.txt"), "--seed", "3",
                 "--n-velocities", "32", "--out", str(csv_out)]) == 0
    table = np.genfromtxt(csv_out, delimiter=",", names=True, dtype=None, encoding=None)
    np.testing.assert_allclose(
        np.stack([table["ax"], table["ay"], table["az"]], 1), acceleration, rtol=1e-7
    )


def test_cli_accel_on_a_savedmodel_matches_the_run(tiny_run, tmp_path):
    from tfgalflow.cli import main
    from tfgalflow.export import export_model
    from tfgalflow.training import load_run

    export_model(load_run(tiny_run), tmp_path / "saved", n_velocities=16)
    args = ["--radii", "0.5,2", "--directions", "2", "--seed", "1"]
    assert (
        main(["accel", str(tmp_path / "saved"), *args, "--out", str(tmp_path / "saved.npz")]) == 0
    )
    assert (
        main(
            [
                "accel",
                str(tiny_run),
                *args,
                "--n-velocities",
                "16",
                "--out",
                str(tmp_path / "run.npz"),
            ]
        )
        == 0
    )
    with np.load(tmp_path / "saved.npz") as a, np.load(tmp_path / "run.npz") as b:
        # Same graph, seeds and float32 outputs; the run path returns float64 copies of them.
        np.testing.assert_allclose(a["acceleration"], b["acceleration"], rtol=1e-6)
        np.testing.assert_array_equal(a["reasons"], b["reasons"])
    assert main(["accel", str(tmp_path / "saved"), *args, "--n-velocities", "32",
                 "--out", str(tmp_path / "x.npz")]) == 2        # K is fixed at export time
    assert main(["accel", str(tmp_path / "saved"), *args, "--xla",
                 "--out", str(tmp_path / "x.npz")]) == 2        # so is its (plain) graph
    assert main(["accel", str(tmp_path / "saved"), *args, "--rotations", "4",
                 "--out", str(tmp_path / "x.npz")]) == 2        # and the DF it differentiates


def test_cli_accel_rotations_is_the_spherical_average(tiny_run, tmp_path):
    from tfgalflow.cli import main
    from tfgalflow.symmetry import SphericalAverage
    from tfgalflow.training import load_run

    out = tmp_path / "acc.npz"
    assert main(["accel", str(tiny_run), "--radii", "0.5,2", "--seed", "2", "--n-velocities", "16",
                 "--rotations", "4", "--out", str(out)]) == 0
    with np.load(out) as z:
        ref = cbe.accelerations(
            SphericalAverage(load_run(tiny_run), 4, seed=2),
            z["positions"],
            n_velocities=16,
            seed=2,
        )
        np.testing.assert_array_equal(z["acceleration"], ref.acceleration)
        plain = cbe.accelerations(load_run(tiny_run), z["positions"], n_velocities=16, seed=2)
        # the option did something
        assert np.abs(z["acceleration"] - plain.acceleration).max() > 1e-6
    assert (
        main(["accel", str(tiny_run), "--radii", "1", "--rotations", "-1", "--out", str(out)]) == 2
    )


def test_cli_accel_bad_arguments_exit_2(tiny_run, tmp_path, capsys):
    from tfgalflow.cli import main

    np.save(tmp_path / "bad.npy", np.zeros((4, 2)))
    cases = [(["--radii", "0.5,x"], "--radii"),
             (["--radii", "1", "--directions", "0"], "--directions"),
             (["--positions", str(tmp_path / "bad.npy")], "positions has shape [4, 2]"),
             (["--positions", str(tmp_path / "missing.npy")], "no such file"),
             (["--radii", "1", "--n-velocities", "4"], "n_velocities"),
             (["--radii", "1", "--out", str(tmp_path / "a.json")], ".npz or .csv")]
    for extra, message in cases:
        argv = ["accel", str(tiny_run), *extra]
        if "--out" not in extra:
            argv += ["--out", str(tmp_path / "a.npz")]
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "a.npz").exists() and not (tmp_path / "a.json").exists()
    # --positions and --radii are mutually exclusive (argparse: exit 2)
    with pytest.raises(SystemExit):
        main(["accel", str(tiny_run), "--radii", "1", "--positions", "p.npy", "--out", "a.npz"])


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    """A conditional run (label "a": the scale of x, 1/a that of v) and its SavedModel."""
    from tfgalflow.export import export_model
    from tfgalflow.training import TrainConfig, read_run_config, train

    rng = np.random.default_rng(3)
    a = rng.uniform(0.5, 2.0, size=(2000, 1))
    w = rng.normal(size=(2000, 6)) * np.concatenate([a, a, a, 1 / a, 1 / a, 1 / a], 1)
    run = tmp_path_factory.mktemp("cbe_cond") / "run"
    config = TrainConfig(layers=1, hidden=(8,), epochs=2, batch_size=256, checkpoint_every=0,
                         patience=0)
    model = train(w, config, run, labels=a, label_names=["a"], verbose=0)
    export_model(model, run.parent / "saved", run_config=read_run_config(run), n_velocities=16)
    return run


@pytest.mark.slow   # trains or spawns processes: make test-slow (default suite < 10 min)
def test_cli_accel_labels_for_a_conditional_run_and_savedmodel(conditional_run, tmp_path, capsys):
    from tfgalflow.cli import main
    from tfgalflow.export import load
    from tfgalflow.training import load_run

    args = ["--radii", "0.5,2", "--directions", "2", "--seed", "1", "--labels", "1.5"]
    saved = conditional_run.parent / "saved"
    assert main(["accel", str(conditional_run), *args, "--n-velocities", "16",
                 "--out", str(tmp_path / "run.npz")]) == 0
    assert main(["accel", str(saved), *args, "--out", str(tmp_path / "saved.csv")]) == 0
    with np.load(tmp_path / "run.npz") as z:
        positions = z["positions"]
        np.testing.assert_array_equal(z["labels"], np.full((4, 1), 1.5))
        assert list(z["label_names"]) == ["a"]
        ref = cbe.accelerations(load_run(conditional_run), positions, n_velocities=16, seed=1,
                                labels=[1.5])
        np.testing.assert_array_equal(z["acceleration"], ref.acceleration)
        run_acceleration = z["acceleration"]
    table = np.genfromtxt(tmp_path / "saved.csv", delimiter=",", names=True, dtype=None,
                          encoding=None)
    np.testing.assert_array_equal(table["a"], 1.5)
    saved_ref = load(saved).accelerations(positions, seed=1, labels=[1.5]).acceleration
    # CSV keeps 9 significant digits; the SavedModel runs the run's graph (float32 outputs).
    np.testing.assert_allclose(np.stack([table["ax"], table["ay"], table["az"]], 1), saved_ref,
                               rtol=1e-7)
    np.testing.assert_allclose(saved_ref, run_acceleration, rtol=1e-6)
    capsys.readouterr()
    for model in (conditional_run, saved):
        for extra, message in (([], "give --labels"), (["--labels", "1,2"], "has 2 value(s)"),
                               (["--labels", "x"], "comma-separated numbers")):
            assert main(["accel", str(model), "--radii", "1", *extra,
                         "--out", str(tmp_path / "bad.npz")]) == 2
            assert message in capsys.readouterr().err
    assert not (tmp_path / "bad.npz").exists()


def test_cli_accel_labels_refused_for_an_unconditional_run(tiny_run, tmp_path, capsys):
    from tfgalflow.cli import main

    assert main(["accel", str(tiny_run), "--radii", "1", "--labels", "1",
                 "--out", str(tmp_path / "a.npz")]) == 2
    assert "unconditional" in capsys.readouterr().err
