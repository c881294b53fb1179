"""SphericalDF: a 6-D DF built from a density of (r, v_r, v_t), checked against exact answers.

Independent truths: a 6-D isotropic Gaussian N(0, σ² I) is spherical and even in v_r, and its
reduced coordinates have closed-form laws (r/σ ~ χ₃, v_r/σ ~ N(0, 1), v_t/σ ~ χ₂, independent),
so SphericalDF of that 3-D density must be the 6-D Gaussian exactly; the Hernquist isotropic DF
(closed form) reduced the same way must come back as itself, and its CBE accelerations as the
analytic a(r) = -GM/(r + a)²; draws are checked by KS tests against the exact marginals (fixed
seeds).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from tfgalflow.cbe import accelerations
from tfgalflow.density import Density
from tfgalflow.errors import InputError
from tfgalflow.hernquist import Hernquist
from tfgalflow.mocks import sample_hernquist
from tfgalflow.spherical_df import SphericalDF, reduced_coordinates
from tfgalflow.symmetry import random_rotations


class ReducedGaussian(Density, tf.Module):
    """(r, v_r, v_t) of w ~ N(0, σ² I₆) with v_r shifted by μ: r/σ ~ χ₃, (v_r - μ)/σ ~ N(0, 1),
    v_t/σ ~ χ₂ (Rayleigh), independent. μ = 0: exactly the reduced law of the 6-D Gaussian."""

    dim, label_dim = 3, 0

    def __init__(self, sigma: float = 1.3, mu: float = 0.0):
        tf.Module.__init__(self)
        self.sigma, self.mu = sigma, mu

    def log_prob_tensor(self, u, labels=None):
        s = self.sigma
        r, v_r, v_t = u[:, 0] / s, (u[:, 1] - self.mu) / s, u[:, 2] / s
        log_chi3 = 0.5 * math.log(2 / math.pi) + 2 * tf.math.log(r) - 0.5 * r * r
        log_normal = -0.5 * math.log(2 * math.pi) - 0.5 * v_r * v_r
        log_chi2 = tf.math.log(v_t) - 0.5 * v_t * v_t
        return log_chi3 + log_normal + log_chi2 - 3 * math.log(s)

    def sample_tensor(self, n, labels, seed):
        g = tf.random.stateless_normal([n, 6], seed)
        s = self.sigma
        return tf.stack([s * tf.norm(g[:, :3], axis=1), self.mu + s * g[:, 3],
                         s * tf.norm(g[:, 4:], axis=1)], axis=1)


class ReducedHernquist(Density, tf.Module):
    """p(r, v_r, v_t) = 8π² r² v_t f_H(x, v) of the isotropic Hernquist DF (Hernquist 1990,
    eq. 17), evaluated at x = (r, 0, 0), v = (v_r, v_t, 0)."""

    dim, label_dim = 3, 0

    def __init__(self):
        tf.Module.__init__(self)
        self.exact = Hernquist().exact_density("iso")

    def log_prob_tensor(self, u, labels=None):
        r, v_r, v_t = u[:, 0], u[:, 1], u[:, 2]
        zero = tf.zeros_like(r)
        w = tf.stack([r, zero, zero, v_r, v_t, zero], axis=1)
        return (self.exact.log_prob_tensor(w) + math.log(8 * math.pi ** 2) + 2 * tf.math.log(r)
                + tf.math.log(v_t))


def _gaussian_points(n: int, sigma: float, seed: int) -> np.ndarray:
    return (sigma * np.random.default_rng(seed).normal(size=(n, 6))).astype(np.float32)


def test_reduced_coordinates_by_hand():
    # x = (3, 0, 4) (r = 5), v = (1, 2, 0): v_r = x.v/r = 3/5, |x × v| = |(-8, 4, 6)| = sqrt(116)
    u = reduced_coordinates([[3.0, 0.0, 4.0, 1.0, 2.0, 0.0]])
    np.testing.assert_allclose(u, [[5.0, 0.6, math.sqrt(116) / 5]], rtol=1e-12)
    # v_r² + v_t² = |v|² for any point
    w = np.random.default_rng(0).normal(size=(100, 6))
    u = reduced_coordinates(w)
    np.testing.assert_allclose(u[:, 1] ** 2 + u[:, 2] ** 2, np.sum(w[:, 3:] ** 2, 1), rtol=1e-10)


@pytest.mark.parametrize("w, message", [
    ([[0.0, 0.0, 0.0, 1.0, 0.0, 0.0]], "r = 0"),
    ([[1.0, 0.0, 0.0, 2.0, 0.0, 0.0]], "v_t = 0"),
    ([[1.0, 0.0, 0.0, 2.0, 0.0]], "shape|6"),
])
def test_reduced_coordinates_refuse_singular_points(w, message):
    with pytest.raises(InputError, match=message):
        reduced_coordinates(w)


def test_gaussian_comes_back_exactly():
    # SphericalDF of the reduced law of N(0, σ² I₆) is N(0, σ² I₆): eq. (1)'s Jacobian 8π² r² v_t
    # is the only thing that can make it differ (a wrong 4π or a missing v_t fails by far).
    sigma = 1.3
    w = _gaussian_points(2000, sigma, seed=1)
    exact = stats.multivariate_normal(np.zeros(6), sigma ** 2 * np.eye(6)).logpdf(w)
    for even in (False, True):
        f = SphericalDF(ReducedGaussian(sigma), even=even)
        # float32 round-off of a log density of magnitude ~10
        np.testing.assert_allclose(np.asarray(f.log_prob(w)), exact, rtol=0, atol=2e-4)
        grad = np.asarray(f.grad_log_prob(w))
        np.testing.assert_allclose(grad, -w / sigma ** 2, rtol=1e-3, atol=1e-3)


def test_symmetries_are_exact():
    # A base that is not even in v_r (μ = 0.8): f is still invariant under joint rotations, and
    # with even=True under v_r -> -v_r (v -> v - 2 v_r x̂); with even=False it is not.
    w = _gaussian_points(500, 1.0, seed=2).astype(np.float64)
    rot = random_rotations(1, seed=3)[0]
    rotated = np.hstack([w[:, :3] @ rot.T, w[:, 3:] @ rot.T])
    x_hat = w[:, :3] / np.linalg.norm(w[:, :3], axis=1, keepdims=True)
    v_r = np.sum(x_hat * w[:, 3:], axis=1, keepdims=True)
    mirrored = np.hstack([w[:, :3], w[:, 3:] - 2 * v_r * x_hat])
    for even in (False, True):
        f = SphericalDF(ReducedGaussian(mu=0.8), even=even)
        lp = np.asarray(f.log_prob(w))
        np.testing.assert_allclose(np.asarray(f.log_prob(rotated)), lp, atol=1e-4)
        difference = np.abs(np.asarray(f.log_prob(mirrored)) - lp)
        if even:
            assert difference.max() < 1e-4
        else:     # log N(v_r - μ) - log N(-v_r - μ) = 2 μ v_r: O(1) for |v_r| ~ 1
            assert np.median(difference) > 0.3


def test_draws_follow_the_exact_laws():
    # Draws of SphericalDF(even) over a base with μ = 0.8: |x| ~ σ χ₃, x̂ uniform (cos θ uniform
    # on [-1, 1]), v_r ~ ½N(μ, σ²) + ½N(-μ, σ²), and the tangential velocity's direction in the
    # plane ⊥ x̂ uniform. KS tests at n = 20000 with fixed seeds: p > 1e-3 when right, while a
    # missing v_r flip or a non-uniform direction gives p < 1e-10.
    sigma, mu = 1.0, 0.8
    f = SphericalDF(ReducedGaussian(sigma, mu), even=True)
    w = np.asarray(f.sample(20000, seed=4), np.float64)
    u = reduced_coordinates(w)
    assert stats.kstest(u[:, 0] / sigma, stats.chi(3).cdf).pvalue > 1e-3
    assert stats.kstest(u[:, 2] / sigma, stats.chi(2).cdf).pvalue > 1e-3

    def mixture_cdf(v):
        return 0.5 * (stats.norm.cdf(v, mu, sigma) + stats.norm.cdf(v, -mu, sigma))
    assert stats.kstest(u[:, 1], mixture_cdf).pvalue > 1e-3
    x_hat = w[:, :3] / u[:, :1]
    assert stats.kstest(x_hat[:, 2], stats.uniform(-1, 2).cdf).pvalue > 1e-3
    # the tangential direction's angle about x̂, measured from the plane (x̂, ẑ)
    v_t = w[:, 3:] - u[:, 1:2] * x_hat
    e_1 = np.cross(x_hat, [0.0, 0.0, 1.0])
    e_1 /= np.linalg.norm(e_1, axis=1, keepdims=True)
    e_2 = np.cross(x_hat, e_1)
    angle = np.arctan2(np.sum(v_t * e_2, 1), np.sum(v_t * e_1, 1))
    assert stats.kstest(angle, stats.uniform(-np.pi, 2 * np.pi).cdf).pvalue > 1e-3


def test_hernquist_comes_back_with_exact_accelerations():
    # The reduced Hernquist density rebuilt in 6-D equals the closed-form DF, and the CBE on it
    # recovers a = -GM x / (r (r + a)²). The exact 6-D DF gives ~1e-7 (README); 1e-4 allows the
    # float32 round-off of the reduction's gradients (r, v_t of size ~1).
    model = Hernquist()
    f = SphericalDF(ReducedHernquist())
    w = sample_hernquist(500, kind="iso", seed=5, r_max=20.0).phase_space.astype(np.float32)
    np.testing.assert_allclose(np.asarray(f.log_prob(w)),
                               np.asarray(model.exact_density("iso").log_prob(w)), atol=1e-4)
    positions = np.geomspace(0.2, 5.0, 8)[:, None] * np.array([[0.36, 0.48, 0.8]])
    result = accelerations(f, positions, n_velocities=512, seed=0)
    truth = model.acceleration(positions)
    error = np.linalg.norm(result.acceleration - truth, axis=1) / np.linalg.norm(truth, axis=1)
    assert error.max() < 1e-4, error


def test_bad_arguments():
    with pytest.raises(InputError, match="3-D density"):
        SphericalDF(Hernquist().exact_density("iso"))
    with pytest.raises(InputError, match="even"):
        SphericalDF(ReducedGaussian(), even="yes")
    with pytest.raises(InputError, match="cannot sample"):
        SphericalDF(ReducedHernquist()).sample(3, seed=0)


@pytest.mark.slow          # trains two runs (~20 s); the SphericalDF itself is tested above
def test_training_in_spherical_coordinates(tmp_path):
    # TrainConfig(coordinates="spherical") trains a flow of (r, v_r, v_t) and every way back to the
    # model (train, load_run, resume, the SavedModel, rebuild) gives the same SphericalDF.
    from tfgalflow.export import export_model, load, rebuild_model
    from tfgalflow.training import TrainConfig, load_run, resume, train

    model = Hernquist()
    cat = sample_hernquist(20000, kind="iso", seed=6, r_max=50.0)
    config = TrainConfig(coordinates="spherical", layers=3, hidden=(32, 32), epochs=4,
                         batch_size=512, patience=0, seed=0)
    trained = train(cat, config, tmp_path / "run", verbose=0)
    assert isinstance(trained, SphericalDF) and trained.base.dim == 3
    fresh = sample_hernquist(4000, kind="iso", seed=7, r_max=50.0).phase_space.astype(np.float32)
    delta = (np.asarray(model.exact_density("iso").log_prob(fresh))
             - np.asarray(trained.log_prob(fresh)))
    # KL(exact || learned) + log M(<50) (-0.04, the truncation): a few 0.01 nat after 4 short
    # epochs; a wrong Jacobian in eq. (1) would shift it by >= log 2, an untrained flow by ~1.
    assert abs(delta.mean()) < 0.15, delta.mean()
    for again in (load_run(tmp_path / "run"), resume(tmp_path / "run", data=cat, verbose=0)):
        assert isinstance(again, SphericalDF)
        np.testing.assert_allclose(np.asarray(again.log_prob(fresh)),
                                   np.asarray(trained.log_prob(fresh)), atol=1e-5)
    path = export_model(trained, tmp_path / "saved", accelerations=False)
    rebuilt = rebuild_model(path)
    assert isinstance(rebuilt, SphericalDF)
    for other in (load(path), rebuilt):
        np.testing.assert_allclose(np.asarray(other.log_prob(fresh)),
                                   np.asarray(trained.log_prob(fresh)), atol=1e-4)


def test_training_with_a_bounded_radius(tmp_path):
    # support_r_max = 50 on a mock cut at r < 50: the flow learns log(r / (50 - r)); the model is
    # still the normalised DF (its log-density matches the exact one as the unbounded fit's
    # does), it draws no star beyond 50, gives -inf there, and the SavedModel keeps the bound
    from tfgalflow.export import export_model, load
    from tfgalflow.training import TrainConfig, train

    model = Hernquist()
    cat = sample_hernquist(20000, kind="iso", seed=6, r_max=50.0)
    config = TrainConfig(coordinates="spherical", support_r_max=50.0, layers=3, hidden=(32, 32),
                         epochs=4, batch_size=512, patience=0, seed=0)
    trained = train(cat, config, tmp_path / "run", verbose=0)
    assert trained.base.config.upper_bounds == ((0, 50.0),)
    fresh = sample_hernquist(4000, kind="iso", seed=7, r_max=50.0).phase_space.astype(np.float32)
    delta = (np.asarray(model.exact_density("iso").log_prob(fresh))
             - np.asarray(trained.log_prob(fresh)))
    # as in test_training_in_spherical_coordinates: a wrong Jacobian of the bounded coordinate
    # (log 50 - log r - log(50 - r)) would shift the mean by >= 1 nat at the typical r ~ 1
    assert abs(delta.mean()) < 0.15, delta.mean()
    draws = np.asarray(trained.sample(20000, seed=1), np.float64)
    assert np.linalg.norm(draws[:, :3], axis=1).max() < 50.0
    outside = fresh[:3].copy()
    outside[:, :3] *= 55.0 / np.linalg.norm(outside[:, :3], axis=1, keepdims=True)
    assert np.all(np.isneginf(np.asarray(trained.log_prob(outside))))
    back = load(export_model(trained, tmp_path / "saved", accelerations=False))
    np.testing.assert_allclose(np.asarray(back.log_prob(fresh)),
                               np.asarray(trained.log_prob(fresh)), atol=1e-4)
    assert np.all(np.isneginf(np.asarray(back.log_prob(outside))))
    with pytest.raises(InputError, match="support_r_max.*coordinates = 'spherical'"):
        TrainConfig(support_r_max=50.0)                       # cartesian: no radius column
    with pytest.raises(InputError, match="support_r_max"):
        TrainConfig(coordinates="spherical", support_r_max=0.0)


@pytest.mark.parametrize("overrides, data, message", [
    ({"log_columns": (0,)}, "catalogue", "log_columns"),
    ({"deconvolve": True}, "catalogue", "deconvolve"),
    ({}, "array3", "6-D phase-space"),
    ({"support_r_max": 40.0}, "catalogue", "support_r_max = 40.0 but"),   # stars at 40-50
])
def test_spherical_coordinates_refuse_what_they_cannot_learn(tmp_path, overrides, data, message):
    from tfgalflow.training import TrainConfig, train
    cat = sample_hernquist(200, kind="iso", seed=8, r_max=50.0)
    x = cat if data == "catalogue" else cat.phase_space[:, :3]
    with pytest.raises(InputError, match=message):
        train(x, TrainConfig(coordinates="spherical", epochs=1, **overrides), tmp_path / "r")


@pytest.mark.slow   # trains or spawns processes: make test-slow (default suite < 10 min)
def test_command_line_trains_a_spherical_df_from_an_hdf5_mock(tmp_path):
    # The README's path: an HDF5 mock (streamed files are read into memory as (r, v_r, v_t)),
    # `train --coordinates spherical`, then `accel` on the run: the CBE of a (barely trained)
    # SphericalDF. Accelerations must point inwards (a_r < 0) at every radius: a wrong sign of the
    # gradient of the Jacobian term -2 log r would push them outwards at small r.
    from tfgalflow.cli import main
    from tfgalflow.training import load_run
    mock, run = tmp_path / "m.h5", tmp_path / "run"
    assert main(["mock", "hernquist", "--n", "20000", "--seed", "1", "--r-max", "50",
                 "--out", str(mock)]) == 0
    assert main(["train", str(mock), "--coordinates", "spherical", "--layers", "2", "--hidden",
                 "16,16", "--epochs", "2", "--batch-size", "512", "--out", str(run),
                 "--verbose", "0"]) == 0
    assert isinstance(load_run(run), SphericalDF)
    out = tmp_path / "a.npz"
    assert main(["accel", str(run), "--radii", "0.5,1,2", "--out", str(out)]) == 0
    a_r = np.load(out)["a_radial"]
    assert a_r.shape == (3,) and np.all(a_r < 0), a_r
