"""Tests of tfgalflow.symmetry: the average of a phase-space DF over joint rotations of (x, v).

References: Haar measure facts (R Rᵀ = 1, det R = 1, isotropy), the closed-form rotation average of
a Gaussian (below), the exact Hernquist DFs (spherical, so unchanged by the average) and their
analytic accelerations, and a KS test of isotropy at a fixed seed.
"""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from tfgalflow import cbe
from tfgalflow.errors import InputError
from tfgalflow.flows import FlowConfig
from tfgalflow.hernquist import Hernquist
from tfgalflow.mocks import sample_hernquist
from tfgalflow.model import Ensemble, Flow
from tfgalflow.density import Density
from tfgalflow.symmetry import SphericalAverage, random_rotations

H = Hernquist()


class OffsetGaussian(Density):
    """x ~ N(mu, 1), v ~ N(0, 1): not spherical (its mean sits at mu)."""
    dim, label_dim = 6, 0

    def __init__(self, mu):
        self.mu = np.asarray(mu, np.float32)

    def log_prob_tensor(self, w, labels=None):
        return (
            -0.5 * tf.reduce_sum(tf.square(w[:, :3] - self.mu), 1)
            - 0.5 * tf.reduce_sum(tf.square(w[:, 3:]), 1)
            - 6 * 0.5 * np.log(2 * np.pi)
        )

    def sample_tensor(self, n, c, seed):
        return tf.random.stateless_normal([n, 6], seed) + tf.concat([self.mu, tf.zeros(3)], 0)

    def rotation_average(self, w: np.ndarray) -> np.ndarray:
        """log of ∫ N(x; R mu, 1) dR N(v; 0, 1) over the Haar measure: with s = |x| |mu|,
        ∫ exp(x . R mu) dR = <exp(s cos θ)>_{cos θ ~ U(-1, 1)} = sinh(s) / s."""
        x, v = w[:, :3], w[:, 3:]
        s = np.linalg.norm(x, axis=1) * np.linalg.norm(self.mu)
        return (-0.5 * (np.sum(x**2, 1) + self.mu @ self.mu) + np.log(np.sinh(s) / s)
                - 0.5 * np.sum(v**2, 1) - 3 * np.log(2 * np.pi))


def test_rotations_are_proper_orthogonal_and_isotropic():
    r = random_rotations(20000, seed=3)
    np.testing.assert_allclose(
        np.einsum("nij,nkj->nik", r, r), np.broadcast_to(np.eye(3), r.shape), atol=1e-12
    )
    np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=1e-12)
    # Haar: R e_z is uniform on the sphere, so its z component is U(-1, 1) (Archimedes). Fixed
    # seed.
    assert stats.kstest(r[:, 2, 2], stats.uniform(-1, 2).cdf).pvalue > 0.01
    np.testing.assert_array_equal(random_rotations(5, seed=3), random_rotations(5, seed=3))


def test_average_of_an_offset_gaussian_matches_the_closed_form():
    base = OffsetGaussian([0.5, 0.0, 0.0])
    m = 4096
    avg = SphericalAverage(base, n_rotations=m, seed=1)
    w = np.random.default_rng(0).normal(size=(64, 6)).astype(np.float32)
    got = avg.log_prob(w).numpy()
    # Monte Carlo over M rotations: exp(s cos θ) with s = |x||mu| <~ 1.6 has relative spread <~ 0.9
    # here, so the standard error of the mean density is <~ 0.9 / sqrt(4096) = 1.4 %; 5 % is > 3.5
    # sigma, and a missing rotation or a wrong normalisation (log M) is off by 10-100 %.
    np.testing.assert_allclose(got, base.rotation_average(w), atol=0.05)
    # not a no-op
    assert np.max(np.abs(base.log_prob(w).numpy() - base.rotation_average(w))) > 0.2


@pytest.mark.parametrize("kind", ["iso", "aniso"])
def test_spherical_df_is_unchanged(kind):
    """Hernquist DFs depend on (x, v) through E and |L| only: the joint rotation leaves them
    unchanged. Rotating x and v by different rotations would change |L| = |x × v| and fail the
    aniso case."""
    df = H.exact_density(kind)
    w = sample_hernquist(500, kind=kind, seed=2, r_max=50.0).phase_space.astype(np.float32)
    avg = SphericalAverage(df, n_rotations=16, seed=0)
    # float32 rotations move x, v by ~1e-7 relative; |d log f / d log|w|| <~ 30 over this sample,
    # so log f moves by < 1e-5; 1e-4 leaves room.
    np.testing.assert_allclose(avg.log_prob(w).numpy(), df.log_prob(w).numpy(), rtol=0, atol=1e-4)


def test_samples_are_isotropic_and_the_base_samples_are_not():
    base = OffsetGaussian([2.0, 0.0, 0.0])
    # M >> n, so that the draws use distinct rotations and are independent
    # (with M ~ n the repeats of the same M directions make the KS test's effective sample smaller
    # than n).
    avg = SphericalAverage(base, n_rotations=100_000, seed=0)
    w = avg.sample(3000, seed=7).numpy()
    assert w.shape == (3000, 6)
    cos = lambda x, axis: x[:, axis] / np.linalg.norm(x, axis=1)
    # an isotropic 3-D distribution has cos θ ~ U(-1, 1) about any axis (fixed seed)
    for axis in range(3):
        assert stats.kstest(cos(w[:, :3], axis), stats.uniform(-1, 2).cdf).pvalue > 0.01
    raw = base.sample_tensor(3000, None, tf.constant([7, 0], tf.int64)).numpy()
    assert stats.kstest(cos(raw[:, :3], 0), stats.uniform(-1, 2).cdf).pvalue < 1e-6
    # |x| keeps the base distribution (rotations preserve norms): same non-central chi, KS
    # two-sample.
    assert (
        stats.ks_2samp(np.linalg.norm(w[:, :3], axis=1), np.linalg.norm(raw[:, :3], axis=1)).pvalue
        > 0.01
    )
    np.testing.assert_array_equal(avg.sample(10, seed=3).numpy(), avg.sample(10, seed=3).numpy())


@pytest.mark.parametrize("kind", ["iso", "aniso"])
@pytest.mark.parametrize("jit_compile", [False, True])
def test_cbe_on_the_average_of_the_exact_df_recovers_the_analytic_acceleration(kind, jit_compile):
    rng = np.random.default_rng(5)
    d = rng.normal(size=(12, 3))
    x = np.geomspace(0.1, 10.0, 12)[:, None] * d / np.linalg.norm(d, axis=1, keepdims=True)
    res = cbe.accelerations(
        SphericalAverage(H.exact_density(kind), n_rotations=8),
        x,
        n_velocities=256,
        seed=1,
        jit_compile=jit_compile,
    )
    err = np.linalg.norm(res.acceleration - H.acceleration(x), axis=1) / np.linalg.norm(
        H.acceleration(x), axis=1
    )
    # As for the exact DF itself (test_cbe): float32 rounding only, measured < 1e-5; 1e-4 is the
    # requirement.
    assert err.max() < 1e-4, err.max()
    assert not res.flagged.any(), res.reasons[res.flagged]


@pytest.mark.slow          # ~15 s of ensemble CBE solves with rotations
def test_ensemble_members_chunks_and_gradients():
    data = np.random.default_rng(0).normal(size=(2000, 6))
    flows = [
        Flow(FlowConfig(dim=6, layers=2, hidden=(16, 16), seed=s)).adapt(data) for s in range(3)
    ]
    ensemble = Ensemble(flows)
    avg = SphericalAverage(ensemble, n_rotations=4, seed=2)
    assert avg.evaluations_per_row == 12
    assert [m.n_rotations for m in avg.members] == [4, 4, 4] and avg.members is avg.members
    w = np.random.default_rng(1).normal(size=(9, 6)).astype(np.float32)
    # f̄ of the ensemble = mean over rotations and members: the mean of the symmetrised members'
    # densities.
    member_p = np.stack([m.prob(w).numpy() for m in avg.members])
    np.testing.assert_allclose(avg.prob(w).numpy(), member_p.mean(0), rtol=1e-5)
    # GradientTape through the rotations against the chain rule done by hand: ∇ log f̄(w) =
    # Σ_{m,k} p_k(R_m w) R_mᵀ ∇ log p_k(R_m w) / Σ_{m,k} p_k(R_m w), from the members' own
    # gradients at the rotated points (float32 throughout: 1e-4 relative).
    rotations = avg.rotations.numpy()
    num, den = np.zeros((9, 6)), np.zeros((9, 1))
    for r in rotations:
        wr = np.concatenate([w[:, :3] @ r.T, w[:, 3:] @ r.T], axis=1)
        for flow in flows:
            p, g = flow.prob(wr).numpy()[:, None], flow.grad_log_prob(wr).numpy()
            num += p * np.concatenate([g[:, :3] @ r, g[:, 3:] @ r], axis=1)
            den += p
    np.testing.assert_allclose(avg.grad_log_prob(w).numpy(), num / den, rtol=1e-4, atol=1e-5)
    res = cbe.accelerations(avg, w[:4, :3], n_velocities=32, seed=0)
    assert res.spread is not None and res.spread.shape == (4, 3)


def test_conditional_df_rotates_x_and_v_never_the_labels():
    # f̄(x, v | c) = (1/M) Σ_m f(R_m x, R_m v | c): the same label for every rotation of a row.
    flow = Flow(FlowConfig(dim=6, label_dim=2, layers=1, hidden=(8,), seed=2))
    rng = np.random.default_rng(3)
    flow.adapt(rng.normal(size=(500, 6)), rng.normal(size=(500, 2)))
    avg = SphericalAverage(flow, n_rotations=3, seed=4)
    w, c = rng.normal(size=(5, 6)).astype(np.float32), rng.normal(size=(5, 2)).astype(np.float32)
    r = random_rotations(3, 4)
    each = [
        flow.log_prob(np.hstack([w[:, :3] @ m.T, w[:, 3:] @ m.T]).astype(np.float32), c).numpy()
        for m in r
    ]
    want = np.log(np.mean(np.exp(np.array(each, np.float64)), axis=0))
    np.testing.assert_allclose(avg.log_prob(w, c).numpy(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="conditional"):
        avg.log_prob(w)


def test_bad_inputs():
    with pytest.raises(InputError, match="6-D"):
        SphericalAverage(Flow(FlowConfig(dim=2, layers=1, hidden=(4,))))
    with pytest.raises(InputError, match="n_rotations"):
        SphericalAverage(H.exact_density("iso"), n_rotations=0)
    with pytest.raises(InputError, match="cannot sample"):
        SphericalAverage(H.exact_density("iso"), n_rotations=2).sample(3, seed=0)
    with pytest.raises(InputError, match="shape"):
        SphericalAverage(H.exact_density("iso"), n_rotations=2).log_prob(
            np.zeros((3, 5), np.float32)
        )
