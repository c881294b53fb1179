"""tfgalflow.mocks and the `mock`/`info` CLI: samplers against independent truths, fixed seeds.

References: the analytic mass profile M(<r)/M = r^2/(r+a)^2 (KS test), the Jeans profiles sigma_r,
sigma_t of tfgalflow.hernquist (closed forms of the Jeans integral, independent of the DF code the
sampler uses), speed distributions at fixed r by scipy quadrature of v^2 f(Psi - v^2/2), emcee
against the exact sampler (two-sample KS), and the requested noise level (sample standard deviation
with its standard error). Each statistical check also shows that it rejects a wrong model (a = 1.2,
the other DF kind), so the tolerances cannot hide a wrong factor.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy import integrate, stats

from tfgalflow import cli
from tfgalflow.catalogue import Catalogue
from tfgalflow.errors import InputError
from tfgalflow.hernquist import Hernquist
from tfgalflow.mocks import iso_speeds, add_noise, cut, sample_emcee, sample_hernquist
from tfgalflow.units import ModelUnits

H = Hernquist()
KINDS = ["iso", "aniso"]


@pytest.fixture(scope="module")
def mocks() -> dict[str, Catalogue]:
    """10^5 stars of each kind (about 0.3 s each)."""
    return {
        kind: sample_hernquist(100_000, kind=kind, seed=11 + i) for i, kind in enumerate(KINDS)
    }


def radial_tangential(cat: Catalogue) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(r, v_r, v_t^2 / 2): v_t^2 / 2 is the mean of the two tangential components' squares."""
    r = cat.r
    v_r = np.sum(cat.vel * cat.pos, axis=1) / r
    return r, v_r, 0.5 * (np.sum(cat.vel**2, axis=1) - v_r**2)


# ---- radii --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_radii_follow_the_mass_profile(kind):
    r = sample_hernquist(20_000, kind=kind, seed=1).r
    p = stats.kstest(r, lambda x: x**2 / (x + 1.0) ** 2).pvalue
    assert p > 0.01, p
    # The same test rejects a 20 % larger scale length decisively (measured p = 1e-59).
    wrong = stats.kstest(r, lambda x: x**2 / (x + 1.2) ** 2).pvalue
    assert wrong < 1e-6, wrong


def test_truncated_radii_follow_the_truncated_mass_profile():
    r_max = 5.0
    r = sample_hernquist(20_000, seed=2, r_max=r_max, model=Hernquist(M=3.0, a=2.0)).r
    assert r.max() < r_max
    mass = lambda x: (x / (x + 2.0)) ** 2 / (r_max / (r_max + 2.0)) ** 2   # noqa: E731
    assert stats.kstest(r, mass).pvalue > 0.01
    # the untruncated profile is wrong
    assert stats.kstest(r, lambda x: x**2 / (x + 2.0) ** 2).pvalue < 1e-6


# ---- velocities ---------------------------------------------------------------------------------

def binned_z_scores(cat: Catalogue, kind: str, edges=np.geomspace(0.05, 20.0, 9)):
    """(z_r, z_t) per radial bin: (mean v_r^2 - <sigma_r^2>) / SE, and the same for one
    tangential component.

    <sigma^2> is the Jeans profile averaged over the bin's own stars (exact expectation given their
    radii); SE = std / sqrt(n_bin) of the per-star squares (independent stars).
    """
    r, v_r, v_t2 = radial_tangential(cat)
    z_r, z_t = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (r >= lo) & (r < hi)
        k = m.sum()
        z_r.append(
            (np.mean(v_r[m] ** 2) - np.mean(H.sigma_r(r[m], kind) ** 2))
            / (np.std(v_r[m] ** 2) / np.sqrt(k))
        )
        z_t.append(
            (np.mean(v_t2[m]) - np.mean(H.sigma_t(r[m], kind) ** 2))
            / (np.std(v_t2[m]) / np.sqrt(k))
        )
    return np.array(z_r), np.array(z_t)


@pytest.mark.parametrize("kind", KINDS)
def test_velocity_dispersions_follow_jeans_profiles(mocks, kind):
    z_r, z_t = binned_z_scores(mocks[kind], kind)
    # 8 bins x 2 components with 1.5e3-2.5e4 stars each; |z| < 4 per bin (measured max |z| 2.3).
    assert np.all(np.abs(z_r) < 4), z_r
    assert np.all(np.abs(z_t) < 4), z_t
    # The other kind's profiles are rejected: tangential dispersions differ by sqrt(2)
    # for beta = 1/2.
    other = "aniso" if kind == "iso" else "iso"
    _, z_t_wrong = binned_z_scores(mocks[kind], other)
    assert np.max(np.abs(z_t_wrong)) > 20, z_t_wrong


@pytest.mark.parametrize("kind, beta", [("iso", 0.0), ("aniso", 0.5)])
def test_measured_anisotropy(mocks, kind, beta):
    """beta = 1 - <v_t^2/2> / <v_r^2> over all stars, with its delta-method standard error."""
    _, v_r, v_t2 = radial_tangential(mocks[kind])
    a, b = np.mean(v_t2), np.mean(v_r**2)
    cov = np.cov(v_t2, v_r**2) / len(v_r)
    ratio = a / b
    se = ratio * np.sqrt(cov[0, 0] / a**2 + cov[1, 1] / b**2 - 2 * cov[0, 1] / (a * b))
    measured = 1 - ratio
    assert abs(measured - beta) < 4 * se, (measured, se)
    # the other kind's beta is far off
    assert abs(measured - (0.5 - beta)) > 20 * se


@pytest.mark.parametrize("r", [0.01, 1.0, 30.0])
def test_iso_speeds_at_fixed_radius_match_quadrature(r):
    """KS test of |v| at fixed r against the CDF of v^2 f(Psi - v^2/2) on [0, v_esc].

    The CDF comes from scipy quadrature.
    """
    psi, v_esc = float(H.relative_potential(r)), float(H.escape_speed(r))
    grid = np.linspace(0.0, v_esc, 400)
    pdf = grid**2 * H.f_iso(psi - 0.5 * grid**2)
    cdf = integrate.cumulative_trapezoid(pdf, grid, initial=0.0)
    # Refine the normalisation with adaptive quadrature (the trapezoid grid is for shape only).
    norm, _ = integrate.quad(lambda v: v**2 * H.f_iso(psi - 0.5 * v**2), 0.0, v_esc, limit=200)
    cdf = cdf / cdf[-1]
    assert abs(np.trapezoid(pdf, grid) / norm - 1) < 1e-3
    speeds = iso_speeds(H, np.full(20_000, r), np.random.default_rng(7))
    assert speeds.max() < v_esc
    p = stats.kstest(speeds, lambda v: np.interp(v, grid, cdf)).pvalue
    assert p > 0.01, p
    # A 5 % error in the speed scale would be rejected.
    assert stats.kstest(1.05 * speeds, lambda v: np.interp(v, grid, cdf)).pvalue < 1e-4


def test_reproducible_seeds_and_units():
    a = sample_hernquist(1000, kind="aniso", seed=5)
    b = sample_hernquist(1000, kind="aniso", seed=5)
    assert np.array_equal(a.phase_space, b.phase_space)
    assert not np.array_equal(
        a.phase_space, sample_hernquist(1000, kind="aniso", seed=6).phase_space
    )
    fresh = sample_hernquist(100, seed=None)
    assert np.array_equal(
        sample_hernquist(100, seed=fresh.meta["seed"]).phase_space, fresh.phase_space
    )
    assert a.units == {"length": "model", "velocity": "model"}
    assert a.meta["kind"] == "aniso" and a.meta["sampler"] == "exact"
    assert a.meta["model"] == {"M": 1.0, "a": 1.0, "G": 1.0}
    # Model units -> kpc, km/s: v0 = sqrt(G M / a) = sqrt(4.30091e-6 * 1e10 / 5) km/s = 92.746 km/s
    # (G to 6 digits, hence rtol 2e-5); lengths scale by a = 5 kpc, and kpc -> m by 3.0857e19.
    model = sample_hernquist(10, seed=1, model_units=ModelUnits(1e10, 5.0))
    phys = model.to_units("kpc", "km/s")
    np.testing.assert_allclose(phys.vel, model.vel * 92.7460, rtol=2e-5)
    np.testing.assert_allclose(phys.pos, model.pos * 5.0, rtol=1e-15)
    si = model.to_units("m", "m/s")
    np.testing.assert_allclose(si.pos, model.pos * 5.0 * 3.0856775814913673e19, rtol=1e-15)


# ---- emcee --------------------------------------------------------------------------------------

def test_emcee_matches_exact_sampler():
    """Two-sample KS on r and |v|: emcee (64 walkers, thin 100 as in the reference study) vs
    exact draws.

    Both are truncated at r_max = 20 a: without it walkers drift to huge radii (M(>r) ∝ 1/r) where
    the stretch move mixes slowly.
    """
    df = lambda x, v: H.log_df(x, v, "iso")   # noqa: E731
    mc = sample_emcee(df, 2048, nwalkers=64, burn=500, thin=100, seed=3, r_max=20.0)
    exact = sample_hernquist(20_000, kind="iso", seed=4, r_max=20.0)
    assert mc.r.max() < 20.0 and len(mc) == 2048
    assert 0.2 <= mc.meta["acceptance_fraction"] <= 0.7
    assert (
        mc.meta["sampler"] == "emcee" and mc.meta["thin"] == 100 and mc.meta["autocorr_steps"] > 0
    )
    for name in ("r", "speed"):
        p = stats.ks_2samp(getattr(mc, name), getattr(exact, name)).pvalue
        assert p > 0.01, (name, p)
    # Power check: the beta = 1/2 mock has other speeds at the same radii; KS on speeds sees it.
    aniso = sample_hernquist(20_000, kind="aniso", seed=4, r_max=20.0)
    assert stats.ks_2samp(exact.speed, aniso.speed).pvalue < 1e-6


def test_emcee_warns_on_poor_acceptance():
    """A thin 5-sphere shell in 6D: stretch moves between shell points rarely land on the shell."""
    def shell(x, v):
        return -0.5 * ((np.linalg.norm(np.concatenate([x, v], 1), axis=1) - 10.0) / 0.01) ** 2

    init = np.random.default_rng(0).normal(size=(32, 6))
    init *= 10.0 / np.linalg.norm(init, axis=1, keepdims=True)
    with pytest.warns(UserWarning, match="acceptance fraction 0.0.* outside"):
        cat = sample_emcee(
            shell,
            200,
            nwalkers=32,
            burn=20,
            thin=2,
            seed=0,
            init=init,
            units={"length": "kpc", "velocity": "km/s"},
        )
    assert cat.meta["acceptance_fraction"] < 0.2 and cat.units["length"] == "kpc"


def test_emcee_bad_input():
    df = lambda x, v: H.log_df(x, v, "iso")   # noqa: E731
    with pytest.raises(InputError, match="nwalkers must be even and >= 12"):
        sample_emcee(df, 10, nwalkers=11)
    with pytest.raises(InputError, match="n = 0: expected an integer >= 1"):
        sample_emcee(df, 0)
    with pytest.raises(InputError, match=r"log_df returned shape \[\]"):
        sample_emcee(lambda x, v: 0.0, 10, nwalkers=12, burn=1, thin=1)
    with pytest.raises(InputError, match="init has shape"):
        sample_emcee(df, 10, nwalkers=12, init=np.zeros((3, 6)))


# ---- cuts and noise -----------------------------------------------------------------------------

@pytest.mark.parametrize("level", [0.01, 0.1])
def test_noise_coordinate_convention_has_requested_scatter(level):
    cat = sample_hernquist(20_000, seed=8)
    noisy = add_noise(cat, level, seed=9)
    for new, old in ((noisy.pos, cat.pos), (noisy.vel, cat.vel)):
        frac = ((new - old) / old).ravel()
        # 6e4 Gaussian deviates: relative SE of the std is 1/sqrt(2 * 6e4) = 0.29 %; allow 4 SE.
        assert abs(np.std(frac) / level - 1) < 4 / np.sqrt(2 * frac.size), np.std(frac)
        assert abs(np.mean(frac)) < 4 * level / np.sqrt(frac.size)
    assert noisy.meta["noise"] == [
        {"level": level, "level_vel": level, "convention": "coordinate", "seed": 9}
    ]


def test_noise_vector_convention_and_separate_velocity_level():
    cat = sample_hernquist(20_000, seed=8)
    noisy = add_noise(cat, 0.02, seed=1, level_vel=0.1, convention="vector")
    fx = ((noisy.pos - cat.pos) / cat.r[:, None]).ravel()
    fv = ((noisy.vel - cat.vel) / cat.speed[:, None]).ravel()
    tol = 4 / np.sqrt(2 * fx.size)
    assert abs(np.std(fx) / 0.02 - 1) < tol and abs(np.std(fv) / 0.1 - 1) < tol
    # Per-star rms |Δx| / |x| is sqrt(3) times the level in this convention.
    assert (
        abs(
            np.sqrt(np.mean(np.sum((noisy.pos - cat.pos) ** 2, 1) / cat.r**2))
            / (np.sqrt(3) * 0.02)
            - 1
        )
        < 0.02
    )


def test_cut_by_radius_and_binding():
    # 10 % noise unbinds some stars
    noisy = add_noise(sample_hernquist(20_000, seed=3), 0.1, seed=4)
    E = H.relative_energy(noisy.pos, noisy.vel)
    expected = (noisy.r < 10.0) & (E > 0)
    assert 0 < np.sum(E <= 0) and expected.sum() < len(noisy)
    kept = cut(noisy, r_max=10.0, bound_to=H)
    assert len(kept) == expected.sum()
    assert np.array_equal(kept.pos, noisy.pos[expected])
    assert kept.meta["cuts"] == [{"r_max": 10.0, "bound_to": {"M": 1.0, "a": 1.0, "G": 1.0},
                                  "kept": int(expected.sum()), "of": 20_000,
                                  "after_noise": True}]     # a cut of the noisy radii
    with pytest.raises(InputError, match="removes all"):
        cut(noisy, r_max=1e-9)
    with pytest.raises(InputError, match="r_max and/or bound_to"):
        cut(noisy)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: sample_hernquist(0), "n = 0: expected an integer >= 1"),
        (lambda: sample_hernquist(-3), "n = -3: expected an integer >= 1"),
        (lambda: sample_hernquist(2.5), "n = 2.5: expected an integer >= 1"),
        (lambda: sample_hernquist(10, kind="radial"), "unknown DF kind 'radial'"),
        (
            lambda: sample_hernquist(10, r_max=-1.0),
            r"r_max \(radius\) = -1.0: expected a finite number > 0",
        ),
        (lambda: sample_hernquist(10, seed=-1), "seed = -1: expected an integer >= 0"),
        (
            lambda: sample_hernquist(10, model="hernquist"),
            "model must be a tfgalflow.hernquist.Hernquist",
        ),
        (
            lambda: add_noise(sample_hernquist(5, seed=0), -0.1),
            r"level \(fractional, 0.01 = 1 %\) = -0.1: expected a finite number >= 0",
        ),
        (
            lambda: add_noise(sample_hernquist(5, seed=0), 0.1, convention="polar"),
            "unknown noise convention 'polar'",
        ),
    ],
)
def test_bad_input_raises_input_error(call, message):
    with pytest.raises(InputError, match=message):
        call()


# ---- CLI ----------------------------------------------------------------------------------------

def test_cli_mock_writes_the_api_catalogue(tmp_path, capsys):
    out = tmp_path / "mock.h5"
    code = cli.main(
        [
            "mock",
            "hernquist",
            "--df",
            "aniso",
            "--n",
            "3000",
            "--seed",
            "4",
            "--r-max",
            "50",
            "--noise",
            "0.01",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    cat = Catalogue.load(out)
    # Documented seeding: the sampler uses --seed, the noise --seed + 1.
    expected = add_noise(sample_hernquist(3000, kind="aniso", seed=4, r_max=50.0), 0.01, seed=5)
    assert np.array_equal(cat.phase_space, cut(expected, r_max=50.0).phase_space)
    assert cat.meta["noise"][0]["level"] == 0.01 and cat.meta["kind"] == "aniso"
    assert f"wrote {len(cat)} stars" in capsys.readouterr().out

    # Noise moves stars across --r-max; the written catalogue still keeps the promise r < R.
    # 10 % noise at R = 2a: of 3000 stars ~1000 lie within 0.3a of R, so some always cross
    # (fixed seed).
    assert (
        cli.main(
            [
                "mock",
                "hernquist",
                "--n",
                "3000",
                "--seed",
                "1",
                "--r-max",
                "2",
                "--noise",
                "0.1",
                "--out",
                str(tmp_path / "cut.npz"),
            ]
        )
        == 0
    )
    noisy_cut = Catalogue.load(tmp_path / "cut.npz")
    uncut = add_noise(sample_hernquist(3000, seed=1, r_max=2.0), 0.1, seed=2)
    assert noisy_cut.r.max() < 2.0 and (uncut.r >= 2.0).sum() > 0
    assert len(noisy_cut) == int((uncut.r < 2.0).sum())
    capsys.readouterr()

    assert cli.main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "N: 3000" in text and "length=model, velocity=model" in text
    median_r = float(np.median(cat.r))
    assert f"{median_r:.4g}" in text                      # the radius percentiles are printed
    assert '"kind": "aniso"' in text


def test_cli_mock_physical_units_and_emcee(tmp_path, capsys):
    out = tmp_path / "si.npz"
    assert (
        cli.main(
            [
                "mock",
                "hernquist",
                "--n",
                "200",
                "--seed",
                "1",
                "--r-max",
                "20",
                "--sampler",
                "emcee",
                "--walkers",
                "16",
                "--burn",
                "50",
                "--thin",
                "2",
                "--units",
                "si",
                "--mass-msun",
                "1e10",
                "--scale-kpc",
                "5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "acceptance fraction" in printed
    cat = Catalogue.load(out)
    assert cat.units == {"length": "m", "velocity": "m/s"} and len(cat) == 200
    # r_max = 20 a, a = 5 kpc, in metres
    assert cat.r.max() < 20 * 5 * 3.0856775814913673e19
    assert cat.meta["sampler"] == "emcee" and cat.meta["model_units"] == {
        "mass_msun": 1e10,
        "length_kpc": 5.0,
    }


def test_cli_info_on_a_reference_npz_needs_units(tmp_path, capsys):
    path = tmp_path / "ref.npz"
    np.savez(path, pos=np.ones((5, 3)), vel=np.ones((5, 3)))
    assert cli.main(["info", str(path)]) == 2
    assert "no units" in capsys.readouterr().err
    assert cli.main(["info", str(path), "--units", "m,m/s"]) == 0
    assert "length=m, velocity=m/s" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["mock", "hernquist", "--n", "0", "--out", "x.h5"], "n = 0: expected an integer >= 1"),
        (
            ["mock", "hernquist", "--n", "10", "--noise", "-1", "--out", "x.h5"],
            "level must be a finite",
        ),
        (
            ["mock", "hernquist", "--n", "10", "--out", "x.csv"],
            "unsupported catalogue extension '.csv'",
        ),
        (["info", "does_not_exist.h5"], "does_not_exist.h5: no such catalogue file"),
    ],
)
def test_cli_bad_input_exits_2(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith(f"tfgalflow {argv[0]}: error:")
    assert not list(tmp_path.iterdir())                    # nothing written on failure
