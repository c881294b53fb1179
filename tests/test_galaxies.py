"""The toy galaxy population (tfgalflow.galaxies): exact sampler vs exact density, files, cuts."""

import math

import numpy as np
import pytest
from scipy import stats

from tfgalflow import galaxies as g
from tfgalflow.errors import FileError, InputError

THETA = np.array([10.4, 3.2, 0.2, -0.05, 0.3])


def _stars(theta, n, seed):
    rng = np.random.default_rng(seed)
    rows = np.tile(theta, (n, 1))
    return g.sample(rows, rng), rows


def _log_q_disc(w, sc):
    """A normalised density lighter-tailed than the disc: Gaussian x, y (σ = R_d) and z
    (σ = z_0), then the disc's conditional forms with 0.9 x its widths (independent code)."""
    r_cyl, phi = np.hypot(w[:, 0], w[:, 1]), np.arctan2(w[:, 1], w[:, 0])
    v_c, sig = sc.v_circ(r_cyl), 0.9 * sc.sigma_disc(r_cyl)
    mean = np.stack([-v_c * np.sin(phi), v_c * np.cos(phi), 0 * v_c], 1)
    # (v_R, v_phi) Gaussian with σ_R, σ_φ = rotated Gaussian in (v_x, v_y): same density
    v_r = (w[:, 3] - mean[:, 0]) * np.cos(phi) + (w[:, 4] - mean[:, 1]) * np.sin(phi)
    v_p = -(w[:, 3] - mean[:, 0]) * np.sin(phi) + (w[:, 4] - mean[:, 1]) * np.cos(phi)
    ln_age = np.log(w[:, 7])
    feh_mu = sc.z_0 + sc.gradient * r_cyl - 0.04 * (w[:, 7] - 5.0)
    return (stats.norm.logpdf(w[:, 0], 0, sc.r_d) + stats.norm.logpdf(w[:, 1], 0, sc.r_d)
            + stats.norm.logpdf(w[:, 2], 0, sc.z0)
            + stats.norm.logpdf(v_r, 0, sig[:, 0]) + stats.norm.logpdf(v_p, 0, sig[:, 1])
            + stats.norm.logpdf(w[:, 5], 0, sig[:, 2])
            + stats.norm.logpdf(ln_age, np.log(sc.disc_age(r_cyl)), 0.9 * sc.age_spread) - ln_age
            + stats.norm.logpdf(w[:, 6], feh_mu, 0.9 * 0.08))


def _log_q_bulge(w, sc):
    """Lighter-tailed than the bulge: Gaussian positions (σ = a_b), v ~ N(0, (0.9 σ_b(r))^2),
    ln age ~ N(ln 10, 0.09^2), [Fe/H] with 0.9 x the bulge's scatter."""
    r = np.linalg.norm(w[:, :3], axis=1)
    ln_age = np.log(w[:, 7])
    return (stats.norm.logpdf(w[:, :3], 0, sc.a_b[:, None]).sum(axis=1)
            + stats.norm.logpdf(w[:, 3:6], 0, 0.9 * sc.sigma_bulge(r)[:, None]).sum(axis=1)
            + stats.norm.logpdf(ln_age, math.log(10.0), 0.09) - ln_age
            + stats.norm.logpdf(w[:, 6], sc.z_0 + 0.1 - 0.04 * (w[:, 7] - 5.0), 0.9 * 0.2))


@pytest.mark.parametrize("f_b", [0.0, 0.2, 1.0])
def test_density_integrates_to_one(f_b):
    """E_{w~sampler}[q(w) / p(w)] = ∫ q = 1 for a normalised q: the density the code evaluates is
    the sampler's density, normalisation and Jacobians included (a wrong factor 2 or 2π moves
    the estimate by >= 50 %). q = (1 - f_b) q_disc + f_b q_bulge with q_c^2 / p_c integrable, so
    the estimate has finite variance; tolerance 5 standard errors, and the SE itself < 0.03.
    """
    theta = THETA.copy()
    theta[2] = f_b
    w, rows = _stars(theta, 200_000, 1)
    lp = g.log_prob(w, rows)
    sc = g.Scales.of(rows)
    with np.errstate(divide="ignore"):
        lq = np.logaddexp(math.log1p(-f_b) + _log_q_disc(w, sc) if f_b < 1 else -np.inf,
                          math.log(f_b) + _log_q_bulge(w, sc) if f_b > 0 else -np.inf)
    ratio = np.exp(lq - lp)
    estimate, se = ratio.mean(), ratio.std() / math.sqrt(len(ratio))
    assert se < 0.03
    assert abs(estimate - 1.0) < 5 * se, (estimate, se)


def test_conditionals_match_sampler():
    """Probability integral transforms of the stated conditionals are U(0, 1) (KS, p > 1e-4 each:
    family-wise false alarm 1.1e-3 over 11 tests; a scale wrong by 5 % gives p ~ 1e-20 at
    n = 50 000): disc (f_b = 0) R ~ Gamma(2, R_d),
    z logistic(z_0/2), v standardised by its conditional mean and σ, ln age, [Fe/H]; bulge
    (f_b = 1) M(<r)/M = r^2/(r+a)^2, v/σ_b(r) ~ N(0, 1), ln age ~ N(ln 10, 0.1).
    """
    n = 50_000
    theta = THETA.copy()
    theta[2] = 0.0
    w, rows = _stars(theta, n, 2)
    sc = g.Scales.of(rows)
    r_cyl, phi = np.hypot(w[:, 0], w[:, 1]), np.arctan2(w[:, 1], w[:, 0])
    v_r = w[:, 3] * np.cos(phi) + w[:, 4] * np.sin(phi)
    v_phi = -w[:, 3] * np.sin(phi) + w[:, 4] * np.cos(phi)
    sig = sc.sigma_disc(r_cyl)
    ln_age_z = (np.log(w[:, 7]) - np.log(sc.disc_age(r_cyl))) / sc.age_spread
    feh_z = (w[:, 6] - sc.z_0 - sc.gradient * r_cyl + 0.04 * (w[:, 7] - 5.0)) / 0.08
    pits = {
        "R": stats.gamma.cdf(r_cyl, 2.0, scale=sc.r_d),
        "z": stats.logistic.cdf(w[:, 2], scale=sc.z0 / 2),
        "v_R": stats.norm.cdf(v_r / sig[:, 0]),
        "v_phi": stats.norm.cdf((v_phi - sc.v_circ(r_cyl)) / sig[:, 1]),
        "v_z": stats.norm.cdf(w[:, 5] / sig[:, 2]),
        "ln_age": stats.norm.cdf(ln_age_z),
        "feh": stats.norm.cdf(feh_z),
        "phi": (phi + np.pi) / (2 * np.pi),
    }
    theta[2] = 1.0
    wb, rows_b = _stars(theta, n, 3)
    sb = g.Scales.of(rows_b)
    r = np.linalg.norm(wb[:, :3], axis=1)
    pits["bulge_r"] = (r / (r + sb.a_b)) ** 2
    pits["bulge_v"] = stats.norm.cdf(wb[:, 3] / sb.sigma_bulge(r))
    pits["bulge_age"] = stats.norm.cdf((np.log(wb[:, 7]) - math.log(10.0)) / 0.1)
    for name, u in pits.items():
        assert stats.kstest(u, "uniform").pvalue > 1e-4, name


def test_bulge_fraction_and_cut_fraction():
    """F(r_c) by quadrature = the fraction of sampled stars inside r_c (binomial SE <= 0.0016
    at n = 10^5; 4 SE), so p 1[r < r_c] / F(r_c) is normalised; the cut density is -inf
    outside r_c."""
    w, rows = _stars(THETA, 100_000, 4)
    r = np.linalg.norm(w[:, :3], axis=1)
    for r_c in (2.0, 6.0, 15.0):
        frac = np.mean(r < r_c)
        f = float(g.mass_fraction_within(r_c, THETA[None])[0])
        assert abs(frac - f) < 4 * math.sqrt(f * (1 - f) / len(r)) + 1e-9, (r_c, frac, f)
    # the cut log density is -inf outside and log p - log F inside
    lp = g.log_prob(w[:5], rows[:5], r_cut=np.array([1e-3, 1e3, 1e3, 1e3, 1e3]))
    assert lp[0] == -np.inf and np.all(np.isfinite(lp[1:]))


def test_files_and_cleaning(tmp_path):
    """write_population -> load_population: the percentile cut keeps ceil(n p/100) stars with
    r < r_c = the first removed radius, galaxies below min_stars are dropped and recorded."""
    rng = np.random.default_rng(5)
    theta = g.draw_parameters(3, rng)
    labels, names = g.draw_labels(theta, rng, n_projections=2, n_noise=1)
    assert labels.shape == (3, 8) and len(names) == 8
    g.write_population(tmp_path, labels, names, np.array([400, 1000, 2000]), rng)
    pop = g.load_population(tmp_path, radius_percentile=99.0, min_stars=500)
    assert list(pop.ids) == [1, 2]
    assert pop.record["galaxies_dropped"] == [0]
    assert [len(s) for s in pop.stars] == [990, 1980]
    assert pop.record["stars_removed"] == {"0": 4, "1": 10, "2": 20}
    raw = np.load(tmp_path / "galaxy_002.npy")
    r = np.linalg.norm(raw[:, :3], axis=1)
    assert pop.r_cut[1] == np.sort(r)[1980]
    np.testing.assert_array_equal(pop.labels, labels[1:])
    x, lab = pop.events([2])
    assert x.shape == (1980, 8) and np.all(lab == labels[2])
    with pytest.raises(InputError):
        g.load_population(tmp_path, radius_percentile=0.0)
    (tmp_path / g.TABLE_FILE).write_text("id,file\n")
    with pytest.raises(FileError):
        g.load_population(tmp_path)


def test_labels_carry_information_only_where_stated():
    """A projection W·u + 0.3 ε (|W| = 1, u ~ unit variance) regressed on u has R^2 near
    1 / (1 + 0.09 / var(W·u)) ~ 0.92 (> 0.8 at 2000 galaxies; a missing W gives R^2 ~ 0); the
    pure-noise columns have |corr| < 4/sqrt(2000) = 0.09 with every parameter."""
    rng = np.random.default_rng(6)
    theta = g.draw_parameters(2000, rng)
    labels, _ = g.draw_labels(theta, rng, n_projections=3, n_noise=2)
    u = g.standardised_parameters(theta)
    assert np.all(np.abs(u.std(axis=0) - 1.0) < 0.1)
    design = np.c_[np.ones(len(u)), u]
    for k in range(3):
        y = labels[:, 5 + k]
        resid = y - design @ np.linalg.lstsq(design, y, rcond=None)[0]
        assert 1.0 - resid.var() / y.var() > 0.8
    for k in range(2):
        corr = [abs(np.corrcoef(u[:, j], labels[:, 8 + k])[0, 1]) for j in range(5)]
        assert max(corr) < 4 / math.sqrt(2000)


class _Array:
    def __init__(self, a):
        self.a = a

    def numpy(self):
        return self.a


class _ExactModel:
    """The true density as a 'trained model': what a perfect flow would return (uncut)."""

    def log_prob(self, x, labels):
        return _Array(g.log_prob(np.asarray(x, float), np.asarray(labels, float)))

    def sample(self, n, labels, seed=None):
        rows = np.tile(np.asarray(labels, float), (n, 1))
        return _Array(g.sample(rows, np.random.default_rng(seed)).astype(np.float32))


def test_task_protocol_and_exact_model():
    """galaxy_population with the exact density as the model: held-out galaxies never trained
    on, labels 5 or 13 wide, cleaning recorded; the per-star error is exactly -log F(r_c)
    (the perfect model is not truncated), the AUC is near 1/2 (null spread ~0.01 at 1000 held-
    out points per side; < 0.56) and the summaries agree within sampling noise (half-mass
    radius and σ_v to ~1 % at 4000 vs 20 000 stars; < 5 %)."""
    from tfgalflow.tasks import get_task

    cfg = {"galaxies": 6, "heldout": 1, "stars_per_galaxy": 1500, "flow_samples": 4000,
           "truth_samples": 20000, "test_events": 1500, "min_stars": 100}
    task = get_task("galaxy_population", **cfg)
    assert task.label_dim == 13
    physical_only = get_task("galaxy_population", noise_labels=False, **cfg)
    assert physical_only.label_dim == 5
    # the group lasso is on exactly when latent columns may carry nothing (README's ablation)
    assert task.train_config().label_lasso > 0 and physical_only.train_config().label_lasso == 0
    x, labels = task.training_data()
    assert x.shape[1] == 8 and labels.shape == (len(x), 13)
    held = task.all_labels[task.heldout_ids[0]]
    assert not np.any(np.all(np.isclose(labels, held.astype(np.float32)), axis=1))
    metrics = task.evaluate(_ExactModel())
    assert metrics["cleaning"]["radius_percentile"] == 99.5
    row = metrics["per_galaxy"][0]
    pop = task.population()
    k = pop.index(row["galaxy"])
    theta = task.params[row["galaxy"]][None]
    log_f = float(np.log(g.mass_fraction_within(pop.r_cut[k], theta))[0])
    # the model sees float32 stars: rounding moves log p by ~1e-8 per star
    assert abs(row["logp_abs_error"] + log_f) < 1e-6
    assert row["auc"] < 0.56
    assert row["relative_error_sampled"]["half_mass_radius"] < 0.05
    assert row["relative_error_sampled"]["sigma_v"] < 0.05
    # paired: q/p is the constant 1/F(r_c) inside r_c, so the reweighted stars are the exact
    # stars and every summary agrees to the float32 rounding of the stars the model sees
    for key in ("half_mass_radius", "sigma_v", "feh_gradient"):
        assert row["relative_error"][key] < 1e-6
        # the same agreement in the summary's own unit: |S_q - S_p| = |S_p| x relative error
        assert abs(row["absolute_error"][key]) <= 1e-6 * abs(row["true_summaries"][key]) + 1e-12
    summary = metrics["summary"]
    assert summary["feh_gradient_absolute_max"] == abs(row["absolute_error"]["feh_gradient"])
    assert row["importance_ess_fraction"] > 1 - 1e-6
    # the perfect sampler agrees with the paired figure within its noise (a 4-sigma bound)
    assert metrics["summary"]["sampled_vs_paired_max_z"] < 4.0
    # the exact density records no training range: nothing is called an extrapolation
    assert row["outside_training_range"] == []
    assert metrics["summary"]["extrapolated_galaxies"] == []


def test_outside_training_range_names_the_columns_a_galaxy_extrapolates():
    from tfgalflow.tasks.galaxy_population import outside_training_range

    class Ranged:
        def __init__(self, low, high):
            self.span = (np.asarray(low), np.asarray(high))

        def label_range(self):
            return self.span

    names = ["log_mstar", "r_disc", "bulge_fraction", "feh_gradient", "age_spread"]
    low, high = [9.5, 1.0, 0.05, -0.0778, 0.15], [11.0, 6.0, 0.344, -0.0212, 0.45]
    # galaxy 45 of the task's default draw: g = -0.0202 dex/kpc lies beyond the 55 training
    # galaxies' largest, -0.0212 (README); its other labels lie inside
    galaxy_45 = np.array([9.771, 2.759, 0.3392, -0.0202, 0.2517])
    assert outside_training_range(Ranged(low, high), galaxy_45, names) == ["feh_gradient"]
    # on the recorded edge (float32 rounding of the range) is inside; no range: nothing
    edge = np.array(high)
    assert outside_training_range(Ranged(low, np.float32(high)), edge, names) == []
    assert outside_training_range(object(), galaxy_45, names) == []


def test_paired_summaries_reweight_to_another_galaxy():
    """Exact stars of θ reweighted by q/p, q the exact density of another galaxy θ' (disc 4 %
    longer, bulge fraction and [Fe/H] gradient 10 % larger, both cut at r_c): their summaries are
    those of θ' itself, measured here on independent stars of θ' (agreement within 4 combined
    standard errors), and the paired relative error has far less noise than the one of two
    independent samples (the reason the task uses it). The batch-means standard error of the
    gradient matches the textbook OLS slope error sqrt(Σe²/(n-2) / Σ(R - R̄)²): with 20 batches
    the estimate itself scatters by 1/sqrt(38) ≈ 16 %, so within a factor 0.6-1.5 (3 sigma)."""
    from tfgalflow.tasks.galaxy_population import (SUMMARY_KEYS, GalaxyPopulation,
                                                   galaxy_summaries, paired_relative_errors,
                                                   summary_errors)

    rng = np.random.default_rng(3)
    theta = np.array([10.0, 3.0, 0.3, -0.03, 0.2])
    other = theta * np.array([1.0, 1.04, 1.1, 1.1, 1.0])
    r_c = 40.0
    p_stars = GalaxyPopulation.exact_stars(theta, 200_000, r_c, rng)
    q_stars = GalaxyPopulation.exact_stars(other, 200_000, r_c, rng)
    n = len(p_stars)
    log_ratio = (g.log_prob(p_stars, np.tile(other, (n, 1)), r_cut=r_c)
                 - g.log_prob(p_stars, np.tile(theta, (n, 1)), r_cut=r_c))
    signed, rel_se, reweighted, _, _ = paired_relative_errors(p_stars, log_ratio, theta[1])
    rel = {key: abs(v) for key, v in signed.items()}
    weights = np.exp(log_ratio - log_ratio.max())
    se_reweighted = summary_errors(p_stars, theta[1], weights)
    direct, se_direct = galaxy_summaries(q_stars, theta[1]), summary_errors(q_stars, theta[1])
    plain, se_plain = galaxy_summaries(p_stars, theta[1]), summary_errors(p_stars, theta[1])
    for key in SUMMARY_KEYS:
        assert abs(reweighted[key] - direct[key]) < 4 * math.hypot(se_reweighted[key],
                                                                    se_direct[key]), key
        assert abs(signed[key] - (direct[key] / plain[key] - 1)) < 4 * math.hypot(
            rel_se[key], se_direct[key] / abs(plain[key]), se_plain[key] / abs(plain[key])), key
        # the shift is resolved (the smallest, the half-mass radius's 1 %, at ~9 sigma)
        assert rel[key] > 4 * rel_se[key], key
        sampled_se = math.hypot(se_direct[key] / direct[key], se_plain[key] / plain[key])
        assert rel_se[key] < 0.5 * sampled_se, key
    r_cyl = np.hypot(p_stars[:, 0], p_stars[:, 1])
    inside = (r_cyl > 0.5 * theta[1]) & (r_cyl < 3.0 * theta[1])
    x, y = r_cyl[inside], p_stars[inside, 6]
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - intercept - slope * x
    ols_se = math.sqrt(resid @ resid / (len(x) - 2) / np.sum((x - x.mean()) ** 2))
    assert 0.6 < se_plain["feh_gradient"] / ols_se < 1.5
