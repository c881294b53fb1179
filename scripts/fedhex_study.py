"""FEDHEX study (issue #13): interpolate a 10 x 10 grid of 2-D event distributions, measure at
held-out labels, beside the statistical floor of the same data.

Runs the ``gaussian_field`` task (:mod:`tfgalflow.tasks.gaussian_field`) with its default settings:
1000 events at each of the 92 training nodes (8 interior nodes held out, plus 24 random off-grid
labels), an ensemble of 3 affine MAFs (2 layers of 2 x 64 GELU each, Adam 1e-3 cosine, batch 1024,
100 epochs, all events trained on), then writes studies/gaussian_field/report.json and figures and
prints the targets. The same as

    tfgalflow task run gaussian_field --out studies/gaussian_field

followed by the floor below, which is added to report.json as "floor". Rerunning resumes an
interrupted training run or reuses the finished one.

The floor: what an ideal model of the same events achieves under the same evaluation.

* ``node_fit_thin_plate``: the exact family fitted at each training node (sample mean and the
  Cholesky factor of the sample covariance of its 1000 events; 5 numbers, log of the diagonal),
  interpolated to the held-out labels by a thin-plate spline through the 92 nodes
  (scipy.interpolate.RBFInterpolator), evaluated by ``task.evaluate`` as if it were the flow;
* ``node_fit_linear``: the same per-node fits interpolated by a linear-kernel RBF, a
  piecewise-linear-like interpolator (what ReLU conditioners do);
* ``exact_chi2_pass_fraction``: the chi^2 test's pass rate (p > 0.01) for exact vs exact events
  (2000 vs 2000, 8 x 8 cells) at the same held-out labels, over ``--null-repeats`` repetitions:
  1 - 0.01 for a calibrated test, the best any model can reach.

Usage: python scripts/fedhex_study.py [--out DIR] [--epochs E] [--seed S] [--null-repeats R]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
from scipy.interpolate import RBFInterpolator

from tfgalflow.atomic import write_json
from tfgalflow.tasks import get_task, run_task
from tfgalflow.twosample import chi2_test

SUMMARY_KEYS = (
    "kl_max",
    "kl_mean",
    "mean_offset_sigma_max",
    "cov_frobenius_rel_max",
    "chi2_pass_fraction",
)


class NodeFitInterpolator:
    """Gaussian p(x | λ) whose parameters are per-node maximum-likelihood fits interpolated in λ.

    At each training node k: μ_k = mean of its events, Σ_k = L_k L_k^T their sample covariance;
    θ_k = (μ_1, μ_2, log L_11, L_21, log L_22) is interpolated to any λ by an RBF through the nodes
    (``kernel`` of scipy.interpolate.RBFInterpolator). log_prob/sample follow the Density calls
    that ``GaussianField.evaluate`` makes.
    """

    def __init__(self, x: np.ndarray, labels: np.ndarray, nodes: np.ndarray, kernel: str):
        theta = []
        for node in nodes:
            events = x[np.all(labels == node, axis=1)].astype(np.float64)
            chol = np.linalg.cholesky(np.cov(events, rowvar=False))
            theta.append([*events.mean(axis=0), np.log(chol[0, 0]), chol[1, 0],
                          np.log(chol[1, 1])])
        self.interpolate = RBFInterpolator(nodes.astype(np.float64), np.array(theta),
                                           kernel=kernel)

    def _mean_chol(self, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        theta = self.interpolate(np.asarray(lam, np.float64).reshape(-1, 2))
        chol = np.zeros((len(theta), 2, 2))
        chol[:, 0, 0], chol[:, 1, 0], chol[:, 1, 1] = (
            np.exp(theta[:, 2]), theta[:, 3], np.exp(theta[:, 4]))
        return theta[:, :2], chol

    def log_prob(self, x: np.ndarray, labels: np.ndarray) -> tf.Tensor:
        """log N(x; μ(λ), L L^T) [N] for x, labels [N, 2]."""
        mu, chol = self._mean_chol(labels)
        u = np.linalg.solve(chol, (np.asarray(x, np.float64) - mu)[..., None])[..., 0]
        return tf.constant(-0.5 * (u**2).sum(-1) - np.log(2 * np.pi * chol[:, 0, 0]
                                                          * chol[:, 1, 1]))

    def sample(self, n: int, label: np.ndarray, seed: int) -> tf.Tensor:
        """n draws [n, 2] at one label [2]."""
        mu, chol = self._mean_chol(label)
        z = np.random.default_rng(seed).standard_normal((n, 2))
        return tf.constant(mu[0] + z @ chol[0].T)


def floor(seed: int, null_repeats: int) -> dict:
    """The reference interpolators' summaries and targets, and the exact-vs-exact chi^2 rate."""
    task = get_task("gaussian_field", seed=seed)
    x, labels = task.training_data()                    # float32, as the flow sees them
    nodes = task.training_labels().astype(np.float32)
    out: dict = {}
    for name, kernel in (("node_fit_thin_plate", "thin_plate_spline"),
                         ("node_fit_linear", "linear")):
        metrics = task.evaluate(NodeFitInterpolator(x, labels, nodes, kernel))
        out[name] = {
            "summary": {g: {k: s[k] for k in SUMMARY_KEYS} for g, s in
                        metrics["summary"].items()},
            "targets": {k: t.to_dict() for k, t in task.targets(metrics).items()},
        }
    rng = np.random.default_rng([seed, 99])
    heldout = np.concatenate(list(task.heldout_labels().values()))
    n = task.config.test_events
    p = [chi2_test(task.simulate(np.tile(lam, (n, 1)), rng),
                   task.simulate(np.tile(lam, (n, 1)), rng), bins=8).p_value
         for _ in range(null_repeats) for lam in heldout]
    out["exact_chi2_pass_fraction"] = float(np.mean(np.array(p) > 0.01))
    out["exact_chi2_tests"] = len(p)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="studies/gaussian_field")
    parser.add_argument("--epochs", type=int, default=None, help="override the task's epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--null-repeats", type=int, default=20,
                        help="repetitions of the exact-vs-exact chi2 test per held-out label")
    args = parser.parse_args()
    train = {} if args.epochs is None else {"epochs": args.epochs}
    start = time.perf_counter()
    report = run_task(
        "gaussian_field", args.out, overrides={"seed": args.seed}, train_overrides=train, verbose=2
    )
    print(f"task run took {time.perf_counter() - start:.0f} s")
    report["floor"] = floor(args.seed, args.null_repeats)
    write_json(Path(args.out) / "report.json", report)
    ideal = report["floor"]["node_fit_thin_plate"]["targets"]
    linear = report["floor"]["node_fit_linear"]["targets"]
    print(f"{'target':12s} {'flow':>9s} {'floor':>9s} {'linear':>9s}  threshold")
    for name, t in report["targets"].items():
        print(
            f"{name:12s} {t['measured']:9.4g} {ideal[name]['measured']:9.4g} "
            f"{linear[name]['measured']:9.4g}  {t['relation']} {t['threshold']:g}: "
            f"{'met' if t['met'] else 'NOT met'}  ({t['description']})"
        )
    print(f"exact vs exact chi2 pass fraction {report['floor']['exact_chi2_pass_fraction']:.4f} "
          f"({report['floor']['exact_chi2_tests']} tests)")
    for group, s in report["metrics"]["summary"].items():
        print(group, json.dumps({k: round(s[k], 4) for k in SUMMARY_KEYS}))


if __name__ == "__main__":
    main()
