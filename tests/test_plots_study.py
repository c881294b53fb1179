"""Figure data round trip, the figures' content, and the study's geometry helpers, against
hand-computed values."""
import json

import numpy as np
import pytest

from tfgalflow import plots
from tfgalflow.errors import FileError, InputError
from tfgalflow.hernquist import Hernquist
from tfgalflow.mocks import sample_hernquist
from tfgalflow.cbe import radial_component
from tfgalflow.study import (DF_SLICE_VELOCITY, StudyConfig, evaluation_positions, format_table,
                             fractional_error, mock_figure_data)


def test_radial_component_and_fractional_error_of_exact_hernquist():
    h = Hernquist()
    pos = evaluation_positions(StudyConfig.demo())
    r = np.linalg.norm(pos, axis=1)
    # a_r = a . x/|x| = -G M / (r + a)^2 exactly for Hernquist: negative, the force attracts
    np.testing.assert_allclose(radial_component(pos, h.acceleration(pos)), -1.0 / (1.0 + r) ** 2,
                               rtol=1e-12)
    a = h.acceleration(pos)
    np.testing.assert_allclose(fractional_error(1.1 * a, a), 0.1, rtol=1e-12)
    np.testing.assert_allclose(np.geomspace(0.2, 5.0, 8), r, rtol=1e-12)
    # no radial direction at the origin; a flagged (NaN) acceleration stays NaN
    a_r = radial_component([[0.0, 0.0, 0.0], [0.0, 2.0, 0.0]],
                           [[1.0, 0.0, 0.0], [np.nan, 0.0, 0.0]])
    assert np.all(np.isnan(a_r))
    with pytest.raises(InputError, match="acceleration has shape"):
        radial_component(pos, h.acceleration(pos)[:, :2])


def test_with_overrides_is_the_one_override_path_of_demo_and_script():
    demo = StudyConfig.demo()
    assert demo.with_overrides() == demo                       # None leaves every setting as it is
    new = demo.with_overrides(mocks=["aniso"], n_stars=4000, members=2, epochs=3, seed=7,
                              rotations=0)
    assert (new.mocks, new.n_stars, new.seed, new.rotations) == (("aniso",), 4000, 7, 0)
    assert (new.train["members"], new.train["epochs"]) == (2, 3)
    assert {k: v for k, v in new.train.items() if k not in ("members", "epochs")} == \
        {k: v for k, v in demo.train.items() if k not in ("members", "epochs")}
    assert demo.train["epochs"] == 40                          # the original is untouched
    with pytest.raises(InputError, match="unknown mock"):
        demo.with_overrides(mocks=["nope"])


def test_mock_figure_data_matches_jeans_and_renders(tmp_path):
    cat = sample_hernquist(50_000, kind="aniso", seed=3, r_max=50.0)
    data = mock_figure_data(cat, Hernquist(), "aniso", n_bins=6)
    # dispersions within 5 standard errors of the Jeans profiles (sigma/sqrt(2n), n ~ 8000 per bin)
    assert np.all(np.abs(data["sigma_r"] - data["sigma_r_model"]) < 5 * data["sigma_r_err"])
    assert np.all(np.abs(data["sigma_t"] - data["sigma_t_model"]) < 5 * data["sigma_t_err"])
    path = plots.save_figure_data(tmp_path / "mock.npz", "mock", **data)
    back = plots.load_figure_data(path)
    np.testing.assert_array_equal(back["sigma_r"], data["sigma_r"])
    png = plots.render(path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _tick_labels(ax, axis: str = "x") -> list[str]:
    """The major tick labels a reader sees (drawn, inside the axis limits)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(ax.figure).draw()
    lo, hi = sorted(getattr(ax, f"get_{axis}lim")())
    ticks = getattr(ax, f"get_{axis}ticks")()
    texts = [t.get_text() for t in getattr(ax, f"get_{axis}ticklabels")()]
    return [text for tick, text in zip(ticks, texts) if lo <= tick <= hi and text]


def _acceleration_data(spread: float = 0.0) -> dict:
    """Figure data of one 'flow' with a 10 % tangential error: the radial component is exact, so a
    figure plotting the radial error would show 0 where the vector error is 0.1."""
    h = Hernquist()
    pos = evaluation_positions(StudyConfig.demo())                     # radii 0.2 .. 5
    truth = h.acceleration(pos)
    tangent = np.cross(pos, [0.0, 0.0, 1.0])
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    learned = truth + 0.1 * np.linalg.norm(truth, axis=1, keepdims=True) * tangent
    return {"labels": np.array(["iso"]), "r": np.linalg.norm(pos, axis=1),
            "a_r_true": radial_component(pos, truth),
            "a_r_learned": radial_component(pos, learned)[None],
            "a_spread": np.full((1, len(pos)), spread),
            "error_learned": fractional_error(learned, truth)[None],
            "a_r_exact_df": radial_component(pos, truth),
            "error_exact_df": np.full(len(pos), 1e-7)}


def test_accelerations_figure_plots_the_vector_error_with_readable_ticks(tmp_path):
    data = _acceleration_data()
    np.testing.assert_allclose(data["a_r_learned"][0], data["a_r_true"], rtol=1e-12)  # a_r exact
    np.testing.assert_allclose(data["error_learned"], 0.1, rtol=1e-12)              # vector: 10 %
    fig = plots.figure(plots.load_figure_data(
        plots.save_figure_data(tmp_path / "accelerations.npz", "accelerations", **data)))
    ax_a, ax_e = fig.axes
    (line,) = [ln for ln in ax_e.get_lines() if ln.get_label() == "iso"]
    np.testing.assert_allclose(line.get_ydata(), 0.1, rtol=1e-12)
    assert "|" in ax_e.get_ylabel() and "true" in ax_e.get_ylabel()
    # the left panel shows -a_r = G M / (r + a)^2 > 0 (log axis)
    (exact,) = [ln for ln in ax_a.get_lines() if ln.get_label() == "exact Hernquist"]
    np.testing.assert_allclose(exact.get_ydata(), 1 / (1 + exact.get_xdata()) ** 2, rtol=1e-12)
    for ax in (ax_a, ax_e):
        assert {"0.2", "0.5", "1", "2", "5"} <= set(_tick_labels(ax, "x"))
    assert any(text.get_text() == "1 %" for text in ax_e.texts)   # the grey line says what it is


def test_accelerations_legend_has_error_bars_only_when_they_are_nonzero(tmp_path):
    from matplotlib.container import ErrorbarContainer

    kind = {"figure": np.array("accelerations")}
    single = plots.figure({**kind, **_acceleration_data(spread=0.0)})
    handles, labels = single.axes[0].get_legend_handles_labels()
    assert "iso" in labels and not any(isinstance(h, ErrorbarContainer) for h in handles)
    ensemble = plots.figure({**kind, **_acceleration_data(spread=0.01)})
    handles, labels = ensemble.axes[0].get_legend_handles_labels()
    assert [lab for h, lab in zip(handles, labels) if isinstance(h, ErrorbarContainer)] == \
        ["iso (bars: member spread)"]


def test_df_slices_figure_names_its_slice(tmp_path):
    r = np.geomspace(0.05, 20.0, 10)
    path = plots.save_figure_data(tmp_path / "df_slices.npz", "df_slices",
                                  labels=np.array(["iso"]), r=r, x_hat=np.array([1.0, 0.0, 0.0]),
                                  v=np.array(DF_SLICE_VELOCITY), logf_exact=-r[None],
                                  logf_learned=-r[None])
    fig = plots.figure(plots.load_figure_data(path))
    title = fig.get_suptitle()
    # 0.2 / sqrt(2) = 0.1414 to three digits
    assert "x = r (1, 0, 0)" in title and "v = (0, 0.141, 0.141)" in title
    assert {"0.1", "1", "10"} <= set(_tick_labels(fig.axes[0], "x"))
    assert plots.render(path).read_bytes()[:4] == b"\x89PNG"


def test_figure_data_errors(tmp_path):
    with pytest.raises(InputError, match="missing"):
        plots.save_figure_data(tmp_path / "a.npz", "accelerations", r=np.ones(3))
    with pytest.raises(InputError, match="unknown figure"):
        plots.save_figure_data(tmp_path / "a.npz", "nope")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(FileError, match="bad.npz"):
        plots.load_figure_data(tmp_path / "bad.npz")
    # figure data of the old layout (radial magnitudes only, no vector errors) is refused by name
    np.savez(tmp_path / "old.npz", figure=np.array("accelerations"), labels=np.array(["iso"]),
             r=np.ones(2), a_true=np.ones(2), a_learned=np.ones((1, 2)), a_spread=np.zeros((1, 2)),
             a_exact_df=np.ones(2))
    with pytest.raises(FileError, match="old.npz.*error_learned"):
        plots.load_figure_data(tmp_path / "old.npz")


@pytest.mark.slow   # trains or spawns processes: make test-slow (default suite < 10 min)
def test_demo_cli_runs_the_chain_twice_into_one_folder(tmp_path):
    """The main job end to end at a tiny size; rerunning into the same folder must work (make demo
    twice). The figure, the printed table and summary.json show the same error at every radius."""
    from tfgalflow.cli import main

    for _ in range(2):
        assert main(["demo", "--out", str(tmp_path / "demo"), "--n", "4000", "--epochs", "2"]) == 0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    rows = summary["mocks"]["iso"]["per_radius"]
    # the true column is the analytic Hernquist a_r = -1/(1+r)^2 (model units; < 0: attraction)
    np.testing.assert_allclose([r["a_r_true"] for r in rows],
                               [-1 / (1 + r["r"]) ** 2 for r in rows], rtol=1e-6)
    # the exact-DF control isolates the method: near machine precision (measured ~1e-7)
    assert summary["mocks"]["iso"]["median_fractional_error_exact_df"] < 1e-4
    assert all(np.isfinite(r["a_r_learned"]) for r in rows)
    for png in ("accelerations.png", "df_slices.png", "mock_iso.png"):
        assert (tmp_path / "demo" / png).read_bytes()[:4] == b"\x89PNG"

    data = plots.load_figure_data(tmp_path / "demo" / "accelerations.npz")
    fig = plots.figure(data)
    (flow,) = [ln for ln in fig.axes[1].get_lines() if ln.get_label() == "iso"]
    (averaged,) = [ln for ln in fig.axes[1].get_lines()
                   if ln.get_label() == "iso, spherical average"]
    table = format_table(summary).splitlines()
    for row in rows:
        at = np.isclose(flow.get_xdata(), row["r"], rtol=1e-12)
        assert at.sum() == 1
        # same float64 number in the figure and in summary.json (JSON round-trips floats exactly)
        assert flow.get_ydata()[at][0] == row["fractional_error"]
        assert averaged.get_ydata()[at][0] == row["fractional_error_symmetrised"]
        (line,) = [t for t in table if t.strip().startswith(f"{row['r']:.3f} ")]
        assert f"{row['fractional_error']:.2%}" in line.split()
        assert f"{row['fractional_error_symmetrised']:.2%}" in line.split()
    slices = plots.figure(plots.load_figure_data(tmp_path / "demo" / "df_slices.npz"))
    assert "v = (0, 0.141, 0.141)" in slices.get_suptitle()


@pytest.mark.slow          # a whole (small) study: trains and resumes its runs (~15 s)
def test_study_resumes_its_runs_and_reports_the_spherical_average(tmp_path):
    """A study re-run into its own folder loads the finished run instead of failing or retraining,
    and with rotations > 0 it also reports the CBE error of the rotation-averaged learned DF."""
    from tfgalflow.cbe import accelerations
    from tfgalflow.study import run_study
    from tfgalflow.symmetry import SphericalAverage
    from tfgalflow.training import load_run

    config = StudyConfig(mocks=("iso",), n_stars=3000, n_radii=4, n_velocities=32, rotations=4,
                         r_min=0.5, r_max=2.0, summary_range=(0.5, 2.0),
                         train={"layers": 1, "hidden": [8], "epochs": 2, "batch_size": 512,
                                "members": 1})
    first = run_study(config, tmp_path, log=lambda s: None, verbose=0)
    mtime = (tmp_path / "runs" / "iso" / "config.json").stat().st_mtime_ns
    second = run_study(config, tmp_path, log=lambda s: None, verbose=0)
    assert (tmp_path / "runs" / "iso" / "config.json").stat().st_mtime_ns == mtime  # not retrained
    assert first == second
    iso = second["mocks"]["iso"]
    positions = evaluation_positions(config)
    truth = Hernquist().acceleration(positions)
    sym = accelerations(SphericalAverage(load_run(tmp_path / "runs" / "iso"), 4, seed=0),
                        positions, n_velocities=32, seed=0)
    r = np.linalg.norm(positions, axis=1)
    in_range = (r >= 0.5) & (r <= 2.0)      # end radii may round to just outside, as in the study
    err_sym = fractional_error(sym.acceleration, truth)
    assert iso["median_fractional_error_symmetrised"] == pytest.approx(
        float(np.median(err_sym[in_range])), rel=1e-12)
    assert iso["median_fractional_error_symmetrised"] != iso["median_fractional_error"]
    with np.load(tmp_path / "accelerations.npz") as data:
        assert data["a_r_symmetrised"].shape == (1, 4)
        np.testing.assert_allclose(data["error_symmetrised"][0], err_sym, rtol=1e-12)
