"""Posterior summaries on a grid against closed-form Gaussian answers; the 1-D flow grid path; the
CLI."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
from scipy import stats

from tfgalflow import posterior
from tfgalflow.errors import InputError
from tfgalflow.flows import FlowConfig
from tfgalflow.model import Flow

GRID = posterior.parse_grid("-4:8:0.002")


def gaussian_rows(mu, sigma):
    return stats.norm.pdf(GRID[None, :], np.asarray(mu)[:, None], np.asarray(sigma)[:, None])


def test_parse_grid_inclusive():
    g = posterior.parse_grid("0:3:0.005")
    assert g.size == 601 and g[0] == 0.0 and abs(g[-1] - 3.0) < 1e-12
    with pytest.raises(InputError, match="START:STOP:STEP"):
        posterior.parse_grid("0:3")


def test_gaussian_summaries():
    mu, sigma = np.array([0.5, 1.3, 2.0]), np.array([0.2, 0.35, 0.5])
    truth = np.array([0.7, 1.0, 2.0])
    post = posterior.normalise(np.log(gaussian_rows(mu, sigma)), GRID)
    s = posterior.summarize(post, GRID, truth)
    # trapezoid error on a 0.002 grid for σ >= 0.2 is < 1e-5; MAP is the nearest grid point
    # (±0.001)
    assert np.allclose(s["map"], mu, atol=0.0011)
    assert np.allclose(s["mean"], mu, atol=1e-5)
    z84 = stats.norm.ppf(0.84)
    assert np.allclose(s["q16"], mu - z84 * sigma, atol=1e-4)
    assert np.allclose(s["q84"], mu + z84 * sigma, atol=1e-4)
    # the 68 % HPD region of a Gaussian is μ ± Φ⁻¹(0.84) σ (to one grid step)
    assert np.allclose(s["hpd_lo"], mu - z84 * sigma, atol=0.003)
    assert np.allclose(s["hpd_hi"], mu + z84 * sigma, atol=0.003)
    u = (truth - mu) / sigma
    assert np.allclose(s["pit"], stats.norm.cdf(u), atol=1e-5)
    assert np.allclose(s["hpd_level"], 2 * stats.norm.cdf(np.abs(u)) - 1, atol=3e-3)


def test_kl_gaussians():
    p = posterior.normalise(np.log(gaussian_rows([0.0], [0.3])), GRID)
    q = posterior.normalise(np.log(gaussian_rows([0.1], [0.4])), GRID)
    # KL(N0‖N1) = ln(s1/s0) + (s0² + (m0-m1)²)/(2 s1²) - 1/2
    exact = math.log(0.4 / 0.3) + (0.09 + 0.01) / (2 * 0.16) - 0.5
    assert abs(posterior.kl_divergence(p, q, GRID)[0] - exact) < 1e-5


def test_point_metrics_and_ks():
    z = np.array([0.0, 1.0, 1.0, 2.0])
    est = np.array([0.01, 1.02, 1.5, 2.0])      # Δz/(1+z) = 0.01, 0.01, 0.25, 0
    m = posterior.point_metrics(est, z)
    assert m["eta"] == 0.25
    assert abs(m["bias"] - 0.01) < 1e-12
    dz = est - z
    assert abs(m["sigma_nmad"] - 1.48 * np.median(np.abs(dz - np.median(dz)) / (1 + z))) < 1e-12
    u = np.random.default_rng(0).uniform(size=500) ** 1.2
    assert abs(posterior.pit_ks(u) - stats.kstest(u, "uniform").statistic) < 1e-12


def test_bimodal_detection():
    two = 0.6 * gaussian_rows([0.3], [0.1]) + 0.4 * gaussian_rows([2.5], [0.15])
    one = gaussian_rows([1.0], [0.3])
    close = 0.5 * gaussian_rows([1.0], [0.1]) + 0.5 * gaussian_rows([1.2], [0.1])
    post = posterior.normalise(np.log(np.concatenate([two, one, close]) + 1e-300), GRID)
    assert posterior.is_bimodal(post, GRID).tolist() == [True, False, False]


def test_mode_mass_kl_chain_rule():
    def mixture(w):
        return w * gaussian_rows([0.3], [0.1]) + (1 - w) * gaussian_rows([2.5], [0.15])

    p = posterior.normalise(np.log(mixture(0.7) + 1e-300), GRID)
    # q: the same two modes reweighted. The modes overlap by < 1e-40, so the shapes' term of the
    # chain rule is 0 and all of KL(p ‖ q) is the masses' KL(0.7, 0.3 ‖ 0.4, 0.6)
    reweighted = posterior.normalise(np.log(mixture(0.4) + 1e-300), GRID)
    masses = 0.7 * math.log(0.7 / 0.4) + 0.3 * math.log(0.3 / 0.6)
    assert abs(posterior.mode_mass_kl(p, reweighted, GRID)[0] - masses) < 1e-6
    assert abs(posterior.kl_divergence(p, reweighted, GRID)[0] - masses) < 1e-6
    # q: the right weights, one mode shifted by half its width: the masses' term is 0 (to the
    # 1e-6 of the shifted tail that crosses the valley) while KL is the shift's 0.7 · 0.5²/2
    shifted = posterior.normalise(np.log(
        0.7 * gaussian_rows([0.35], [0.1]) + 0.3 * gaussian_rows([2.5], [0.15]) + 1e-300), GRID)
    assert posterior.mode_mass_kl(p, shifted, GRID)[0] < 1e-6
    assert abs(posterior.kl_divergence(p, shifted, GRID)[0] - 0.7 * 0.125) < 1e-4
    # a unimodal row has no modes to weigh
    one = posterior.normalise(np.log(gaussian_rows([1.0], [0.3])), GRID)
    assert np.isnan(posterior.mode_mass_kl(one, one, GRID)[0])


@pytest.fixture(scope="module")
def flow():
    # The plain graph: the grid hook is compared with the generic contract path as the same
    # float32 maths. (Eager log_prob runs XLA-compiled by default, whose fused spline arithmetic
    # differs by up to ~6e-4 nat at points next to a knot, where rounding picks the other bin.)
    f = Flow(
        FlowConfig(dim=1, label_dim=4, layers=2, hidden=(16, 16), kind="spline", bins=6, seed=3),
        jit_compile=False,
    )
    rng = np.random.default_rng(1)
    c = rng.normal(size=(256, 4)).astype(np.float32)
    z = (1.0 + 0.5 * np.tanh(c[:, :1]) + 0.2 * rng.normal(size=(256, 1))).astype(np.float32)
    f.adapt(z, c)
    import tf_keras as keras
    f.compile(keras.optimizers.Adam(1e-2))
    f.fit(z, c, epochs=3, batch_size=64, verbose=0)
    return f, c


class _Generic:
    """The flow seen through the plain density contract only (no grid hook)."""

    def __init__(self, f):
        self.f, self.dim, self.label_dim = f, f.dim, f.label_dim

    def log_prob(self, x, labels):
        return self.f.log_prob(x, labels)


def test_flow_grid_matches_generic_and_normalises(flow):
    f, c = flow
    grid = posterior.parse_grid("-6:8:0.002")
    fast = posterior.log_posterior_grid(f, c[:50], grid, max_elements=50_000)
    slow = posterior.log_posterior_grid(_Generic(f), c[:50], grid, max_elements=50_000)
    assert np.allclose(fast, slow, atol=2e-4)        # float32 round-off of the same maths
    # a normalised density: ∫ p dz over a grid that covers the support (tails < 1e-4) and resolves
    # the sharpest fitted peaks (trapezoid error < 1e-3 at a step of 5e-4)
    fine = posterior.parse_grid("-6:8:0.0005")
    lp = posterior.log_posterior_grid(f, c[:50], fine)
    assert np.allclose(np.trapezoid(np.exp(lp), fine, axis=1), 1.0, atol=2e-3)


def test_cli_posterior(flow, tmp_path):
    from tfgalflow import cli
    from tfgalflow.training import TrainConfig, train
    rng = np.random.default_rng(2)
    c = rng.normal(size=(300, 3)).astype(np.float32)
    z = (1.5 + 0.3 * c[:, :1] + 0.1 * rng.normal(size=(300, 1))).astype(np.float32)
    run = tmp_path / "run"
    train(z, TrainConfig(kind="spline", layers=1, hidden=(8,), bins=4, epochs=1, batch_size=100,
                         jit_compile=False, steps_per_call=1), run, labels=c, verbose=0)
    inputs = tmp_path / "inputs.h5"
    posterior.write_inputs(inputs, c[:40], z[:40, 0])
    out = tmp_path / "post.h5"
    assert cli.main(["posterior", str(run), str(inputs), "--grid", "0:3:0.01", "--out", str(out),
                     "--no-progress"]) == 0
    with h5py.File(out) as f:
        assert f["posterior"].shape == (40, 301)
        assert np.allclose(np.trapezoid(f["posterior"][:], f["grid"][:], axis=1), 1.0, atol=1e-5)
        assert f["pit"].shape == (40,) and "metrics" in f.attrs
