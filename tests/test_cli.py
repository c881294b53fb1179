"""The command line as a new user meets it: arguments checked before any work, plain files
readable, SavedModels usable wherever a run directory is, one-line errors with exit status 2."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tfgalflow import export as export_module
from tfgalflow.catalogue import Catalogue
from tfgalflow.cli import main
from tfgalflow.errors import InputError

SHIPPED = Path(__file__).resolve().parents[1] / "saved_models" / "hernquist_iso" / "1"


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if the command loads a model: argument errors must come first."""
    def refuse(path):
        raise AssertionError(f"the model {path} was loaded before the arguments were checked")
    monkeypatch.setattr(export_module, "load", refuse)


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err                          # one line, no traceback
    return err[0]


def test_sample_checks_n_before_loading(capsys, no_model_loading):
    assert main(["sample", str(SHIPPED), "--n", "-5", "--out", "s.npy"]) == 2
    assert "--n = -5" in _error(capsys)


def test_sample_refuses_a_missing_directory_instead_of_creating_it(
    tmp_path, capsys, no_model_loading
):
    out = tmp_path / "nonexist" / "s.npy"
    assert main(["sample", str(SHIPPED), "--n", "5", "--out", str(out)]) == 2
    assert "does not exist" in _error(capsys) and not out.parent.exists()


def test_accel_checks_the_output_type_before_computing(tmp_path, capsys, no_model_loading):
    assert main(["accel", str(SHIPPED), "--radii", "1", "--out", str(tmp_path / "a.xyz")]) == 2
    assert ".xyz" in _error(capsys)


def test_accel_xla_flag_defaults_to_the_apis_automatic_choice():
    # --xla / --no-xla force jit_compile; no flag leaves cbe.accelerations' default (None:
    # XLA for large calls only, cbe.xla_by_default)
    from tfgalflow.cli import build_parser
    parser = build_parser()
    base = ["accel", "run", "--radii", "1", "--out", "a.npz"]
    assert parser.parse_args(base).xla is None
    assert parser.parse_args(base + ["--xla"]).xla is True
    assert parser.parse_args(base + ["--no-xla"]).xla is False


@pytest.mark.parametrize("workers,out", [("2", "a.npz"), ("0", "a.h5")])
def test_accel_checks_workers_before_loading(tmp_path, capsys, no_model_loading, workers, out):
    assert main(["accel", str(SHIPPED), "--radii", "1", "--workers", workers,
                 "--out", str(tmp_path / out)]) == 2
    assert f"--workers {workers}" in _error(capsys)


def test_sample_and_logprob_accept_a_savedmodel(tmp_path, capsys):
    # The shipped model is a 6-D Hernquist flow: its samples are bound orbits, where log p is
    # finite.
    out = tmp_path / "s.npy"
    assert main(["sample", str(SHIPPED), "--n", "64", "--seed", "3", "--out", str(out)]) == 0
    x = np.load(out)
    assert x.shape == (64, 6)
    lp_file = tmp_path / "lp.npy"
    assert main(["logprob", str(SHIPPED), str(out), "--out", str(lp_file)]) == 0
    np.testing.assert_allclose(
        np.load(lp_file), np.asarray(export_module.load(SHIPPED).log_prob(x)), rtol=1e-6
    )


def test_logprob_reads_a_plain_pos_vel_npz_with_units(tmp_path, capsys):
    # The reference study's datasets are plain pos/vel arrays with no units recorded.
    rng = np.random.default_rng(0)
    pos, vel = rng.normal(size=(20, 3)), rng.normal(size=(20, 3)) * 0.2
    np.savez(tmp_path / "plain.npz", pos=pos, vel=vel)
    assert main(["logprob", str(SHIPPED), str(tmp_path / "plain.npz")]) == 2
    assert "--units" in _error(capsys)
    assert main(["logprob", str(SHIPPED), str(tmp_path / "plain.npz"), "--units", "model,model",
                 "--out", str(tmp_path / "lp.npy")]) == 0
    w = np.hstack([pos, vel]).astype(np.float32)
    want = np.asarray(export_module.load(SHIPPED).log_prob(w))
    np.testing.assert_allclose(np.load(tmp_path / "lp.npy"), want, rtol=1e-6)


def test_a_files_real_problem_is_named_before_its_missing_units(tmp_path):
    pos = np.ones((10, 3))
    pos[4, 1] = np.nan
    np.savez(tmp_path / "nan.npz", pos=pos, vel=np.ones((10, 3)))
    with pytest.raises(InputError, match="NaN"):
        Catalogue.load(tmp_path / "nan.npz")
    np.savez(tmp_path / "cols.npz", pos=np.ones((10, 2)), vel=np.ones((10, 3)))
    with pytest.raises(InputError, match="shape"):
        Catalogue.load(tmp_path / "cols.npz")


def test_a_text_file_named_npz_is_called_what_it_is(tmp_path, capsys):
    (tmp_path / "fake.npz").write_text("1 2 3\n4 5 6\n")
    assert main(["logprob", str(SHIPPED), str(tmp_path / "fake.npz")]) == 2
    message = _error(capsys)
    assert "pickled" not in message and "not" in message and "npz" in message


def test_mock_says_how_many_noisy_stars_it_dropped(tmp_path, capsys):
    out = tmp_path / "m.npz"
    assert main(["mock", "hernquist", "--n", "2000", "--seed", "1", "--r-max", "5",
                 "--noise", "0.3", "--out", str(out)]) == 0
    kept = len(Catalogue.load(out))
    line = next(t for t in capsys.readouterr().out.splitlines() if t.startswith("noise moved"))
    # 30 % multiplicative noise on r < 5 stars pushes some beyond 5: the message counts exactly
    # those.
    assert line.startswith(f"noise moved {2000 - kept} of 2000 stars") and 0 < 2000 - kept < 2000


def test_mock_dehnen_grid_writes_labels_as_columns(tmp_path, capsys):
    out = tmp_path / "grid.h5"
    assert main(["mock", "dehnen", "--gamma", "0.5,1.5", "--ra-inverse", "0,1", "--n", "300",
                 "--seed", "2", "--out", str(out)]) == 0
    cat = Catalogue.load(out)
    assert cat.label_names == ("gamma", "ra_inverse")
    nodes, counts = np.unique(cat.labels, axis=0, return_counts=True)
    np.testing.assert_array_equal(nodes, [[0.5, 0.0], [0.5, 1.0], [1.5, 0.0], [1.5, 1.0]])
    assert (counts == 300).all()
    # Each node's radii follow its own mass profile M(<r)/M = (r/(r+1))^(3-gamma): the medians
    # differ.
    r = np.linalg.norm(cat.pos, axis=1)
    for gamma in (0.5, 1.5):
        median = np.median(r[cat.labels[:, 0] == gamma])
        y = 0.5 ** (1 / (3 - gamma))                         # M(<r_half) = M/2
        # 600 stars: the median is good to ~10 %
        assert abs(median / (y / (1 - y)) - 1) < 0.2


def test_mock_dehnen_refuses_labels_with_a_negative_df(tmp_path, capsys):
    assert main(["mock", "dehnen", "--gamma", "1", "--ra-inverse", "9", "--n", "10", "--out",
                 str(tmp_path / "m.h5")]) == 2
    assert "4.94" in _error(capsys) and not (tmp_path / "m.h5").exists()


@pytest.mark.slow          # ~1 min: a training run and a potential fit (make test-slow)
def test_potential_cli_fits_and_accel_reads_the_potential(tmp_path, capsys):
    # The potential commands end to end on a tiny run: the field they write is curl-free by
    # construction, so its check here is the plumbing: columns, support and the one-line error.
    mock, run, pot, out = (tmp_path / n for n in ("m.npz", "run", "pot", "field.npz"))
    assert (
        main(
            [
                "mock",
                "hernquist",
                "--n",
                "3000",
                "--seed",
                "1",
                "--r-max",
                "50",
                "--out",
                str(mock),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                str(mock),
                "--out",
                str(run),
                "--layers",
                "2",
                "--hidden",
                "8,8",
                "--epochs",
                "1",
                "--verbose",
                "0",
                "--no-jit-compile",
                "--steps-per-call",
                "1",
            ]
        )
        == 0
    )
    assert main(["potential", str(run), "--out", str(pot), "--data", str(mock), "--epochs", "1",
                 "--points", "1000"]) == 0
    assert main(["accel", str(pot), "--radii", "0.5,1,1000", "--out", str(out)]) == 0
    field = np.load(out)
    assert {"acceleration", "potential", "density", "supported"} <= set(field.files)
    assert field["supported"].tolist() == [True, True, False]      # r = 1000a: no data there
    capsys.readouterr()
    assert main(["accel", str(pot), "--radii", "1", "--out", str(tmp_path / "a.xyz")]) == 2
    assert ".xyz" in _error(capsys)


def test_train_reads_a_plain_pos_vel_npz_with_units_and_resumes_with_it(tmp_path, capsys):
    # The reference study's datasets: plain pos/vel arrays in SI units, no units recorded.
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "plain.npz", pos=rng.normal(size=(600, 3)) * 3e19,
             vel=rng.normal(size=(600, 3)) * 1e5)
    flags = ["--layers", "1", "--hidden", "8", "--epochs", "2", "--checkpoint-every", "1",
             "--verbose", "0", "--no-jit-compile", "--steps-per-call", "1"]
    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "plain.npz"), "--out", str(run)] + flags) == 2
    assert "--units" in _error(capsys)
    assert main(["train", str(tmp_path / "plain.npz"), "--units", "m,m/s", "--out", str(run)]
                + flags) == 0
    capsys.readouterr()
    # Resuming a run trained in memory needs the same data (checked by its sha256).
    assert main(["train", "--resume", str(run)]) == 2
    assert "CATALOGUE" in _error(capsys)
    resume = ["train", "--resume", str(run), str(tmp_path / "plain.npz"), "--units", "m,m/s"]
    assert main(resume) == 0
