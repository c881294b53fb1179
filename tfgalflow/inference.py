"""Label (hyperparameter) inference: the likelihood of continuous labels c given observed events.

For events x_1..x_N drawn independently from p(x | c) (an emulator, e.g. a conditional flow trained
on a population-synthesis grid, or an exact density), the log-likelihood of the labels is

    log L(c) = Σ_i log p(x_i | c),

evaluated here for many label points at once: a chunk of k label points and the N events become
one batch of k N rows (events tiled, labels repeated) and a single ``log_prob`` call, reshaped to
[k, N] and summed over events -- never a Python loop over events. On top of it:

* :func:`likelihood_map` - log L on a grid of label values (a likelihood map and its figure);
* :func:`maximise` - the maximum-likelihood labels (scipy L-BFGS-B inside the prior box, started
  from the best grid point) and the Laplace covariance there (:func:`laplace_covariance`);
* :func:`sample_posterior` - posterior samples with emcee (Foreman-Mackey et al. 2013) under a box
  prior :class:`Prior`, uniform or log-uniform per label; one vectorised call per step for all
  walkers; intervals and a corner-style figure (:func:`plot_corner`);
* :func:`member_spread` - for an :class:`~tfgalflow.model.Ensemble`, each member's maximum and the
  spread of log L across members (the posterior itself uses the ensemble's mixture density);
* :func:`infer_labels` - all of it, written as JSON + figures (the ``infer-labels`` subcommand).

Reference: the hierarchical use of emulated likelihoods, e.g. Wong et al. (2021, PRD 103, 083021)
and the SEVN-NF thesis (REFERENCES.md 002).

Example::

    >>> prior = Prior.parse("Z=1e-4:0.03:log,alpha=0.5:5")
    >>> post = sample_posterior(flow, events, prior, seed=0)     # events [1000, 2]
    >>> post.intervals()["Z"]                                      # (16 %, 50 %, 84 %) quantiles
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import validation
from .atomic import atomic_file, write_json
from .errors import InputError

#: Rows (label points x events) per log_prob call.
CHUNK_ROWS = 1 << 18


def _log_prob_function(model: Any) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """log p(x [M, D], c [M, C]) -> [M] float64 of a Density, object with log_prob, or callable."""
    fn = getattr(model, "log_prob", model)
    if not callable(fn):
        raise InputError(
            f"model of type {type(model).__name__}: expected a density with "
            f"log_prob(x, labels) or a callable"
        )
    dtype = np.float32 if hasattr(model, "log_prob_tensor") else np.float64

    def log_prob(x: np.ndarray, c: np.ndarray) -> np.ndarray:
        out = fn(x.astype(dtype), c.astype(dtype))
        return np.asarray(out.numpy() if hasattr(out, "numpy") else out, dtype=np.float64)

    return log_prob


def log_likelihood(
    model: Any, events: Any, labels: Any, chunk_rows: int = CHUNK_ROWS
) -> np.ndarray:
    """log L(c_l) = Σ_i log p(x_i | c_l) for every label point: [L] float64.

    Args:
        model: a conditional density (Flow, Ensemble, ExportedModel, ...) or any object/callable
            with
            ``log_prob(x [M, D], labels [M, C]) -> [M]`` (e.g. :mod:`tfgalflow.popsynth`).
        events: the observed events x [N, D] in the model's units.
        labels: label points c [L, C] (or one [C]).
        chunk_rows: rows (label points x events) per ``log_prob`` call; events are split too when
            N alone exceeds it.
    Returns -inf for a label point under which some event has zero density.
    """
    x = validation.finite_matrix(events, "events")
    c = np.asarray(labels, dtype=np.float64)
    c = validation.finite_matrix(c[None, :] if c.ndim == 1 else c, "labels", expected="[L, C]")
    rows = validation.integer(chunk_rows, "chunk_rows")
    log_prob = _log_prob_function(model)
    n = x.shape[0]
    event_step = min(n, rows)
    label_step = max(1, rows // event_step)
    total = np.zeros(c.shape[0])
    for e0 in range(0, n, event_step):
        xe = x[e0 : e0 + event_step]
        for l0 in range(0, c.shape[0], label_step):
            cl = c[l0 : l0 + label_step]
            lp = log_prob(np.tile(xe, (cl.shape[0], 1)), np.repeat(cl, xe.shape[0], axis=0))
            total[l0 : l0 + cl.shape[0]] += lp.reshape(cl.shape[0], xe.shape[0]).sum(axis=1)
    return np.where(np.isnan(total), -np.inf, total)


# ---- prior --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prior:
    """Independent box prior per label: uniform on [low, high], or log-uniform (flat in log10 c).

    Sampling and maximisation run in u = log10 c for log labels (u = c otherwise), where the prior
    is flat. ``Prior.parse("Z=1e-4:0.03:log,alpha=0.5:5")`` reads the command-line form.
    """

    names: tuple
    low: tuple
    high: tuple
    log: tuple

    def __post_init__(self) -> None:
        k = len(self.names)
        if k == 0 or not (len(self.low) == len(self.high) == len(self.log) == k):
            raise InputError(f"Prior: names, low, high, log need one entry per label, got {self}")
        for name, lo, hi, lg in zip(self.names, self.low, self.high, self.log):
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi) or (lg and lo <= 0):
                raise InputError(
                    f"prior on {name}: expected finite low < high{' and low > 0 (log)' * lg}, "
                    f"got [{lo}, {hi}]"
                )

    @classmethod
    def parse(cls, text: str) -> "Prior":
        """``NAME=LOW:HIGH[:log],...`` -> Prior; InputError naming a malformed entry."""
        names, low, high, log = [], [], [], []
        for entry in [e.strip() for e in str(text).split(",") if e.strip()]:
            name, _, bounds = entry.partition("=")
            parts = bounds.split(":")
            try:
                if not name or len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
                    raise ValueError
                lo, hi = float(parts[0]), float(parts[1])
            except ValueError:
                raise InputError(
                    f"prior entry {entry!r}: expected NAME=LOW:HIGH or NAME=LOW:HIGH:log, "
                    f"e.g. Z=1e-4:0.03:log"
                ) from None
            (
                names.append(name.strip()),
                low.append(lo),
                high.append(hi),
                log.append(len(parts) == 3),
            )
        if len(set(names)) != len(names):
            raise InputError(f"prior {text!r}: each label once, got {names}")
        return cls(tuple(names), tuple(low), tuple(high), tuple(log))

    def ordered(self, label_names: Sequence[str]) -> "Prior":
        """The prior in the model's label order; InputError if the names differ."""
        label_names = [str(n) for n in label_names]
        if sorted(label_names) != sorted(self.names):
            raise InputError(
                f"prior names {list(self.names)} do not match the model's labels "
                f"{label_names}; give one NAME=LOW:HIGH[:log] per label"
            )
        idx = [self.names.index(n) for n in label_names]
        return Prior(
            tuple(label_names),
            tuple(self.low[i] for i in idx),
            tuple(self.high[i] for i in idx),
            tuple(self.log[i] for i in idx),
        )

    @property
    def dim(self) -> int:
        """The number of labels the prior spans."""
        return len(self.names)

    def to_u(self, c: np.ndarray) -> np.ndarray:
        """Labels [.., C] -> sampling coordinates u (log10 for log labels)."""
        c = np.array(c, dtype=np.float64)
        for k, lg in enumerate(self.log):
            if lg:
                c[..., k] = np.log10(c[..., k])
        return c

    def from_u(self, u: np.ndarray) -> np.ndarray:
        """Sampling coordinates [.., C] -> labels."""
        c = np.array(u, dtype=np.float64)
        for k, lg in enumerate(self.log):
            if lg:
                c[..., k] = 10.0 ** c[..., k]
        return c

    @property
    def u_bounds(self) -> list[tuple[float, float]]:
        """The box in the sampling variables u (log10 of the label for log-uniform priors)."""
        return [tuple(self.to_u(np.array([self.low, self.high]))[:, k]) for k in range(self.dim)]

    def inside(self, u: np.ndarray) -> np.ndarray:
        """[W] bool: sampling points u [W, C] inside the prior box."""
        b = np.array(self.u_bounds)
        return np.all((u >= b[:, 0]) & (u <= b[:, 1]), axis=-1)

    def to_dict(self) -> dict:
        """The prior as {name: {low, high, log}} (JSON)."""
        return {
            n: {"low": lo, "high": hi, "log": lg}
            for n, lo, hi, lg in zip(self.names, self.low, self.high, self.log)
        }


# ---- grid, maximum, posterior --------------------------------------------------------------


@dataclass(frozen=True)
class LikelihoodMap:
    """log L on a grid: ``axes[k]`` [n_k] label values, ``log_l`` [n_0, n_1, ...] (ij indexing)."""

    names: tuple
    axes: tuple
    log_l: np.ndarray

    def best(self) -> np.ndarray:
        """The grid point [C] of largest log L."""
        idx = np.unravel_index(int(np.argmax(self.log_l)), self.log_l.shape)
        return np.array([ax[i] for ax, i in zip(self.axes, idx)])


def likelihood_map(
    model: Any,
    events: Any,
    prior: Prior,
    points: int | Sequence[int] = 40,
    chunk_rows: int = CHUNK_ROWS,
) -> LikelihoodMap:
    """log L on a grid spanning the prior box, evenly spaced in u (log-spaced for log labels)."""
    counts = [points] * prior.dim if isinstance(points, (int, np.integer)) else list(points)
    axes_u = [
        np.linspace(lo, hi, validation.integer(n, "points", low=2))
        for (lo, hi), n in zip(prior.u_bounds, counts)
    ]
    mesh = np.stack([m.ravel() for m in np.meshgrid(*axes_u, indexing="ij")], axis=1)
    log_l = log_likelihood(model, events, prior.from_u(mesh), chunk_rows)
    axes = tuple(prior.from_u(np.stack([a] * prior.dim, 1))[:, k] for k, a in enumerate(axes_u))
    return LikelihoodMap(prior.names, axes, log_l.reshape([len(a) for a in axes_u]))


def maximise(
    model: Any,
    events: Any,
    prior: Prior,
    start: Any = None,
    grid_points: int = 12,
    chunk_rows: int = CHUNK_ROWS,
) -> dict:
    """Maximum-likelihood labels inside the prior box.

    L-BFGS-B (central-difference gradients) on -log L in u coordinates, bounded by the prior box,
    started from ``start`` (labels [C]) or the best point of a ``grid_points``-per-axis likelihood
    map. Returns {"labels" [C], "log_l", "success", "start", "laplace_cov_u"}: the last is the
    Laplace approximation of the posterior covariance in u (flat prior), Σ = (-∇²_u log L)^-1
    [C, C] at the maximum (:func:`laplace_covariance`), or None where -∇² log L is not positive
    definite (e.g. a maximum on the box edge); :func:`sample_posterior` starts its walkers from it.
    """
    from scipy import optimize

    x = validation.finite_matrix(events, "events")
    if start is None:
        start = likelihood_map(model, x, prior, grid_points, chunk_rows).best()
    u0 = prior.to_u(np.asarray(start, dtype=np.float64))

    # central differences with step h = 1e-3 of the box (above float32 round-off of a sum over
    # 1e3 events), all 2C + 1 label points in one vectorised call
    h = 1e-3 * np.array([hi - lo for lo, hi in prior.u_bounds])
    bounds = np.array(prior.u_bounds)

    def objective(u: np.ndarray) -> tuple[float, np.ndarray]:
        pts = np.concatenate([u[None, :], u + np.diag(h), u - np.diag(h)])
        pts = np.clip(pts, bounds[:, 0], bounds[:, 1])
        ll = log_likelihood(model, x, prior.from_u(pts), chunk_rows)
        if not np.all(np.isfinite(ll)):
            return 1e300, np.zeros_like(u)
        step = pts[1 : 1 + len(u)].diagonal() - pts[1 + len(u) :].diagonal()
        return -float(ll[0]), -(ll[1 : 1 + len(u)] - ll[1 + len(u) :]) / step

    res = optimize.minimize(
        objective, u0, jac=True, method="L-BFGS-B", bounds=prior.u_bounds, options={"maxiter": 200}
    )
    cov = laplace_covariance(model, x, prior, prior.from_u(res.x), chunk_rows=chunk_rows)
    return {
        "labels": prior.from_u(res.x).tolist(),
        "log_l": -float(res.fun),
        "success": bool(res.success),
        "start": np.asarray(start, float).tolist(),
        "laplace_cov_u": None if cov is None else cov.tolist(),
    }


def laplace_covariance(
    model: Any,
    events: Any,
    prior: Prior,
    labels: Any,
    step: float = 2e-3,
    chunk_rows: int = CHUNK_ROWS,
) -> np.ndarray | None:
    """Laplace covariance Σ = (-H)^-1 [C, C] in the sampling coordinates u, or None.

    H_jk = ∂² log L / ∂u_j ∂u_k at ``labels`` by central differences with steps h_j = ``step`` x
    the box width in u (all 1 + 2C² stencil points in one vectorised call; the centre is moved
    inside the box by h when it sits on an edge):

        H_jj = [log L(u + h_j) - 2 log L(u) + log L(u - h_j)] / h_j²,
        H_jk = [log L(u + h_j + h_k) - log L(u + h_j - h_k) - log L(u - h_j + h_k)
                + log L(u - h_j - h_k)] / (4 h_j h_k).

    For a Gaussian likelihood N(u; μ, Σ) this is Σ exactly. None when -H is not positive definite
    or log L is not finite on the stencil.
    """
    bounds = np.array(prior.u_bounds)
    h = float(step) * (bounds[:, 1] - bounds[:, 0])
    u = np.clip(prior.to_u(np.asarray(labels, np.float64)), bounds[:, 0] + h, bounds[:, 1] - h)
    dim = prior.dim
    eye = np.diag(h)
    points = [u] + [u + s * eye[j] for j in range(dim) for s in (1, -1)]
    pairs = [(j, k) for j in range(dim) for k in range(j + 1, dim)]
    points += [u + a * eye[j] + b * eye[k] for j, k in pairs for a in (1, -1) for b in (1, -1)]
    ll = log_likelihood(model, events, prior.from_u(np.array(points)), chunk_rows)
    if not np.all(np.isfinite(ll)):
        return None
    hess = np.zeros((dim, dim))
    for j in range(dim):
        hess[j, j] = (ll[1 + 2 * j] - 2 * ll[0] + ll[2 + 2 * j]) / h[j] ** 2
    for n, (j, k) in enumerate(pairs):
        pp, pm, mp, mm = ll[1 + 2 * dim + 4 * n : 5 + 2 * dim + 4 * n]
        hess[j, k] = hess[k, j] = (pp - pm - mp + mm) / (4 * h[j] * h[k])
    if np.any(np.linalg.eigvalsh(-hess) <= 0):
        return None
    return np.linalg.inv(-hess)


@dataclass(frozen=True)
class Posterior:
    """Posterior samples [S, C] of the labels with their names, the prior, and sampler facts.

    ``autocorr`` is emcee's integrated autocorrelation time τ per label (in steps, of the kept
    chain); the kept samples hold about walkers x (steps - burn) / τ independent draws.
    """

    names: tuple
    samples: np.ndarray
    prior: Prior
    acceptance: float
    autocorr: tuple = ()
    walkers: int = 0
    steps: int = 0
    burn: int = 0

    def intervals(self, level: float = 0.68) -> dict[str, tuple[float, float, float]]:
        """{name: (low, median, high)}: the central ``level`` interval of each marginal."""
        q = 50 * (1 - level)
        return {
            n: tuple(float(v) for v in np.percentile(self.samples[:, k], [q, 50, 100 - q]))
            for k, n in enumerate(self.names)
        }

    def covers(self, truth: Sequence[float], level: float = 0.68) -> dict[str, bool]:
        """Whether each marginal central interval contains the true label value."""
        iv = self.intervals(level)
        return {n: bool(iv[n][0] <= t <= iv[n][2]) for n, t in zip(self.names, truth)}

    def to_dict(self) -> dict:
        """The posterior summary (names, intervals, acceptance ...) as plain JSON types."""
        return {
            "names": list(self.names),
            "intervals_68": self.intervals(0.68),
            "intervals_95": self.intervals(0.95),
            "n_samples": int(self.samples.shape[0]),
            "acceptance": self.acceptance,
            "autocorr_steps": dict(zip(self.names, map(float, self.autocorr))),
            "walkers": self.walkers,
            "steps": self.steps,
            "burn": self.burn,
            "prior": self.prior.to_dict(),
        }


def sample_posterior(
    model: Any,
    events: Any,
    prior: Prior,
    walkers: int = 16,
    steps: int = 400,
    burn: int = 150,
    seed: int = 0,
    start: Any = None,
    chunk_rows: int = CHUNK_ROWS,
    start_cov: Any = None,
) -> Posterior:
    """emcee samples of p(c | x) ∝ L(c) π(c) under the box prior (flat in u): a :class:`Posterior`.

    Walkers start around ``start`` (default: the best point of a 12-per-axis likelihood map):
    drawn from N(u_start, ``start_cov``) when a covariance [C, C] in u is given (e.g.
    ``maximise(...)["laplace_cov_u"]``, so that burn-in only has to correct the non-Gaussian part),
    else from a small ball (1 % of the box); clipped into the box. Each half-step of the stretch
    move evaluates its W/2 walkers in one vectorised :func:`log_likelihood` call of fixed shape
    (walkers outside the box are evaluated at the nearest box point and then given -inf, so a
    traced model never sees a new batch size). Returns the post-burn-in chain, flattened
    ([W (steps - burn), C]), with emcee's autocorrelation time τ of the kept chain.
    """
    import emcee

    x = validation.finite_matrix(events, "events")
    walkers = validation.integer(walkers, "walkers", low=2 * prior.dim)
    steps = validation.integer(steps, "steps")
    burn = validation.integer(burn, "burn", low=0, high=steps - 1)
    rng = np.random.default_rng(validation.seed(seed))
    if start is None:
        start = likelihood_map(model, x, prior, 12, chunk_rows).best()
    bounds = np.array(prior.u_bounds)
    width = bounds[:, 1] - bounds[:, 0]
    centre = prior.to_u(np.asarray(start, float))
    if start_cov is None:
        u0 = centre + 0.01 * width * rng.normal(size=(walkers, prior.dim))
    else:
        cov = np.asarray(start_cov, np.float64)
        if cov.shape != (prior.dim, prior.dim):
            raise InputError(
                f"start_cov has shape {list(cov.shape)}; expected [{prior.dim}, {prior.dim}] "
                f"(a covariance in the sampling coordinates u)"
            )
        u0 = rng.multivariate_normal(centre, cov, size=walkers)
    u0 = np.clip(u0, bounds[:, 0] + 1e-9 * width, bounds[:, 1] - 1e-9 * width)

    def log_post(u: np.ndarray) -> np.ndarray:
        inside = prior.inside(u)
        ll = log_likelihood(
            model, x, prior.from_u(np.clip(u, bounds[:, 0], bounds[:, 1])), chunk_rows
        )
        return np.where(inside, ll, -np.inf)

    sampler = emcee.EnsembleSampler(walkers, prior.dim, log_post, vectorize=True)
    sampler.random_state = np.random.RandomState(int(rng.integers(2**31))).get_state()
    sampler.run_mcmc(u0, steps, progress=False)
    kept = sampler.get_chain(discard=burn)  # [steps - burn, W, C]
    # tol=0: an estimate for any chain length (emcee's own check asks for 50 τ)
    tau = emcee.autocorr.integrated_time(kept, tol=0)
    return Posterior(
        prior.names,
        prior.from_u(kept.reshape(-1, prior.dim)),
        prior,
        float(np.mean(sampler.acceptance_fraction)),
        tuple(float(t) for t in tau),
        walkers,
        steps,
        burn,
    )


def member_spread(
    ensemble: Any, events: Any, prior: Prior, grid_points: int = 12, chunk_rows: int = CHUNK_ROWS
) -> dict:
    """Per-member maximum-likelihood labels of an Ensemble and their spread.

    Returns {"member_maps": [K, C], "std": {name: σ across members}, "log_l_spread": the standard
    deviation across members of log L at the mixture's maximum}. The spread of the members' MAPs
    is the emulator (epistemic) uncertainty to set beside the statistical width of the posterior.
    """
    members = list(getattr(ensemble, "members", None) or [])
    if not members:
        raise InputError("member_spread: expected an Ensemble (a model with .members)")
    x = validation.finite_matrix(events, "events")
    best = maximise(ensemble, x, prior, grid_points=grid_points, chunk_rows=chunk_rows)
    maps = np.array(
        [
            maximise(m, x, prior, start=best["labels"], chunk_rows=chunk_rows)["labels"]
            for m in members
        ]
    )
    at_best = np.array(
        [log_likelihood(m, x, np.array(best["labels"]), chunk_rows)[0] for m in members]
    )
    std_u = prior.to_u(maps).std(axis=0)
    return {
        "member_maps": maps.tolist(),
        "std": {
            n + (" (log10)" if lg else ""): float(s)
            for n, lg, s in zip(prior.names, prior.log, std_u)
        },
        "log_l_at_mixture_map": at_best.tolist(),
        "log_l_spread": float(at_best.std()),
    }


# ---- figures ------------------------------------------------------------------------------


def plot_likelihood_map(
    lmap: LikelihoodMap, path: str | os.PathLike, truth: Any = None, prior: Prior | None = None
) -> Path:
    """Δ log L = log L - max on the first two label axes (a 1-D curve for one label); PNG/PDF."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    delta = lmap.log_l - np.max(lmap.log_l)
    if delta.ndim == 1:
        ax.plot(lmap.axes[0], delta)
        ax.set_xlabel(lmap.names[0])
        ax.set_ylabel("Δ log L")
    else:
        d2 = delta.reshape(delta.shape[0], delta.shape[1], -1).max(axis=2)
        mesh = ax.pcolormesh(lmap.axes[0], lmap.axes[1], np.maximum(d2.T, -50), shading="nearest")
        ax.contour(lmap.axes[0], lmap.axes[1], d2.T, levels=[-4.61, -2.30], colors="w")
        fig.colorbar(mesh, ax=ax, label="Δ log L (clipped at -50)")
        ax.set_xlabel(lmap.names[0])
        ax.set_ylabel(lmap.names[1])
        if prior is not None and prior.log[1]:
            ax.set_yscale("log")
        if truth is not None:
            ax.plot(truth[0], truth[1], "r*", ms=12, label="truth")
            ax.legend()
    if prior is not None and prior.log[0]:
        ax.set_xscale("log")
    ax.set_title("log-likelihood map (contours: 68 %, 90 % for 2 labels)")
    return _save(fig, path)


def plot_corner(post: Posterior, path: str | os.PathLike, truth: Any = None) -> Path:
    """Corner-style figure of the posterior samples (log axes for log-uniform labels); PNG/PDF."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    u = post.prior.to_u(post.samples)
    t = None if truth is None else post.prior.to_u(np.asarray(truth, float))
    labels = [("log10 " if lg else "") + n for n, lg in zip(post.names, post.prior.log)]
    k = len(labels)
    fig, axes = plt.subplots(k, k, figsize=(2.6 * k, 2.6 * k), squeeze=False)
    iv = post.intervals()
    for i in range(k):
        for j in range(k):
            ax = axes[i, j]
            if j > i:
                ax.axis("off")
                continue
            if i == j:
                ax.hist(u[:, i], bins=40, histtype="step", color="k")
                lo, _, hi = iv[post.names[i]]
                for v in post.prior.to_u(np.array([[lo] * k, [hi] * k]))[:, i]:
                    ax.axvline(v, ls="--", color="grey")
                if t is not None:
                    ax.axvline(t[i], color="r")
                ax.set_yticks([])
            else:
                ax.hist2d(u[:, j], u[:, i], bins=40, cmap="Greys")
                if t is not None:
                    ax.plot(t[j], t[i], "r*", ms=10)
            if i == k - 1:
                ax.set_xlabel(labels[j])
            if j == 0 and i > 0:
                ax.set_ylabel(labels[i])
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: str | os.PathLike) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_file(path, suffix=path.suffix) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def read_events(path: str | os.PathLike, event_columns: Any = None) -> np.ndarray:
    """Observed events [N, D] float64 from a .parquet file (``event_columns``) or a .npy array."""
    from .catalogue import PARQUET_SUFFIXES, read_parquet
    from .errors import FileError

    path = Path(path)
    if path.suffix.lower() in PARQUET_SUFFIXES:
        if not event_columns:
            raise InputError(f"{path}: name the event columns of a Parquet file, e.g. m0,m1")
        return read_parquet(path, event_columns).events
    if path.suffix.lower() == ".npy":
        if not path.exists():
            raise FileError(f"{path}: no such events file")
        return validation.finite_matrix(np.load(path), f"events in {path}")
    raise InputError(f"{path}: expected events as .parquet or .npy [N, D]")


# ---- everything, to a directory ------------------------------------------------------------


def infer_labels(
    model: Any,
    events: Any,
    prior: Prior,
    out_dir: str | os.PathLike,
    *,
    truth: Any = None,
    grid_points: int = 40,
    walkers: int = 16,
    steps: int = 400,
    burn: int = 150,
    seed: int = 0,
) -> dict:
    """Likelihood map, maximum, emcee posterior (+ ensemble spread) of the labels; JSON + figures.

    Writes ``out_dir/inference.json`` (prior, maximum, intervals, acceptance, member spread for an
    Ensemble, coverage when ``truth`` is given), ``likelihood_map.png``, ``corner.png`` and
    ``posterior_samples.npy`` [S, C]. Returns the JSON's dict.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x = validation.finite_matrix(events, "events")
    lmap = likelihood_map(model, x, prior, grid_points)
    best = maximise(model, x, prior, start=lmap.best())
    post = sample_posterior(
        model, x, prior, walkers, steps, burn, seed, start=best["labels"],
        start_cov=best["laplace_cov_u"],
    )
    result = {
        "n_events": int(x.shape[0]),
        "prior": prior.to_dict(),
        "maximum": best,
        "posterior": post.to_dict(),
    }
    if getattr(model, "members", None):
        result["ensemble"] = member_spread(model, x, prior)
    if truth is not None:
        result["truth"] = list(map(float, truth))
        result["covered_68"] = post.covers(truth)
    plot_likelihood_map(lmap, out / "likelihood_map.png", truth, prior)
    plot_corner(post, out / "corner.png", truth)
    with atomic_file(out / "posterior_samples.npy", suffix=".npy") as tmp:
        np.save(tmp, post.samples)
    write_json(out / "inference.json", result)
    return result


__all__ = [
    "CHUNK_ROWS",
    "Prior",
    "LikelihoodMap",
    "Posterior",
    "log_likelihood",
    "likelihood_map",
    "maximise",
    "laplace_covariance",
    "sample_posterior",
    "member_spread",
    "plot_likelihood_map",
    "plot_corner",
    "infer_labels",
    "read_events",
]
