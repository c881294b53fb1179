"""The ``galaxy_population`` task: star catalogues conditioned on galaxy properties (issue #16).

The GalacticFlow/GalacticForge use: learn p(star | galaxy) from many galaxies and sample stars of
galaxies never seen. Here the galaxies are the toy population of :mod:`tfgalflow.galaxies`
(exponential disc + Hernquist bulge, rotation curve + dispersions, age-metallicity relation with
a radial gradient): 8-D stars (x, y, z [kpc], v [km/s], [Fe/H], age [Gyr]) with an exact density.

Protocol (as the reference pipeline keeps its data): ``galaxies`` galaxies with θ from the
priors and labels (θ plus, with ``noise_labels``, 4 noisy projections and 4 pure-noise "image
latents"); about ``stars_per_galaxy`` x (M*/10^10.25)^0.4 stars each, one ``.npy`` per galaxy
and a ``galaxies.csv`` in ``data_dir``; cleaning by :func:`tfgalflow.galaxies.load_population`
(``radius_percentile``, ``min_stars``, recorded in task.json and in the report). ``heldout``
galaxies (drawn from the seed) are never trained on. Per held-out galaxy:

* per-star log-density error Δ = log q - log p_exact on its own cleaned stars (p_exact truncated
  at the galaxy's cut radius r_c): mean |Δ| (target <= 0.2 nat), and the KL estimate mean(-Δ);
* the classifier two-sample AUC (:func:`tfgalflow.twosample.classifier_test`) of ``test_events``
  flow draws against as many fresh exact stars, both cut at r_c (target < 0.6);
* physical summaries (:func:`galaxy_summaries`): half-mass radius, σ_v, metallicity gradient
  (each within 5 %), and the rotation curve (for information), of the flow against the truth,
  measured two ways. *Paired* (the targets): the flow's summary is the summary of
  ``truth_samples`` exact stars (cut at r_c) reweighted by q/p (:func:`paired_relative_errors`),
  so the flow and the truth are measured on the same stars and the sampling noise of the
  summaries cancels in their ratio. *Sampled*: ``flow_samples`` flow draws against the exact
  stars, which also checks that the flow's sampler agrees with its density. Both come with
  standard errors (:func:`summary_errors`, batch means). A shallow gradient needs this: at
  -0.004 dex/kpc the slope of 10^5 exact stars alone scatters by ~7 %, more than the target.

The noise-label ablation is two runs (``noise_labels`` true/false):
scripts/galaxy_population_study.py.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from .. import galaxies as gal
from ..errors import InputError
from .base import Target, Task, TaskConfig, option, register

N_PROJECTIONS = 4
N_NOISE = 4
#: rotation-curve bins in units of R_d
ROTATION_BINS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
#: the metallicity gradient is fitted over 0.5 R_d < R < 3 R_d (disc-dominated)
GRADIENT_RANGE = (0.5, 3.0)


@dataclass(frozen=True)
class GalaxyPopulationConfig(TaskConfig):
    """Sizes, cleaning and held-out protocol of the galaxy_population task."""

    galaxies: int = option(60, "galaxies in the population (training + held out)", "int")
    heldout: int = option(5, "galaxies held out entirely (evaluated)", "int")
    stars_per_galaxy: int = option(
        20000, "stars of a log M* = 10.25 galaxy (n scales as M*^0.4)", "int"
    )
    noise_labels: bool = option(
        True, "add the 4 noisy-projection and 4 pure-noise latent label columns", "bool"
    )
    radius_percentile: float = option(99.5, "cleaning: keep stars below this percentile of r",
                                      "float")
    min_stars: int = option(500, "cleaning: drop galaxies with fewer stars", "int")
    data_dir: str = option("", "where the .npy files and galaxies.csv go ('' = a temporary "
                           "directory, removed after loading)", "str")
    flow_samples: int = option(100000, "flow draws per held-out galaxy for the sampled summaries",
                               "int", evaluation_only=True)
    truth_samples: int = option(400000, "exact stars per held-out galaxy for the true and the "
                                "paired (reweighted) summaries", "int", evaluation_only=True)
    test_events: int = option(5000, "flow and exact stars per held-out galaxy in the classifier "
                              "test", "int", evaluation_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, low in (("galaxies", 3), ("heldout", 1), ("stars_per_galaxy", 10),
                          ("min_stars", 0), ("flow_samples", 100), ("truth_samples", 100),
                          ("test_events", 20)):
            if getattr(self, name) < low:
                raise InputError(f"GalaxyPopulationConfig.{name} = {getattr(self, name)}: "
                                 f"expected an integer >= {low}")
        if self.heldout >= self.galaxies:
            raise InputError(f"GalaxyPopulationConfig.heldout = {self.heldout}: expected fewer "
                             f"than galaxies = {self.galaxies}")
        if not 50.0 <= self.radius_percentile <= 100.0:
            raise InputError(f"GalaxyPopulationConfig.radius_percentile = "
                             f"{self.radius_percentile}: expected a number in [50, 100]")


def galaxy_summaries(stars: np.ndarray, r_disc: float,
                     weights: np.ndarray | None = None) -> dict:
    """Physical summaries of stars [n, 8] of one galaxy (disc scale length ``r_disc`` [kpc]).

    half_mass_radius: median 3-D radius [kpc]; sigma_v: the line-of-sight (v_z, face-on)
    velocity dispersion [km/s]; feh_gradient: OLS slope d[Fe/H]/dR over 0.5 R_d < R < 3 R_d
    [dex/kpc]; rotation_curve: mean v_φ in the R bins ``ROTATION_BINS`` x R_d [km/s].

    With ``weights`` [n] (importance weights w_i ∝ q(w_i)/p(w_i) of stars drawn from p) the
    same summaries of the reweighted distribution q: weighted median, weighted standard
    deviation, weighted least squares and weighted bin means (Owen 2013, "Monte Carlo theory,
    methods and examples", ch. 9: self-normalised importance sampling).
    """
    w = np.asarray(stars, np.float64)
    wt = np.ones(len(w)) if weights is None else np.asarray(weights, np.float64)
    r_cyl = np.hypot(w[:, 0], w[:, 1])
    phi = np.arctan2(w[:, 1], w[:, 0])
    v_phi = -w[:, 3] * np.sin(phi) + w[:, 4] * np.cos(phi)
    inside = (r_cyl > GRADIENT_RANGE[0] * r_disc) & (r_cyl < GRADIENT_RANGE[1] * r_disc)
    slope = (_weighted_slope(r_cyl[inside], w[inside, 6], wt[inside]) if inside.sum() > 2
             else math.nan)
    edges = np.asarray(ROTATION_BINS) * r_disc
    which = np.digitize(r_cyl, edges) - 1
    curve = [float(np.average(v_phi[which == k], weights=wt[which == k]))
             if np.any(which == k) else math.nan for k in range(len(edges) - 1)]
    v_z = w[:, 5]
    return {
        "half_mass_radius": _weighted_median(np.linalg.norm(w[:, :3], axis=1), wt),
        "sigma_v": float(np.sqrt(np.average((v_z - np.average(v_z, weights=wt)) ** 2,
                                            weights=wt))),
        "feh_gradient": slope,
        "rotation_curve": curve,
    }


def _weighted_slope(x: np.ndarray, y: np.ndarray, wt: np.ndarray) -> float:
    """Weighted least-squares slope Σw(x - x̄)(y - ȳ) / Σw(x - x̄)² (x̄, ȳ weighted means)."""
    dx = x - np.average(x, weights=wt)
    return float(np.sum(wt * dx * (y - np.average(y, weights=wt))) / np.sum(wt * dx**2))


def _weighted_median(x: np.ndarray, wt: np.ndarray) -> float:
    """The weighted median (the 50 % point of the weighted empirical CDF, interpolated)."""
    order = np.argsort(x)
    cdf = np.cumsum(wt[order])
    cdf = (cdf - 0.5 * wt[order]) / cdf[-1]
    return float(np.interp(0.5, cdf, x[order]))


#: the summaries with a relative-error target
SUMMARY_KEYS = ("half_mass_radius", "sigma_v", "feh_gradient")


def summary_errors(stars: np.ndarray, r_disc: float, weights: np.ndarray | None = None,
                   batches: int = 20) -> dict:
    """Standard errors of :func:`galaxy_summaries` (``SUMMARY_KEYS``) by batch means.

    The n i.i.d. stars are split into ``batches`` equal parts; each part's summary S_b has
    variance ≈ B σ²/n, so se(S) ≈ std_b(S_b) / √B (Flegal & Jones 2010, Ann. Stat. 38, 1034).
    With ``weights``, the standard error of the summary of the reweighted distribution.
    """
    wt = np.ones(len(stars)) if weights is None else np.asarray(weights, np.float64)
    return _batch_means_stderr(len(stars), batches,
                               lambda i: galaxy_summaries(stars[i], r_disc, wt[i]))


def _batch_means_stderr(n: int, batches: int, statistic: Any) -> dict:
    """std_b(S_b) / √B for each ``SUMMARY_KEYS`` entry of ``statistic(rows of batch b)``."""
    values = [statistic(i) for i in np.array_split(np.arange(n), batches)]
    return {key: float(np.std([v[key] for v in values], ddof=1) / math.sqrt(batches))
            for key in SUMMARY_KEYS}


class Paired(NamedTuple):
    """:func:`paired_relative_errors`: signed relative errors S_q / S_p - 1 and their standard
    errors (``SUMMARY_KEYS``), the summaries S_q (weighted) and S_p (plain, all keys of
    :func:`galaxy_summaries`), and the Kish effective sample size of the weights over n.
    """

    relative_error: dict
    stderr: dict
    summaries: dict
    reference: dict
    ess_fraction: float


def paired_relative_errors(stars: np.ndarray, log_ratio: np.ndarray, r_disc: float,
                           batches: int = 20) -> Paired:
    """Relative errors S_q / S_p - 1 of the model q's summaries on exact stars of p (paired).

    stars [n, 8]: exact draws of p; log_ratio [n] = log q - log p at them. S_q is the summary of
    the stars weighted by w = q/p (self-normalised importance sampling), S_p the unweighted one:
    both use the same stars, so their sampling noise largely cancels in the ratio (the noise
    left scales with the spread of w, i.e. of log q - log p). The standard error is by batch
    means over the ratio of each batch's two summaries. InputError if any log_ratio is not
    finite.
    """
    log_ratio = np.asarray(log_ratio, np.float64)
    if not np.all(np.isfinite(log_ratio)):
        raise InputError(f"{int(np.sum(~np.isfinite(log_ratio)))} non-finite model "
                         f"log-densities (log q - log p) at exact stars")
    weights = np.exp(log_ratio - np.max(log_ratio))
    s_q = galaxy_summaries(stars, r_disc, weights)
    s_p = galaxy_summaries(stars, r_disc)

    def batch_ratio(i: np.ndarray) -> dict:
        q_b, p_b = galaxy_summaries(stars[i], r_disc, weights[i]), galaxy_summaries(stars[i],
                                                                                      r_disc)
        return {key: q_b[key] / p_b[key] for key in SUMMARY_KEYS}

    return Paired(relative_error={key: s_q[key] / s_p[key] - 1.0 for key in SUMMARY_KEYS},
                  stderr=_batch_means_stderr(len(stars), batches, batch_ratio),
                  summaries=s_q, reference=s_p,
                  ess_fraction=float(weights.sum() ** 2 / np.sum(weights**2) / len(weights)))


@register
class GalaxyPopulation(Task):
    """Stars of toy galaxies conditioned on galaxy properties; 5 galaxies held out."""

    name = "galaxy_population"
    description = (
        "8-D stars (x, v, [Fe/H], age) of toy disc + bulge galaxies conditioned on their "
        "properties (+ noise latents); held out: whole galaxies"
    )
    config_type = GalaxyPopulationConfig
    dim = gal.DIM
    label_dim = len(gal.PARAM_NAMES) + N_PROJECTIONS + N_NOISE
    label_names = ()

    def __init__(self, config: Any = None):
        super().__init__(config)
        cfg = self.config
        rng = self.rng("heldout_labels")
        self.params = gal.draw_parameters(cfg.galaxies, rng)
        labels, names = gal.draw_labels(self.params, rng, N_PROJECTIONS, N_NOISE)
        self.heldout_ids = np.sort(rng.choice(cfg.galaxies, cfg.heldout, replace=False))
        if not cfg.noise_labels:
            labels, names = labels[:, :len(gal.PARAM_NAMES)], names[:len(gal.PARAM_NAMES)]
        self.all_labels = labels
        self.label_names = names
        self.label_dim = len(names)
        m_scale = 10.0 ** (0.4 * (self.params[:, 0] - 10.25))
        self.n_stars = np.maximum(1, np.round(cfg.stars_per_galaxy * m_scale)).astype(int)
        self._population: gal.Population | None = None

    # -- data -------------------------------------------------------------------------------------
    def population(self) -> gal.Population:
        """The cleaned population: written to ``data_dir`` (if not there yet) and loaded."""
        if self._population is None:
            cfg = self.config
            temporary = not cfg.data_dir
            directory = Path(tempfile.mkdtemp() if temporary else cfg.data_dir)
            try:
                if not (directory / gal.TABLE_FILE).is_file():
                    gal.write_population(directory, self.all_labels, self.label_names,
                                         self.n_stars, self.rng("train_events"))
                self._population = gal.load_population(directory, cfg.radius_percentile,
                                                       cfg.min_stars)
            finally:
                if temporary:
                    shutil.rmtree(directory, ignore_errors=True)
        return self._population

    def training_ids(self) -> np.ndarray:
        """Ids of the cleaned galaxies trained on (all but the held-out ones)."""
        return np.array([i for i in self.population().ids if i not in self.heldout_ids])

    def training_data(self) -> tuple[np.ndarray, np.ndarray]:
        """(stars [N, 8] float32, labels [N, C] float32) of the cleaned training galaxies, rows
        shuffled (from the seed) so that the validation split holds stars of every galaxy.
        """
        x, labels = self.population().events(self.training_ids())
        order = np.random.default_rng([self.config.seed, 17]).permutation(len(x))
        return x[order].astype(np.float32), labels[order].astype(np.float32)

    def simulate(self, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One exact star per label row (uncut; extra label columns ignored): [N, 8]."""
        return gal.sample(labels, rng)

    def log_prob(self, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Exact log p(star | θ) [N] before cleaning (:func:`tfgalflow.galaxies.log_prob`)."""
        return gal.log_prob(x, labels)

    def training_labels(self) -> np.ndarray:
        """Labels [G_train, C] of the training galaxies."""
        pop = self.population()
        return pop.labels[[pop.index(i) for i in self.training_ids()]]

    def heldout_labels(self) -> dict[str, np.ndarray]:
        """{'heldout_galaxies': [K, C]}: the labels of the held-out galaxies."""
        return {"heldout_galaxies": self.all_labels[self.heldout_ids]}

    def train_config(self) -> Any:
        """The galaxies are axisymmetric: the flow learns each star's (R, z, v_R, v_φ, v_z, [Fe/H],
        age) (``coordinates = 'cylindrical'``, log R and log age) and the model is the
        :class:`~tfgalflow.axisymmetric_df.AxisymmetricDF` of it; an ensemble of 4 affine MAFs,
        8 layers of 2 x 128 tanh (smooth in the labels: ReLU and GELU conditioners interpolated
        worse between the training galaxies, and the members' errors between them average out:
        scripts/galaxy_population_study.py), Adam 1e-3 cosine with gradients clipped to a
        global norm of 10 (without it, first-epoch blow-ups left some members tens of nats per
        star behind, most often with the latent label columns). With the latent columns
        (``noise_labels``) the group lasso on each label column's weights is on
        (``label_lasso = 0.03``): without it the flow identifies each of the few training galaxies
        by its latents and its held-out error grew several-fold; 0.1 drops them as well but costs
        the physical labels' fidelity (half-mass radius, [Fe/H] gradient), and with the physical
        labels alone it is off (README, "Star catalogues ...").
        """
        from ..training import TrainConfig

        return TrainConfig(layers=8, hidden=(128, 128), activation="tanh", kind="affine",
                           coordinates="cylindrical", log_columns=(7,), members=4, epochs=30,
                           batch_size=2048, lr=1e-3, lr_schedule="cosine", clip_norm=10.0,
                           validation_split=0.05, patience=0, checkpoint_every=5,
                           label_lasso=0.03 if self.config.noise_labels else 0.0)

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self, model: Any) -> dict:
        """Per held-out galaxy: log-density error, classifier AUC, physical summaries."""
        from ..twosample import classifier_test

        cfg = self.config
        pop = self.population()
        rng = self.rng("evaluation")
        rows = []
        for gid in self.heldout_ids:
            if gid not in pop.ids:
                rows.append({"galaxy": int(gid), "dropped_by_cleaning": True})
                continue
            k = pop.index(gid)
            stars, lab, r_c = pop.stars[k], pop.labels[k], float(pop.r_cut[k])
            theta = self.params[gid]
            exact = gal.log_prob(stars, np.tile(theta, (len(stars), 1)), r_cut=r_c)
            flow = self.model_log_prob(model, stars, lab)
            delta = flow - exact
            draws = self.flow_stars(model, lab, cfg.flow_samples, r_c, rng)
            truth = self.exact_stars(theta, cfg.truth_samples, r_c, rng)
            if len(draws) < 20:
                rows.append({"galaxy": int(gid), "failed": f"{len(draws)} finite flow draws "
                             f"inside r_c", "logp_abs_error": float(np.mean(np.abs(delta)))})
                continue
            mean, std = truth.mean(axis=0), truth.std(axis=0)
            auc = classifier_test((draws[: cfg.test_events] - mean) / std,
                                  (truth[: cfg.test_events] - mean) / std,
                                  seed=int(rng.integers(2**31)))
            log_ratio = (self.model_log_prob(model, truth, lab)
                         - gal.log_prob(truth, np.tile(theta, (len(truth), 1)), r_cut=r_c))
            try:
                paired = paired_relative_errors(truth, log_ratio, theta[1])
            except InputError as exc:
                rows.append({"galaxy": int(gid), "failed": str(exc),
                             "logp_abs_error": float(np.mean(np.abs(delta)))})
                continue
            signed, rel_se, s_true = paired.relative_error, paired.stderr, paired.reference
            s_flow = galaxy_summaries(draws, theta[1])
            se_flow = summary_errors(draws, theta[1])
            se_true = summary_errors(truth, theta[1])
            sampled = {key: s_flow[key] / s_true[key] - 1.0 for key in SUMMARY_KEYS}
            sampled_se = {key: abs(s_flow[key] / s_true[key]) * math.hypot(
                se_flow[key] / s_flow[key], se_true[key] / s_true[key]) for key in SUMMARY_KEYS}
            curve_f, curve_t = np.array(s_flow["rotation_curve"]), np.array(
                s_true["rotation_curve"])
            rows.append({
                "galaxy": int(gid),
                "params": dict(zip(gal.PARAM_NAMES, theta)),
                "outside_training_range": outside_training_range(model, lab, self.label_names),
                "n_stars": len(stars),
                "r_cut": r_c,
                "logp_abs_error": float(np.mean(np.abs(delta))),
                "logp_mean_error": float(np.mean(delta)),
                "logp_error_std": float(np.std(delta)),
                "kl": float(-np.mean(delta)),
                "kl_stderr": float(np.std(delta) / math.sqrt(len(delta))),
                "classifier": auc.to_dict(),
                "auc": float(auc.statistic),
                "flow_summaries": s_flow,
                "flow_summaries_weighted": paired.summaries,
                "true_summaries": s_true,
                "true_summaries_stderr": se_true,
                "relative_error": {key: abs(v) for key, v in signed.items()},
                "relative_error_stderr": rel_se,
                "relative_error_signed": signed,
                # S_q - S_p in each summary's unit (kpc, km/s, dex/kpc): a relative error of a
                # near-zero summary (a gradient diluted by a large bulge) says little alone
                "absolute_error": {key: paired.summaries[key] - s_true[key]
                                   for key in SUMMARY_KEYS},
                "relative_error_sampled": {key: abs(v) for key, v in sampled.items()},
                "relative_error_sampled_stderr": sampled_se,
                "sampled_vs_paired_z": {key: (sampled[key] - signed[key]) / math.hypot(
                    sampled_se[key], rel_se[key]) for key in SUMMARY_KEYS},
                "importance_ess_fraction": paired.ess_fraction,
                "rotation_curve_max_rel_error": float(np.nanmax(np.abs(curve_f / curve_t - 1))),
                "flow_draws_kept": len(draws),
            })
        return {"per_galaxy": rows, "summary": _summary(rows),
                "cleaning": pop.record, "label_names": list(self.label_names),
                "heldout_ids": self.heldout_ids, "training_galaxies": len(self.training_ids())}

    def flow_stars(self, model: Any, lab: np.ndarray, n: int, r_c: float,
                    rng: np.random.Generator) -> np.ndarray:
        """n flow draws at ``lab`` inside r < r_c (drawn in rounds; non-finite rows dropped)."""
        kept: list[np.ndarray] = []
        total = 0
        for _ in range(20):
            draws = model.sample(int(1.05 * (n - total)) + 10, lab.astype(np.float32),
                                 seed=int(rng.integers(2**31))).numpy().astype(np.float64)
            ok = np.all(np.isfinite(draws), axis=1) & (np.linalg.norm(draws[:, :3], axis=1) < r_c)
            kept.append(draws[ok])
            total += int(ok.sum())
            if total >= n:
                break
        return np.concatenate(kept)[:n]

    @staticmethod
    def model_log_prob(model: Any, stars: np.ndarray, lab: np.ndarray,
                       chunk: int = 100_000) -> np.ndarray:
        """log q(star | lab) [n] (float64) of the model at one label row, ``chunk`` rows a call."""
        lab_rows = np.tile(np.asarray(lab, np.float32), (min(chunk, len(stars)), 1))
        return np.concatenate([
            model.log_prob(stars[i:i + chunk].astype(np.float32),
                           lab_rows[: len(stars[i:i + chunk])]).numpy().astype(np.float64)
            for i in range(0, len(stars), chunk)])

    @staticmethod
    def exact_stars(theta: np.ndarray, n: int, r_c: float,
                     rng: np.random.Generator) -> np.ndarray:
        """n exact stars of θ inside r < r_c."""
        out = gal.sample(np.tile(theta, (int(1.02 * n) + 20, 1)), rng)
        out = out[np.linalg.norm(out[:, :3], axis=1) < r_c]
        while len(out) < n:
            more = gal.sample(np.tile(theta, (n, 1)), rng)
            out = np.concatenate([out, more[np.linalg.norm(more[:, :3], axis=1) < r_c]])
        return out[:n]

    def targets(self, metrics: Mapping[str, Any]) -> dict[str, Target]:
        """Issue #16's held-out targets (the noise-label ablation is compared by the study)."""
        s = metrics["summary"]
        return {
            "logp_error": Target("mean over held-out galaxies of mean |log q - log p| per star "
                                 "(nat)", s["logp_abs_error_mean"], 0.2),
            "half_mass_radius": Target("largest relative error of the half-mass radius (paired)",
                                       s["half_mass_radius_max"], 0.05),
            "sigma_v": Target("largest relative error of sigma_v (v_z dispersion; paired)",
                              s["sigma_v_max"], 0.05),
            "feh_gradient": Target("largest relative error of the [Fe/H] gradient (paired)",
                                   s["feh_gradient_max"], 0.05),
            "auc": Target("largest classifier AUC over held-out galaxies", s["auc_max"], 0.6),
        }

    def figures(self, report: Mapping[str, Any], model: Any, out_dir: Path) -> list[str]:
        """corner.png (a held-out galaxy), marginals.png, profiles.png, errors.png."""
        return galaxy_figures(self, report, model, Path(out_dir))


def outside_training_range(model: Any, label: np.ndarray, names: Sequence[str]) -> list[str]:
    """Names of the label columns in which one galaxy's ``label`` [C] lies outside the labels the
    model was trained on (:meth:`~tfgalflow.density.Density.label_range`, with the tolerance of
    :func:`~tfgalflow.density.extrapolated_labels`); [] when the model records no range. A
    held-out galaxy listed here is an extrapolation, not an interpolation, in those columns.
    """
    from ..density import extrapolated_labels

    span = getattr(model, "label_range", lambda: None)()
    if span is None:
        return []
    low, high = span
    return [name for j, name in enumerate(names)
            if extrapolated_labels([[label[j]]], low[j:j + 1], high[j:j + 1])[0]]


def _summary(rows: list[dict]) -> dict:
    """Means and worst cases over the evaluated held-out galaxies."""
    failed = [r for r in rows if r.get("failed")]
    rows = [r for r in rows if not r.get("dropped_by_cleaning") and not r.get("failed")]
    if failed or not rows:
        return {"galaxies": len(rows), "failed": len(failed), "logp_abs_error_mean": math.inf,
                **{f"{k}_max": math.inf for k in ("half_mass_radius", "sigma_v",
                                                   "feh_gradient", "auc")}}
    out = {"galaxies": len(rows)}
    for key in ("logp_abs_error", "kl", "auc", "rotation_curve_max_rel_error"):
        values = np.array([r[key] for r in rows])
        out[f"{key}_mean"], out[f"{key}_max"] = float(values.mean()), float(values.max())
    for key in SUMMARY_KEYS:
        values = np.array([r["relative_error"][key] for r in rows])
        out[f"{key}_mean"], out[f"{key}_max"] = float(values.mean()), float(values.max())
        out[f"{key}_stderr_max"] = max(r["relative_error_stderr"][key] for r in rows)
        out[f"{key}_sampled_max"] = max(r["relative_error_sampled"][key] for r in rows)
        out[f"{key}_absolute_max"] = max(abs(r["absolute_error"][key]) for r in rows)
    # the flow's sampler and its density describe one distribution: the sampled and the paired
    # relative errors must agree within their noise (|z| of a few at most)
    out["sampled_vs_paired_max_z"] = max(abs(z) for r in rows
                                         for z in r["sampled_vs_paired_z"].values())
    out["importance_ess_fraction_min"] = min(r["importance_ess_fraction"] for r in rows)
    out["extrapolated_galaxies"] = [r["galaxy"] for r in rows if r["outside_training_range"]]
    return out


def galaxy_figures(task: GalaxyPopulation, report: Mapping[str, Any], model: Any,
                   out_dir: Path) -> list[str]:
    """corner.png (flow vs exact stars of the first held-out galaxy, every pair of the 8 axes),
    marginals.png (1-D histograms per held-out galaxy), profiles.png (rotation curve and [Fe/H]
    vs R, flow vs exact), errors.png (per-galaxy log-density error, AUC, summary errors).
    """
    from matplotlib.figure import Figure

    from .figures import save_figure

    rows = [r for r in report["metrics"]["per_galaxy"]
            if not r.get("dropped_by_cleaning") and not r.get("failed")]
    if not rows:
        return []
    pop = task.population()
    rng = np.random.default_rng([task.config.seed, 99])
    names = []
    per = []
    for row in rows:
        k = pop.index(row["galaxy"])
        exact = pop.stars[k]
        flow = task.flow_stars(model, pop.labels[k], len(exact), float(pop.r_cut[k]), rng)
        per.append((row, exact, flow))

    row, exact, flow = per[0]
    n_show = min(3000, len(exact), len(flow))
    lims = np.percentile(exact, [0.5, 99.5], axis=0)
    fig = Figure(figsize=(16, 16), layout="constrained")
    axes = fig.subplots(gal.DIM, gal.DIM)
    for i in range(gal.DIM):
        for j in range(gal.DIM):
            ax = axes[i, j]
            if j > i:
                ax.set_axis_off()
                continue
            if i == j:
                bins = np.linspace(lims[0, i], lims[1, i], 50)
                ax.hist(exact[:, i], bins, density=True, histtype="step", color="k",
                        label="exact")
                ax.hist(flow[:, i], bins, density=True, histtype="step", color="C1",
                        label="flow")
            else:
                ax.scatter(exact[:n_show, j], exact[:n_show, i], s=0.5, c="k", alpha=0.3)
                ax.scatter(flow[:n_show, j], flow[:n_show, i], s=0.5, c="C1", alpha=0.3)
                ax.set_xlim(lims[:, j])
                ax.set_ylim(lims[:, i])
            if i == gal.DIM - 1:
                ax.set_xlabel(gal.EVENT_NAMES[j])
            if j == 0 and i > 0:
                ax.set_ylabel(gal.EVENT_NAMES[i])
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"held-out galaxy {row['galaxy']}: exact (black) vs flow (orange), "
                 f"AUC {row['auc']:.3f}, mean |dlogp| {row['logp_abs_error']:.3f} nat")
    names.append(save_figure(fig, out_dir / "corner.png"))

    fig = Figure(figsize=(3.0 * gal.DIM, 2.6 * len(per)), layout="constrained")
    axes = fig.subplots(len(per), gal.DIM, squeeze=False)
    for g_row, (row, exact, flow) in enumerate(per):
        lims = np.percentile(exact, [0.5, 99.5], axis=0)
        for i in range(gal.DIM):
            bins = np.linspace(lims[0, i], lims[1, i], 40)
            ax = axes[g_row, i]
            ax.hist(exact[:, i], bins, density=True, histtype="step", color="k")
            ax.hist(flow[:, i], bins, density=True, histtype="step", color="C1")
            ax.set_yticks([])
            if g_row == len(per) - 1:
                ax.set_xlabel(gal.EVENT_NAMES[i])
        axes[g_row, 0].set_ylabel(f"galaxy {row['galaxy']}")
    fig.suptitle("held-out galaxies: marginals, exact (black) vs flow (orange)")
    names.append(save_figure(fig, out_dir / "marginals.png"))

    fig = Figure(figsize=(10, 4.2 * len(per) / 2 + 1), layout="constrained")
    axes = fig.subplots(len(per), 2, squeeze=False)
    for g_row, (row, exact, flow) in enumerate(per):
        r_d = row["params"]["r_disc"]
        edges = np.asarray(ROTATION_BINS) * r_d
        mids = 0.5 * (edges[1:] + edges[:-1])
        axes[g_row, 0].plot(mids, row["true_summaries"]["rotation_curve"], "k-o", label="exact")
        axes[g_row, 0].plot(mids, row["flow_summaries"]["rotation_curve"], "C1--s",
                            label="flow")
        axes[g_row, 0].set_ylabel(f"<v_phi> [km/s], gal {row['galaxy']}")
        for stars, style, label in ((exact, "k-", "exact"), (flow, "C1--", "flow")):
            r_cyl = np.hypot(stars[:, 0], stars[:, 1])
            bins = np.linspace(0, 4 * r_d, 17)
            which = np.digitize(r_cyl, bins) - 1
            med = [np.median(stars[which == b, 6]) if np.sum(which == b) > 10 else np.nan
                   for b in range(16)]
            axes[g_row, 1].plot(0.5 * (bins[1:] + bins[:-1]), med, style, label=label)
        axes[g_row, 1].set_ylabel("median [Fe/H]")
    axes[-1, 0].set_xlabel("R [kpc]")
    axes[-1, 1].set_xlabel("R [kpc]")
    axes[0, 0].legend()
    names.append(save_figure(fig, out_dir / "profiles.png"))

    fig = Figure(figsize=(13, 3.8), layout="constrained")
    axes = fig.subplots(1, 3)
    ids = [str(r["galaxy"]) for r in rows]
    axes[0].bar(ids, [r["logp_abs_error"] for r in rows], color="C0", label="mean |dlogp|")
    axes[0].plot(ids, [r["kl"] for r in rows], "ko", label="KL estimate")
    axes[0].axhline(0.2, color="r", ls="--")
    axes[0].set_ylabel("nat / star")
    axes[0].legend()
    axes[1].bar(ids, [r["auc"] for r in rows], color="C2")
    axes[1].axhline(0.6, color="r", ls="--")
    axes[1].set_ylim(0.4, 1.0)
    axes[1].set_ylabel("classifier AUC")
    for off, key in enumerate(SUMMARY_KEYS):
        at = np.arange(len(rows)) + 0.2 * (off - 1)
        axes[2].errorbar(at, [100 * r["relative_error"][key] for r in rows],
                         [100 * r["relative_error_stderr"][key] for r in rows], fmt="o",
                         color=f"C{off}", label=f"{key} (paired)")
        axes[2].errorbar(at + 0.07, [100 * r["relative_error_sampled"][key] for r in rows],
                         [100 * r["relative_error_sampled_stderr"][key] for r in rows], fmt="o",
                         mfc="none", color=f"C{off}", label=f"{key} (flow draws)")
    axes[2].axhline(5, color="r", ls="--")
    axes[2].set_xticks(range(len(rows)), ids)
    axes[2].set_ylabel("relative error [%] (±1 standard error)")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("held-out galaxy")
    names.append(save_figure(fig, out_dir / "errors.png"))
    return names
