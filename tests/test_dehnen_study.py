"""The Dehnen interpolation study (tfgalflow.interpolation_study): config parsing, the exact
pieces (normalisation of the KL estimate, β(r) estimator) against closed forms, and the pipeline
end to end on a tiny config (exact-DF control, every report field, resume, refusal of another
config)."""
import json
import math

import numpy as np
import pytest

from tfgalflow.dehnen import Dehnen, max_ra_inverse
from tfgalflow.errors import InputError
from tfgalflow.exact import DehnenFamilyDF
from tfgalflow.interpolation_study import (InterpolationConfig, beta_profile, kl_by_shell,
                                           log_density_gap, radial_kl_report,
                                           run_interpolation_study)
from tfgalflow.mocks import sample_dehnen


def test_config_parses_command_line_text_and_refuses_bad_labels():
    c = InterpolationConfig().with_overrides(gammas="0.5,1.5", ra_inverses="0,1",
                                             held_out="1:0.5", hidden="32,32", epochs="3")
    assert c.gammas == (0.5, 1.5) and c.held_out == ((1.0, 0.5),) and c.hidden == (32, 32)
    assert c.epochs == 3 and len(c.grid_labels) == 4
    assert InterpolationConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(InputError, match="outside the training grid"):
        c.with_overrides(held_out="2:0.5")
    with pytest.raises(InputError, match="is a grid node"):
        c.with_overrides(held_out="0.5:1")
    with pytest.raises(InputError, match="negative Osipkov-Merritt DF"):
        c.with_overrides(ra_inverses=f"0,{1.01 * max_ra_inverse(0.5)}")
    with pytest.raises(InputError, match=r"InterpolationConfig\.with_overrides: unknown key\(s\)"):
        c.with_overrides(stars=3)
    with pytest.raises(InputError, match="label pairs"):
        c.with_overrides(held_out="1;0.5")
    assert c.with_overrides(coordinates="spherical").train_config().coordinates == "spherical"
    assert c.with_overrides(activation="gelu").train_config().activation == "gelu"
    assert c.train_config().clip_norm is None          # 0 (the default) is off
    assert c.with_overrides(clip_norm="10").train_config().clip_norm == 10.0
    with pytest.raises(InputError, match="clip_norm, label_noise and ra_inverse_asinh must be"):
        c.with_overrides(clip_norm=-1)
    assert c.train_config().label_asinh == ()                       # 0 (the default) is off
    assert c.with_overrides(ra_inverse_asinh="0.01").train_config().label_asinh == ((1, 0.01),)
    # a study_config.json written before a field existed reads with that field's default
    old = {k: v for k, v in c.to_dict().items() if k != "ra_inverse_asinh"}
    assert InterpolationConfig.from_dict(old) == c
    with pytest.raises(InputError, match="cartesian, spherical"):
        c.with_overrides(coordinates="polar")


def test_kl_estimate_of_the_untruncated_exact_df_is_minus_log_enclosed_mass():
    # q = the exact DF over all space, p = f / M(<r_max) on the cut mock: log p - log q is the
    # constant -log M(<r_max) = -2 log(10/11) for gamma = 1, r_max = 10 at every star; float32
    # log f of the quadrature is good to ~1e-6 relative, |log f| < 20 here, so 1e-4 absolute.
    label = (1.0, 0.5)
    cat = sample_dehnen(300, *label, seed=3, r_max=10.0)
    gap = log_density_gap(DehnenFamilyDF(), label, cat.pos, cat.vel, 10.0)
    np.testing.assert_allclose(gap, 2.0 * math.log(11.0 / 10.0), atol=1e-4)


def test_kl_split_over_shells_matches_the_integrals_of_two_gaussians():
    # p = N(0, I_3) cut at r < 3, q = N(0, 1.3^2 I_3) uncut (15 % of its mass lies beyond 3).
    # Both are isotropic, so the KL of their densities conditioned on a shell is the KL of their
    # radial densities there: chi(3) and 1.3 chi(3), integrated by quadrature (the truth). The
    # estimates must lie within 4 of their own standard errors of it (a shell's KL off by a
    # wrong log(P_j / Q_j) or a missing q_outside is ~0.01-0.3 nat, tens of errors), and the
    # terms must add up to the sample mean of ln p - ln q to round-off (the chain rule).
    from scipy import integrate, stats

    s, r_cut = 1.3, 3.0
    edges = [0.0, 0.5, 1.0, 2.0, r_cut]
    rng = np.random.default_rng(11)
    x = rng.standard_normal((400_000, 3))
    r_p = np.linalg.norm(x, axis=1)
    r_p = r_p[r_p < r_cut][:200_000]
    r_q = s * np.linalg.norm(rng.standard_normal((200_000, 3)), axis=1)
    chi_p, chi_q = stats.chi(3), stats.chi(3, scale=s)
    mass_cut = chi_p.cdf(r_cut)
    delta = (-0.5 * r_p**2 - math.log(mass_cut)) - (-0.5 * (r_p / s) ** 2 - 3 * math.log(s))

    out = kl_by_shell(delta, r_p, r_q, edges)

    assert out["kl_masses"] + sum(out["contribution"]) == pytest.approx(out["kl"], abs=1e-12)
    np.testing.assert_allclose(out["q_outside"], chi_q.sf(r_cut), atol=4 * math.sqrt(
        chi_q.sf(r_cut) / r_q.size))
    p_mass = np.diff(chi_p.cdf(edges)) / mass_cut
    q_mass = np.diff(chi_q.cdf(edges))
    # the masses' term from multinomial shell counts: its delta-method standard error
    g_p, g_q = np.log(p_mass / q_mass) + 1.0, np.append(-p_mass / q_mass, 0.0)
    q_all = np.append(q_mass, chi_q.sf(r_cut))
    se = math.sqrt((p_mass @ g_p**2 - (p_mass @ g_p) ** 2) / r_p.size
                   + (q_all @ g_q**2 - (q_all @ g_q) ** 2) / r_q.size)
    truth = np.sum(p_mass * np.log(p_mass / q_mass))
    assert abs(out["kl_masses"] - truth) < 4 * se, (out["kl_masses"], truth, se)
    for j in range(len(edges) - 1):
        lo, hi = edges[j], edges[j + 1]
        def integrand(r, j=j):
            pj, qj = chi_p.pdf(r) / (p_mass[j] * mass_cut), chi_q.pdf(r) / q_mass[j]
            return pj * math.log(pj / qj)
        truth = integrate.quad(integrand, lo, hi)[0]
        assert abs(out["kl_within"][j] - truth) < 4 * out["kl_within_stderr"][j], (j, truth, out)
    total = integrate.quad(lambda r: chi_p.pdf(r) / mass_cut * math.log(
        chi_p.pdf(r) / mass_cut / chi_q.pdf(r)), 0, r_cut)[0]
    assert out["kl"] == pytest.approx(total, abs=4 * np.std(delta) / math.sqrt(delta.size))
    # no sample of q in an occupied shell: the split is undefined there, and says so
    empty = kl_by_shell(delta, r_p, np.minimum(r_q, 1.9), edges)
    assert empty["kl_masses"] == math.inf and math.isnan(empty["kl_within"][3])
    assert math.isnan(empty["contribution"][3]) and math.isfinite(empty["kl_within"][2])
    with pytest.raises(InputError, match="outside the shells"):
        kl_by_shell(delta, r_p, r_q, edges[:-1])
    with pytest.raises(InputError, match="increasing"):
        kl_by_shell(delta, r_p, r_q, [0.0, 2.0, 1.0])


def test_beta_profile_of_exact_stars_follows_osipkov_merritt():
    # beta = r^2 / (r^2 + r_a^2) with r_a = a: 0.1..0.9 over 0.4a..3a. Four bins a factor 1.65
    # wide with > 2500 stars each: the ratio estimator's standard error is about
    # (1 - beta) sqrt(3 / n) < 0.035 (v_r^2 and v_t^2 each scatter by sqrt(2 / n) relative), the
    # bin-averaging bias is < 0.02, so 0.1 is ~3 sigma; the isotropic sample (beta = 0) and a
    # swapped v_r / v_t are > 0.4 off in the outer bins, so they fail clearly.
    edges = np.geomspace(0.4, 3.0, 5)
    cat = sample_dehnen(40_000, 1.0, 1.0, seed=1, r_max=100.0)
    r_mid, beta, count = beta_profile(cat.pos, cat.vel, edges)
    assert count.min() > 2500
    exact = Dehnen(1.0, 1.0).beta(r_mid)
    assert exact[-1] > 0.8
    np.testing.assert_allclose(beta, exact, atol=0.1)
    iso = sample_dehnen(40_000, 1.0, 0.0, seed=1, r_max=100.0)
    _, beta_iso, _ = beta_profile(iso.pos, iso.vel, edges)
    np.testing.assert_allclose(beta_iso, 0.0, atol=0.1)


@pytest.mark.slow   # trains or spawns processes: make test-slow (default suite < 10 min)
def test_tiny_pipeline_end_to_end(tmp_path):
    config = InterpolationConfig.tiny()
    lines = []
    report = run_interpolation_study(config, tmp_path, log=lines.append, verbose=0)
    assert set(report) >= {"config", "n_stars", "definitions", "targets", "measured", "verdict",
                           "groups", "labels", "bad_labels"}
    assert set(report["measured"]) >= {
        "held_out_median_error_symmetrised", "held_out_over_grid_error_ratio",
        "held_out_over_grid_kl_ratio", "exact_df_control",
        "held_out_over_grid_error_ratio_symmetrised"}
    assert set(report["groups"]) == {"grid", "held_out"}
    assert len(report["labels"]) == len(config.grid_labels) + len(config.held_out)
    for row in report["labels"].values():
        assert set(row) >= {"label", "group", "kl", "kl_stderr", "beta", "beta_max_abs_error",
                            "median_fractional_error", "median_fractional_error_symmetrised",
                            "median_fractional_error_exact_df", "flagged"}
        # the exact conditional DF solves the CBE to float32 round-off: the 1e-4 target
        assert row["median_fractional_error_exact_df"] <= 1e-4
        assert row["max_fractional_error_exact_df"] <= 1e-4
        assert math.isfinite(row["kl"])
    assert report["verdict"]["exact_df_control"]
    outcomes = {(p["case"], p["call"]): p["outcome"] for p in report["bad_labels"]}
    assert outcomes[("wrong_width", "log_prob")] == "InputError"
    assert outcomes[("nan", "accelerations")] == "InputError"
    assert set(outcomes.values()) <= {"InputError", "returned"}          # nothing crashes
    for name in ("report.json", "interpolation.npz", "accelerations.png", "beta.png",
                 "labels.png", "study_config.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "report.json").read_text())["measured"] == report["measured"]

    # rerun into the same directory: training and every evaluation are reused, same report
    lines.clear()
    again = run_interpolation_study(config, tmp_path, log=lines.append, verbose=0)
    assert sum("cached" in line for line in lines) == len(report["labels"])
    assert again["measured"] == report["measured"]
    # a study written before ra_inverse_asinh existed continues (the field takes its default)
    path = tmp_path / "study_config.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items()
                                if k != "ra_inverse_asinh"}))
    assert run_interpolation_study(config, tmp_path, log=lines.append,
                                   verbose=0)["measured"] == report["measured"]
    with pytest.raises(InputError, match="another config"):
        run_interpolation_study(config.with_overrides(seed=1), tmp_path, log=lines.append)
    # only an evaluation setting changed: the trained flow is loaded (its weights untouched) and
    # every label measured again, none from the old cache
    weights = sorted((tmp_path / "runs").glob("**/final/*.index"))
    stamps = [w.stat().st_mtime_ns for w in weights]
    finer = config.with_overrides(n_directions=config.n_directions + 1)
    lines.clear()
    remeasured = run_interpolation_study(finer, tmp_path, log=lines.append, verbose=0)
    assert weights and [w.stat().st_mtime_ns for w in weights] == stamps
    assert not any("cached" in line for line in lines)
    assert any("measured again" in line for line in lines)
    assert remeasured["config"]["n_directions"] == config.n_directions + 1
    assert json.loads((tmp_path / "study_config.json").read_text())["n_directions"] == (
        config.n_directions + 1)

    # the KL split over shells uses the study's own exact stars: each total is the report's KL
    # (two wide shells and 2·10^4 flow samples, so even this barely trained flow fills both)
    split = radial_kl_report(tmp_path, edges=(0.0, 2.0), n_flow=20_000,
                             extra_labels=[(1.0, 0.25)], log=lines.append)
    assert len(split["labels"]) == len(report["labels"]) + 1
    for name, row in report["labels"].items():
        parts = split["labels"][name]
        assert parts["kl"] == pytest.approx(row["kl"], rel=1e-6)
        assert parts["kl_masses"] + sum(parts["contribution"]) == pytest.approx(parts["kl"])
    assert (tmp_path / "kl_by_radius.png").stat().st_size > 0
    with pytest.raises(InputError, match="max_ra_inverse|a/r_a"):
        radial_kl_report(tmp_path, extra_labels=[(0.0, 5.0)], log=lines.append)
    with pytest.raises(InputError, match="must differ"):
        radial_kl_report(tmp_path, extra_labels=[config.held_out[0]], log=lines.append)
    with pytest.raises(InputError, match="no trained study"):
        radial_kl_report(tmp_path / "nothing", log=lines.append)


def test_evaluation_only_settings_leave_the_training_untouched():
    # a study re-measures its trained flows when only these fields change, so none of them may
    # reach the training: not its TrainConfig, not its stars (grid and per-node count and cut)
    from tfgalflow.config_fields import evaluation_only_fields

    base = InterpolationConfig.tiny()
    changed = {"held_out": ((0.9, 0.3),), "far_label": (2.0, 0.0), "n_radii": 5,
               "n_directions": 3, "r_min": 0.2, "r_max": 8.0, "n_velocities": 64,
               "rotations": 4, "summary_range": (0.3, 4.0), "n_test": 500, "n_beta": 700,
               "beta_bins": 5}
    assert set(changed) == evaluation_only_fields(InterpolationConfig)
    for name, value in changed.items():
        other = base.with_overrides(**{name: value})
        assert getattr(other, name) != getattr(base, name)
        assert other.train_config() == base.train_config(), name
        assert (other.grid_labels, other.n_per_node, other.star_r_max, other.seed) == (
            base.grid_labels, base.n_per_node, base.star_r_max, base.seed), name
