"""The photoz task: its exact density and sampler, metrics that pass the truth and fail a wrong
model, run_task and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from tfgalflow import posterior
from tfgalflow.density import Density
from tfgalflow.errors import InputError
from tfgalflow.tasks import PhotoZConfig, get_task, run_task, task_names
from tfgalflow.training import read_history

SMALL = dict(train_galaxies=400, test_galaxies=600, calibration_galaxies=0, grid_step=0.01)


@pytest.fixture(scope="module")
def task():
    return get_task("photoz", **SMALL)


class ExactPhotoZ(Density):
    """The task's exact posterior as a Density; with ``prior_only`` the prior p(z), which ignores
    the photometry."""

    dim, label_dim = 1, 20

    def __init__(self, task, prior_only: bool = False):
        self.task, self.prior_only = task, prior_only

    def log_prob_tensor(self, x, labels=None):
        z = x.numpy().astype(np.float64)
        if self.prior_only:
            lp = self.task.sim.log_prior(z[:, 0])
        else:
            lp = self.task.log_prob(z, labels.numpy().astype(np.float64))
        return tf.constant(lp, tf.float32)

    def _traced(self):  # plain eager calls: the maths is NumPy
        return {"log_prob": self.log_prob_tensor, "grad": None, "sample": None}


def test_registered_and_config_errors():
    assert "photoz" in task_names()
    with pytest.raises(InputError, match="grid_step = 0.0"):
        PhotoZConfig(grid_step=0.0)
    with pytest.raises(InputError, match="calibration_galaxies = 50"):
        PhotoZConfig(calibration_galaxies=50)
    with pytest.raises(InputError, match="train_galaxies = 5"):
        PhotoZConfig(train_galaxies=5)


def test_exact_density_is_the_normalised_posterior(task):
    z, x = task.galaxies("test")
    labels = task.sim.features(x[:4])
    grid = task.grid()
    assert grid[0] == 0.0 and grid[-1] == 3.0 and np.allclose(np.diff(grid), 0.01)
    # at grid points: ln of the exact posterior rows
    post = task.sim.exact_posterior(x[:4], grid)
    for n in range(4):
        at = np.flatnonzero(post[n] > 1e-8)[::7]
        lp = task.log_prob(grid[at, None], np.repeat(labels[n:n + 1], at.size, axis=0))
        np.testing.assert_allclose(lp, np.log(post[n, at]), atol=1e-9)
    # between them, a normalised density: its integral on a 10x finer grid is 1 to the
    # trapezoid rule's error on the 0.01 grid, h^2 max|p''| / 12 ~ 1e-4 for widths >= 0.03
    fine = np.linspace(0.0, 3.0, 3001)
    for n in range(4):
        p = np.exp(task.log_prob(fine[:, None], np.repeat(labels[n:n + 1], fine.size, axis=0)))
        assert abs(np.trapezoid(p, fine) - 1.0) < 2e-3


def test_simulate_draws_from_the_exact_posterior(task):
    """PIT of simulate's draws under the exact posterior is uniform, and so is that of the
    simulated galaxies' own redshifts (the joint simulation and the posterior agree)."""
    z, x = task.galaxies("test")
    labels = task.sim.features(x)
    draws = task.simulate(labels, np.random.default_rng(3))[:, 0]
    post = task.sim.exact_posterior(x, task.grid())
    # KS p-values of a correct sampler are U(0, 1): a 1e-3 cut fails 1 run in 1000
    assert stats.kstest(posterior.pit(post, task.grid(), draws), "uniform").pvalue > 1e-3
    assert stats.kstest(posterior.pit(post, task.grid(), z), "uniform").pvalue > 1e-3
    x_train, c_train = task.training_data()
    assert x_train.shape == (400, 1) and c_train.shape == (400, 20)
    assert x_train.dtype == np.float32 and np.all((x_train > 0) & (x_train <= 3))


def test_metrics_pass_the_truth_and_fail_the_prior(task):
    exact = task.evaluate(ExactPhotoZ(task))
    n = exact["n_test"]
    # the exact model against itself: zero KL (float32 log p), identical MAP metrics
    assert exact["kl"]["mean"] < 1e-5 and abs(exact["kl_at_truth"]["mean"]) < 1e-5
    assert abs(exact["sigma_nmad_rel_diff"]) < 1e-6 and exact["eta_diff"] == 0.0
    # PIT and HPD of the truth: KS below its 99 % critical value 1.63/sqrt(n); coverage within
    # 3 binomial standard deviations of 0.68
    assert exact["flow"]["pit_ks"] < 1.63 / math.sqrt(n)
    assert abs(exact["flow"]["hpd68_coverage"] - 0.68) < 3 * math.sqrt(0.68 * 0.32 / n)
    assert 0.05 < exact["bimodal_fraction"] < 0.4   # break confusion (~17 % at large n)
    targets = task.targets(exact)
    assert targets["sigma_nmad"].met and targets["eta"].met and targets["bimodal_kl"].met
    assert "calibration" not in targets
    # the prior, which ignores the photometry: the grid KL and the Monte-Carlo KL at the truths
    # estimate the same E_c KL(exact || prior) (the mutual information of z and the photometry)
    prior = task.evaluate(ExactPhotoZ(task, prior_only=True))
    mc = prior["kl_at_truth"]
    assert prior["kl"]["mean"] > 1.0
    assert abs(prior["kl"]["mean"] - mc["mean"]) < 4 * mc["stderr"]
    targets = task.targets(prior)
    assert not any(targets[k].met for k in ("sigma_nmad", "eta", "hpd68", "bimodal_kl"))


def test_run_task_trains_reports_and_resumes(tmp_path):
    out = tmp_path / "pz"
    config = dict(SMALL, train_galaxies=2000, test_galaxies=200, calibration_galaxies=200,
                  grid_step=0.02)
    train = dict(epochs=2, members=1, hidden="16", bins=8, jit_compile=False, steps_per_call=1,
                 checkpoint_every=1)
    report = run_task("photoz", out, config, train, verbose=0)
    assert json.loads((out / "report.json").read_text()) == report
    assert report["targets"].keys() == {"sigma_nmad", "eta", "pit_ks", "hpd68", "bimodal_kl",
                                        "calibration"}
    cal = report["metrics"]["calibration"]
    assert cal["dof"] == 19 and len(cal["pulls"]) == 19 and 0.0 <= cal["p_value"] <= 1.0
    assert cal["chi2"] == pytest.approx(sum(p * p for p in cal["pulls"]))
    for name in ("zmap_flow.png", "zmap_exact.png", "pit.png", "posteriors.png"):
        assert (out / name).stat().st_size > 1000
    # rerun: the finished run is reused (no new epochs) and measured to the same numbers
    first = read_history(out / "run")
    again = run_task("photoz", out, config, train, verbose=0)
    np.testing.assert_array_equal(read_history(out / "run")["loss"], first["loss"])
    assert again["metrics"]["kl"] == report["metrics"]["kl"]


def test_cli_refuses_a_bad_grid(capsys):
    from tfgalflow.cli import main

    assert main(["task", "run", "photoz", "--out", "unused", "--grid-step", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "grid_step = 0.5" in err and "Traceback" not in err
