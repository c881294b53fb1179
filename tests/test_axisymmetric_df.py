"""AxisymmetricDF: a density of catalogue rows built from a density of (R, z, v_R, v_φ, v_z, e),
checked against exact answers.

Independent truths: an isotropic Gaussian N(0, σ² I₆) is axisymmetric, and its cylindrical
reduction has a closed-form law (R/σ Rayleigh, z, v_R, v_φ, v_z ~ N(0, σ²), independent: a rotation
of an isotropic Gaussian velocity is isotropic), so AxisymmetricDF of that law must be the 6-D
Gaussian exactly, and with an extra N(0, 1) column the 7-D one; draws are checked by KS tests
against the exact marginals, a rotating disc's draws by their mean streaming velocity; the
training path must return the DF, and its export and reload must give the same numbers.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from tfgalflow.axisymmetric_df import AxisymmetricDF, cylindrical_coordinates
from tfgalflow.density import Density
from tfgalflow.errors import InputError


class CylindricalGaussian(Density, tf.Module):
    """(R, z, v_R, v_φ, v_z[, e]) with R/σ ~ Rayleigh, z/σ, v_R/σ, v_z/σ ~ N(0, 1),
    (v_φ - v0)/σ ~ N(0, 1) and e ~ N(0, 1), independent. v0 = 0: exactly the reduced law of
    N(0, σ² I₆) (× N(0, 1) for e); v0 ≠ 0: a disc rotating at v0."""

    label_dim = 0

    def __init__(self, sigma: float = 1.3, v0: float = 0.0, extra: bool = False):
        tf.Module.__init__(self)
        self.sigma, self.v0, self.dim = sigma, v0, 6 if extra else 5

    def log_prob_tensor(self, u, labels=None):
        s = self.sigma
        r = u[:, 0] / s
        g = tf.stack([u[:, 1], u[:, 2], u[:, 3] - self.v0, u[:, 4]], axis=1) / s
        out = (tf.math.log(r) - 0.5 * r * r - math.log(s)
               - 0.5 * tf.reduce_sum(g * g, axis=1) - 4 * (0.5 * math.log(2 * math.pi)
                                                          + math.log(s)))
        if self.dim == 6:
            out += -0.5 * u[:, 5] ** 2 - 0.5 * math.log(2 * math.pi)
        return out

    def sample_tensor(self, n, labels, seed):
        g = tf.random.stateless_normal([n, self.dim + 1], seed)
        s = self.sigma
        cols = [s * tf.norm(g[:, :2], axis=1), s * g[:, 2], s * g[:, 3], self.v0 + s * g[:, 4],
                s * g[:, 5]]
        if self.dim == 6:
            cols.append(g[:, 6])
        return tf.stack(cols, axis=1)


def _gaussian_rows(n: int, sigma: float, extra: bool, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = sigma * rng.normal(size=(n, 6))
    return np.concatenate([w, rng.normal(size=(n, 1))], axis=1) if extra else w


@pytest.mark.parametrize("extra", [False, True])
@pytest.mark.parametrize("even", [False, True])
def test_the_reduced_gaussian_gives_back_the_gaussian(extra, even):
    sigma = 1.3
    df = AxisymmetricDF(CylindricalGaussian(sigma, extra=extra), even=even)
    w = _gaussian_rows(500, sigma, extra)
    exact = stats.norm.logpdf(w[:, :6], scale=sigma).sum(axis=1)
    if extra:
        exact += stats.norm.logpdf(w[:, 6])
    # float32 log f of values O(10): ~1e-6 relative round-off
    np.testing.assert_allclose(df.log_prob(w.astype(np.float32)).numpy(), exact, rtol=1e-5,
                               atol=1e-4)
    # the gradient of log f is -w / σ² (extra column: -e)
    grad = df.grad_log_prob(w.astype(np.float32)).numpy()
    expected = -w / sigma**2
    if extra:
        expected[:, 6] = -w[:, 6]
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-4)


def test_invariant_under_rotations_about_z_and_the_mirrors_with_even():
    base = CylindricalGaussian(1.0, v0=0.8)
    w = _gaussian_rows(400, 1.0, extra=False, seed=3) + np.array([0, 0, 0.3, 0.2, 0, 0.1])
    for even in (False, True):
        df = AxisymmetricDF(base, even=even)
        log_f = df.log_prob(w.astype(np.float32)).numpy()
        a = 0.7
        rot = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
        turned = np.concatenate([w[:, :3] @ rot.T, w[:, 3:] @ rot.T], axis=1)
        np.testing.assert_allclose(df.log_prob(turned.astype(np.float32)).numpy(), log_f,
                                   rtol=1e-5, atol=1e-5)
        # the mid-plane mirror (z, v_z) -> (-z, -v_z): a symmetry of f only with even (the base
        # here is even in z and v_z already, so it is one either way); v_R -> -v_R likewise
        mirrored = w * np.array([1, 1, -1, 1, 1, -1])
        np.testing.assert_allclose(df.log_prob(mirrored.astype(np.float32)).numpy(), log_f,
                                   rtol=1e-5, atol=1e-5)


def test_even_averages_a_radial_streaming_away():
    # base with v_R ~ N(0.9, 1): not even; the even DF is the 50/50 mixture of ±0.9
    class Streaming(CylindricalGaussian):
        def log_prob_tensor(self, u, labels=None):
            return super().log_prob_tensor(u - tf.constant([0, 0, 0.9, 0, 0], tf.float32))

    df = AxisymmetricDF(Streaming(1.0), even=True)
    w = _gaussian_rows(300, 1.0, extra=False, seed=4)
    u = cylindrical_coordinates(w)
    exact = (np.log(u[:, 0]) - 0.5 * u[:, 0] ** 2
             + np.logaddexp(stats.norm.logpdf(u[:, 2], 0.9), stats.norm.logpdf(u[:, 2], -0.9))
             - math.log(2) + stats.norm.logpdf(u[:, [1, 3, 4]]).sum(axis=1)
             - np.log(2 * np.pi * u[:, 0]))
    np.testing.assert_allclose(df.log_prob(w.astype(np.float32)).numpy(), exact, rtol=1e-5,
                               atol=1e-4)


def test_draws_follow_the_exact_marginals_and_the_rotation():
    v0, sigma = 1.5, 0.5
    df = AxisymmetricDF(CylindricalGaussian(sigma, v0=v0, extra=True), even=True)
    w = df.sample(20000, seed=11).numpy().astype(np.float64)
    # x, y of an isotropic 2-D Gaussian position: each N(0, σ²); KS p-value > 1e-3 (fixed seed)
    for j in (0, 1, 2, 5):
        assert stats.kstest(w[:, j] / sigma, "norm").pvalue > 1e-3
    assert stats.kstest(w[:, 6], "norm").pvalue > 1e-3
    # the streaming: mean of v·φ̂ is v0 (standard error σ/√n = 0.0035: 5 errors)
    u = cylindrical_coordinates(w)
    assert abs(u[:, 3].mean() - v0) < 5 * sigma / math.sqrt(len(u))
    # and no net v_x, v_y (the ring turns with φ)
    assert np.all(np.abs(w[:, 3:5].mean(axis=0)) < 5 * math.sqrt(sigma**2 + v0**2 / 2)
                  / math.sqrt(len(w)))


def test_bad_input_is_an_input_error():
    with pytest.raises(InputError, match="z axis"):
        cylindrical_coordinates(np.array([[0.0, 0.0, 1.0, 1.0, 0.0, 0.0]]))
    with pytest.raises(InputError, match=">= 6"):
        cylindrical_coordinates(np.ones((3, 5)))
    with pytest.raises(InputError, match="dim >= 5"):
        AxisymmetricDF(_Tiny())
    with pytest.raises(InputError, match="even"):
        AxisymmetricDF(CylindricalGaussian(), even="yes")


class _Tiny(Density, tf.Module):
    dim, label_dim = 3, 0

    def log_prob_tensor(self, x, labels=None):
        return tf.zeros(tf.shape(x)[:1])


def test_train_config_checks_the_columns():
    from tfgalflow.training import TrainConfig
    cfg = TrainConfig(coordinates="cylindrical", log_columns=(7,))
    assert cfg.flow_config(7, 0).log_columns == (0, 6)          # log R, and column 7 -> 6
    with pytest.raises(InputError, match="after the sixth"):
        TrainConfig(coordinates="cylindrical", log_columns=(0,))
    with pytest.raises(InputError, match="spherical"):
        TrainConfig(coordinates="spherical", log_columns=(0,))


def _trained_run(tmp_path):
    from tfgalflow.training import TrainConfig, train
    rng = np.random.default_rng(5)
    w = _gaussian_rows(3000, 1.0, extra=True, seed=5)
    w[:, 6] = np.exp(0.3 * w[:, 6])                   # a positive column learned as its log
    labels = rng.uniform(0, 1, size=(len(w), 1)).astype(np.float32)
    cfg = TrainConfig(coordinates="cylindrical", log_columns=(6,), layers=2, hidden=(16, 16),
                      epochs=2, batch_size=256, validation_split=0.0, checkpoint_every=0)
    model = train(w.astype(np.float32), cfg, tmp_path / "run", labels=labels, verbose=0)
    return model, w[:200].astype(np.float32), labels[:200]


def test_training_returns_the_df(tmp_path):
    from tfgalflow.training import load_run
    model, x, c = _trained_run(tmp_path)
    assert isinstance(model, AxisymmetricDF) and model.dim == 7 and model.label_dim == 1
    assert model.base.config.log_columns == (0, 5)
    loaded = load_run(tmp_path / "run")
    assert isinstance(loaded, AxisymmetricDF)
    np.testing.assert_allclose(loaded.log_prob(x, c).numpy(), model.log_prob(x, c).numpy(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.slow          # the export and rebuild (~15 s); the contract exports an AxisymmetricDF
def test_a_trained_df_exports_and_rebuilds(tmp_path):
    from tfgalflow.export import export_model, rebuild_model
    model, x, c = _trained_run(tmp_path)
    rebuilt = rebuild_model(export_model(model, tmp_path / "export"))
    assert isinstance(rebuilt, AxisymmetricDF)
    np.testing.assert_allclose(rebuilt.log_prob(x, c).numpy(), model.log_prob(x, c).numpy(),
                               rtol=1e-4, atol=1e-4)
