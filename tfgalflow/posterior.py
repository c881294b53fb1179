"""1-D posteriors on a grid: densities for many objects at once, point estimates, PIT, HPD,
metrics.

For a conditional density p(z | x) (a trained 1-D flow, an ensemble, any
:class:`~tfgalflow.density.Density` with dim = 1) and N objects x_n, :func:`posterior_grid`
evaluates p(z_g | x_n) on a grid z_1 < ... < z_G and normalises each row by the trapezoid rule on
that grid. From the rows:

    MAP = argmax_g p_ng,   mean = ∫ z p dz,   CDF(z) = ∫_{z_1}^{z} p dz'  (trapezoid),
    quantile q = CDF^{-1}(q),  PIT_n = CDF_n(z_true,n)  (uniform if the posteriors are calibrated),
    HPD level_n = ∫ p 1[p > p(z_true,n)] dz  (the truth is inside the α-HPD region iff level <= α),

and the photo-z point metrics of Δz = z_est - z_true (Ilbert et al. 2006; Hildebrandt et al. 2010):

    σ_NMAD = 1.48 median(|Δz - median(Δz)| / (1 + z_true)),   η = frac(|Δz| / (1 + z_true) > 0.15),
    bias = median(Δz / (1 + z_true)).

Everything is vectorised over objects (chunks of rows × grid points, no per-object loop).
"""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np

from . import validation
from .atomic import atomic_file
from .errors import FileError, InputError

OUTLIER_THRESHOLD = 0.15
NMAD_FACTOR = 1.48


def parse_grid(text: str) -> np.ndarray:
    """'start:stop:step' -> the grid [G] from start to stop inclusive (e.g. '0:3:0.005',
    G = 601).
    """
    try:
        start, stop, step = (float(v) for v in str(text).split(":"))
    except ValueError:
        raise InputError(f"grid {text!r}: expected START:STOP:STEP, e.g. 0:3:0.005") from None
    if not (math.isfinite(start) and math.isfinite(stop) and step > 0 and stop > start):
        raise InputError(f"grid {text!r}: expected finite START < STOP and STEP > 0")
    n = int(math.floor((stop - start) / step + 1e-9)) + 1
    if n < 2:
        raise InputError(f"grid {text!r}: fewer than 2 points")
    return start + step * np.arange(n)


def check_grid(grid: Any) -> np.ndarray:
    """``grid`` as an increasing finite float64 array [G], G >= 2 (InputError otherwise)."""
    g = np.asarray(grid, np.float64)
    if g.ndim != 1 or g.size < 2 or not np.all(np.isfinite(g)) or not np.all(np.diff(g) > 0):
        raise InputError(
            f"grid has shape {list(g.shape)}; expected [G] increasing finite values, G >= 2"
        )
    return g


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    import tf_keras as keras
    return keras.utils.Progbar(total, unit_name="objects", stateful_metrics=None)


def log_posterior_grid(model: Any, labels: Any, grid: Any, max_elements: int = 2 ** 21,
                       progress: bool = False) -> np.ndarray:
    """log p(z_g | labels_n) [N, G] (float64, unnormalised on the grid: exactly the model's
    log-density).

    Args:
        model: a 1-D conditional density (Flow, Ensemble, ExportedModel, ...), dim = 1.
        labels: [N, C] conditioning rows (C = model.label_dim).
        grid: [G] increasing values of z.
        max_elements: rows × grid points evaluated per call (memory bound).
        progress: show a progress bar (objects done / N) on stderr.

    A model with ``log_prob_grid_tensor`` (Flow, Ensemble) runs its conditioning networks once per
    object; any other density gets the N·G pairs (z_g, labels_n) in chunks.
    """
    if getattr(model, "dim", None) != 1:
        raise InputError(
            f"posterior_grid needs a model of dimension 1, got dim = {getattr(model, 'dim', None)}"
        )
    c = validation.finite_matrix(labels, "labels", model.label_dim, dtype=np.float32)
    g = check_grid(grid)
    max_elements = validation.integer(max_elements, "max_elements")
    rows = max(1, max_elements // g.size)
    n = c.shape[0]
    out = np.empty((n, g.size))
    bar = _progress(n, progress)
    fast = hasattr(model, "log_prob_grid_tensor")
    if fast:
        import tensorflow as tf
        grid_t = tf.constant(g, tf.float32)
        fn = tf.function(lambda cc: model.log_prob_grid_tensor(grid_t, cc),
                         input_signature=[tf.TensorSpec([None, model.label_dim], tf.float32)])
    for start in range(0, n, rows):
        chunk = c[start:start + rows]
        if fast:
            lp = fn(chunk).numpy()
        else:
            x = np.tile(g.astype(np.float32), chunk.shape[0])[:, None]
            lp = np.asarray(model.log_prob(x, np.repeat(chunk, g.size, axis=0))).reshape(
                -1, g.size
            )
        out[start:start + rows] = lp
        if bar is not None:
            bar.update(min(start + rows, n))
    return out


def normalise(log_density: Any, grid: Any) -> np.ndarray:
    """Rows of exp(log_density) [N, G] divided by their trapezoid integral over ``grid`` [G]."""
    g = check_grid(grid)
    lp = np.asarray(log_density, np.float64)
    m = np.max(lp, axis=1, keepdims=True)
    if not np.all(np.isfinite(m)):
        raise InputError(
            "log_density: a row is -inf (or NaN) everywhere on the grid; cannot normalise"
        )
    p = np.exp(lp - m)
    return p / np.trapezoid(p, g, axis=1)[:, None]


def posterior_grid(model: Any, labels: Any, grid: Any, max_elements: int = 2 ** 21,
                   progress: bool = False) -> np.ndarray:
    """p(z_g | labels_n) [N, G], each row normalised on the grid (trapezoid); see
    :func:`log_posterior_grid`.

    Example::

        grid = parse_grid("0:3:0.005")
        post = posterior_grid(flow, x_test, grid)       # [N, 601]
        summary = summarize(post, grid, truth=z_test)
    """
    return normalise(log_posterior_grid(model, labels, grid, max_elements, progress), grid)


# ---- summaries of posterior rows ----------------------------------------------------------------

def cdf(post: np.ndarray, grid: Any) -> np.ndarray:
    """Cumulative trapezoid integral [N, G] of rows [N, G] (0 at grid[0])."""
    g = check_grid(grid)
    steps = 0.5 * (post[:, 1:] + post[:, :-1]) * np.diff(g)
    return np.concatenate([np.zeros((post.shape[0], 1)), np.cumsum(steps, axis=1)], axis=1)


def map_estimate(post: np.ndarray, grid: Any) -> np.ndarray:
    """z_MAP [N]: the grid value of each row's largest density."""
    return check_grid(grid)[np.argmax(post, axis=1)]


def mean(post: np.ndarray, grid: Any) -> np.ndarray:
    """Posterior mean ∫ z p dz [N] (trapezoid)."""
    g = check_grid(grid)
    return np.trapezoid(post * g, g, axis=1)


def cdf_at(post: np.ndarray, grid: Any, values: Any) -> np.ndarray:
    """CDF_n(v_n) [N] for one value per row: the exact integral of the piecewise-linear density.

    0 below grid[0], 1 above grid[-1] (the rows are normalised on the grid).
    """
    g = check_grid(grid)
    v = np.asarray(values, np.float64).reshape(-1)
    if v.size != post.shape[0]:
        raise InputError(
            f"values has {v.size} entries; expected one per posterior row ({post.shape[0]})"
        )
    c = cdf(post, g)
    i = np.clip(np.searchsorted(g, v, side="right") - 1, 0, g.size - 2)
    rows = np.arange(v.size)
    t = np.clip(v - g[i], 0.0, g[i + 1] - g[i])
    p_i, p_j = post[rows, i], post[rows, i + 1]
    p_v = p_i + (p_j - p_i) * t / (g[i + 1] - g[i])
    out = c[rows, i] + 0.5 * (p_i + p_v) * t
    return np.where(v < g[0], 0.0, np.where(v > g[-1], 1.0, np.clip(out, 0.0, 1.0)))


def pit(post: np.ndarray, grid: Any, truth: Any) -> np.ndarray:
    """Probability integral transform CDF_n(z_true,n) [N] (uniform on [0, 1] for calibrated
    posteriors).
    """
    return cdf_at(post, grid, truth)


def quantiles(post: np.ndarray, grid: Any, q: Sequence[float]) -> np.ndarray:
    """z at CDF = q [N, Q] by linear interpolation of each row's CDF (vectorised over rows)."""
    g = check_grid(grid)
    q = np.asarray(q, np.float64)
    c = cdf(post, g)
    out = np.empty((post.shape[0], q.size))
    for k, qk in enumerate(q):                          # Q is small; rows are vectorised
        i = np.clip(np.sum(c < qk, axis=1) - 1, 0, g.size - 2)
        rows = np.arange(post.shape[0])
        lo, hi = c[rows, i], c[rows, i + 1]
        f = np.clip(np.where(hi > lo, (qk - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0), 0.0, 1.0)
        out[:, k] = g[i] + f * (g[i + 1] - g[i])
    return out


def hpd_threshold(post: np.ndarray, grid: Any, mass: float = 0.68) -> np.ndarray:
    """Density level λ_n [N] whose region {p > λ} holds ``mass`` (the α-HPD region; may be
    disjoint).
    """
    g = check_grid(grid)
    weights = post * np.gradient(g)                     # quadrature weights of the grid points
    order = np.argsort(-post, axis=1)
    sorted_p = np.take_along_axis(post, order, axis=1)
    cum = np.cumsum(np.take_along_axis(weights, order, axis=1), axis=1)
    k = np.minimum(np.sum(cum < mass * cum[:, -1:], axis=1), g.size - 1)
    return sorted_p[np.arange(post.shape[0]), k]


def hpd_interval(post: np.ndarray, grid: Any, mass: float = 0.68) -> np.ndarray:
    """[N, 2] lowest and highest z of the α-HPD region (its span; the region itself may be
    disjoint).
    """
    g = check_grid(grid)
    inside = post >= hpd_threshold(post, g, mass)[:, None]
    lo = g[np.argmax(inside, axis=1)]
    hi = g[g.size - 1 - np.argmax(inside[:, ::-1], axis=1)]
    return np.stack([lo, hi], axis=1)


def hpd_level(post: np.ndarray, grid: Any, truth: Any) -> np.ndarray:
    """Mass of the region {p > p(z_true)} [N]; the truth is in the α-HPD region iff level <= α.

    For calibrated posteriors the levels are uniform on [0, 1], so mean(level <= 0.68) ≈ 0.68.
    """
    g = check_grid(grid)
    v = np.asarray(truth, np.float64).reshape(-1)
    rows = np.arange(post.shape[0])
    i = np.clip(np.searchsorted(g, v, side="right") - 1, 0, g.size - 2)
    f = np.clip((v - g[i]) / (g[i + 1] - g[i]), 0.0, 1.0)
    p_true = post[rows, i] + f * (post[rows, i + 1] - post[rows, i])
    weights = post * np.gradient(g)
    return np.sum(np.where(post > p_true[:, None], weights, 0.0), axis=1) / np.sum(weights, axis=1)


def kl_divergence(p: np.ndarray, q: np.ndarray, grid: Any, floor: float = 1e-30) -> np.ndarray:
    """KL(p ‖ q) = ∫ p ln(p / q) dz [N] (nats) by the trapezoid rule, rows normalised on the
    grid.
    """
    g = check_grid(grid)
    integrand = np.where(
        p > 0, p * (np.log(np.maximum(p, floor)) - np.log(np.maximum(q, floor))), 0.0
    )
    return np.trapezoid(integrand, g, axis=1)


def summarize(post: np.ndarray, grid: Any, truth: Any = None, hpd_mass: float = 0.68) -> dict:
    """Per-object summaries {name: [N] array}: map, mean, median, q16, q84, hpd_lo, hpd_hi (+ pit
    and hpd_level when ``truth`` [N] is given).
    """
    g = check_grid(grid)
    q = quantiles(post, g, [0.16, 0.5, 0.84])
    hpd = hpd_interval(post, g, hpd_mass)
    out = {"map": map_estimate(post, g), "mean": mean(post, g), "median": q[:, 1], "q16": q[:, 0],
           "q84": q[:, 2], "hpd_lo": hpd[:, 0], "hpd_hi": hpd[:, 1]}
    if truth is not None:
        out["pit"] = pit(post, g, truth)
        out["hpd_level"] = hpd_level(post, g, truth)
    return out


# ---- point-estimate metrics ---------------------------------------------------------------------

def point_metrics(z_est: Any, z_true: Any, outlier: float = OUTLIER_THRESHOLD) -> dict:
    """σ_NMAD, outlier fraction η, bias = median(Δz/(1+z)) and N of estimates against truths
    [N].
    """
    est = np.asarray(z_est, np.float64).reshape(-1)
    true = np.asarray(z_true, np.float64).reshape(-1)
    if est.size != true.size:
        raise InputError(
            f"z_est has {est.size} entries and z_true {true.size}; expected the same N"
        )
    if est.size == 0:
        return {"n": 0, "sigma_nmad": math.nan, "eta": math.nan, "bias": math.nan}
    dz = est - true
    scaled = dz / (1.0 + true)
    return {
        "n": int(est.size),
        "sigma_nmad": float(NMAD_FACTOR * np.median(np.abs(dz - np.median(dz)) / (1.0 + true))),
        "eta": float(np.mean(np.abs(scaled) > outlier)),
        "bias": float(np.median(scaled)),
    }


def metrics_by_bin(z_est: Any, z_true: Any, edges: Sequence[float]) -> list[dict]:
    """:func:`point_metrics` in bins of z_true [edges_k, edges_k+1), each with its 'lo' and
    'hi'.
    """
    true = np.asarray(z_true, np.float64).reshape(-1)
    est = np.asarray(z_est, np.float64).reshape(-1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (true >= lo) & (true < hi)
        out.append({"lo": float(lo), "hi": float(hi), **point_metrics(est[sel], true[sel])})
    return out


def pit_ks(pit_values: Any) -> float:
    """Kolmogorov-Smirnov distance of PIT values [N] to the uniform distribution on [0, 1]."""
    u = np.sort(np.asarray(pit_values, np.float64).reshape(-1))
    n = u.size
    return float(max(np.max(np.arange(1, n + 1) / n - u), np.max(u - np.arange(n) / n)))


def _two_modes(post: np.ndarray, g: np.ndarray, separation: float
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(i_map, j, has, valley) [N] each: the grid indices of a row's main peak (its MAP) and of
    its second peak (the highest local maximum at least ``separation`` (1 + z_MAP) away), whether
    such a second peak exists, and the index of the lowest density between the two.
    """
    n = post.shape[0]
    rows = np.arange(n)
    i_map = np.argmax(post, axis=1)
    z_map = g[i_map]
    padded = np.pad(post, ((0, 0), (1, 1)), constant_values=-1.0)
    local_max = (post >= padded[:, :-2]) & (post > padded[:, 2:])
    far = np.abs(g[None, :] - z_map[:, None]) >= separation * (1.0 + z_map[:, None])
    candidates = np.where(local_max & far, post, -1.0)
    j = np.argmax(candidates, axis=1)
    has = candidates[rows, j] > 0
    lo, hi = np.minimum(i_map, j), np.maximum(i_map, j)
    between = (np.arange(g.size)[None, :] >= lo[:, None]) & (
        np.arange(g.size)[None, :] <= hi[:, None]
    )
    valley = np.argmin(np.where(between, post, np.inf), axis=1)
    return i_map, j, has, valley


def is_bimodal(post: np.ndarray, grid: Any, separation: float = 0.3, min_mass: float = 0.1,
               dip: float = 0.5) -> np.ndarray:
    """[N] bool: a row has two peaks with |Δz|/(1+z_peak) >= ``separation``, the density between
    them dipping below ``dip`` × the lower peak, and >= ``min_mass`` of probability on each side of
    the dip.

    Vectorised over rows: the main peak is the MAP; the second is the highest grid point at least
    ``separation`` (1 + z_MAP) away that is a local maximum.
    """
    g = check_grid(grid)
    rows = np.arange(post.shape[0])
    i_map, j, has, valley = _two_modes(post, g, separation)
    c = cdf(post, g)
    mass_below = c[rows, valley] / c[:, -1]
    second = np.minimum(post[rows, i_map], post[rows, j])
    return (
        has
        & (post[rows, valley] < dip * second)
        & (np.minimum(mass_below, 1 - mass_below) >= min_mass)
    )


def mode_mass_kl(p: np.ndarray, q: np.ndarray, grid: Any, separation: float = 0.3
                 ) -> np.ndarray:
    """KL(P ‖ Q) [N] (nats) of the two modes' masses: the part of KL(p ‖ q) that is the modes'
    relative weights, not their shapes.

    Each row of ``p`` [N, G] is cut at the valley between its two peaks (:func:`is_bimodal`'s,
    with ``separation``); P = (P_1, P_2) and Q = (Q_1, Q_2) are the masses of p and q [N, G] on
    either side of the cut (rows normalised on the grid). By the chain rule of relative entropy
    (Cover & Thomas 2006, Theorem 2.5.3),

        KL(p ‖ q) = KL(P ‖ Q) + Σ_i P_i KL(p_i ‖ q_i),

    with p_i, q_i the densities restricted to side i and renormalised, so 0 <= KL(P ‖ Q) <=
    KL(p ‖ q), and KL(p ‖ q) - KL(P ‖ Q) is the error in the modes' shapes. NaN for rows of p
    without a second peak.
    """
    g = check_grid(grid)
    rows = np.arange(p.shape[0])
    _, _, has, valley = _two_modes(p, g, separation)

    def masses(post: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c = cdf(post, g)
        below = c[rows, valley] / c[:, -1]
        return below, 1.0 - below

    p1, p2 = masses(p)
    q1, q2 = masses(q)
    tiny = 1e-300

    def term(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.where(a > 0, a * (np.log(np.maximum(a, tiny)) - np.log(np.maximum(b, tiny))),
                        0.0)

    return np.where(has, term(p1, q1) + term(p2, q2), np.nan)


# ---- files --------------------------------------------------------------------------------------

def read_inputs(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """(labels [N, C], truth [N] | None) from an HDF5 file with datasets 'labels' and optional
    'z'.
    """
    import h5py
    try:
        with h5py.File(path, "r") as f:
            if "labels" not in f:
                raise FileError(f"{path}: no dataset 'labels' [N, C] (found {sorted(f.keys())})")
            labels = np.asarray(f["labels"], np.float64)
            truth = np.asarray(f["z"], np.float64) if "z" in f else None
    except OSError as exc:
        raise FileError(f"{path}: cannot read as HDF5 ({exc})") from None
    if labels.ndim != 2:
        raise FileError(f"{path}: 'labels' has shape {list(labels.shape)}; expected [N, C]")
    if truth is not None and truth.shape != (labels.shape[0],):
        raise FileError(f"{path}: 'z' has shape {list(truth.shape)}; expected [{labels.shape[0]}]")
    return labels, truth


def write_inputs(path: str | os.PathLike, labels: Any, truth: Any = None) -> None:
    """Write 'labels' [N, C] (and 'z' [N]) to an HDF5 file atomically (the format of
    :func:`read_inputs`).
    """
    import h5py
    with atomic_file(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("labels", data=np.asarray(labels, np.float32))
            if truth is not None:
                f.create_dataset("z", data=np.asarray(truth, np.float64))


def write_posteriors(path: str | os.PathLike, grid: Any, post: np.ndarray, summary: dict,
                     metrics: dict | None = None) -> None:
    """Atomic HDF5: 'grid' [G], 'posterior' [N, G] (float32), one dataset per summary entry [N],
    and the metrics (JSON) in the root attribute 'metrics'.
    """
    import json

    import h5py
    with atomic_file(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("grid", data=np.asarray(grid, np.float64))
            f.create_dataset("posterior", data=np.asarray(post, np.float32), compression="gzip",
                             chunks=(min(len(post), 1024), post.shape[1]))
            for name, values in summary.items():
                f.create_dataset(name, data=np.asarray(values))
            if metrics is not None:
                f.attrs["metrics"] = json.dumps(metrics)


def posterior_file(model: Any, inputs_path: str | os.PathLike, grid: Any, out: str | os.PathLike,
                   progress: bool = False, edges: Sequence[float] | None = None) -> dict:
    """Posteriors of every row of an inputs file, summaries (+ PIT and metrics if it has truths
    'z'), written to ``out`` (HDF5, atomic). Returns the metrics dict (empty without truths).
    """
    labels, truth = read_inputs(inputs_path)
    g = check_grid(grid)
    post = posterior_grid(model, labels, g, progress=progress)
    summary = summarize(post, g, truth)
    metrics = {}
    if truth is not None:
        metrics = overall_metrics(
            summary, truth, edges if edges is not None else np.linspace(g[0], g[-1], 7)
        )
    write_posteriors(out, g, post, summary, metrics)
    return metrics


def overall_metrics(summary: dict, truth: Any, edges: Sequence[float]) -> dict:
    """MAP metrics overall and per bin, PIT KS distance, 68 % / 95 % HPD coverage."""
    return {
        "map": point_metrics(summary["map"], truth),
        "map_by_bin": metrics_by_bin(summary["map"], truth, edges),
        "pit_ks": pit_ks(summary["pit"]),
        "hpd68_coverage": float(np.mean(summary["hpd_level"] <= 0.68)),
        "hpd95_coverage": float(np.mean(summary["hpd_level"] <= 0.95)),
    }


def compare(post: np.ndarray, exact: np.ndarray, grid: Any, truth: Any,
            edges: Sequence[float]) -> dict:
    """A model's posteriors [N, G] against the exact ones [N, G] (same grid [G]) at known truths
    [N].

    Returns {"flow": ..., "exact": ...} (:func:`overall_metrics` of each), the MAP differences
    "sigma_nmad_rel_diff" = σ_NMAD(flow) / σ_NMAD(exact) - 1 and "eta_diff" = η(flow) - η(exact),
    "bimodal_fraction" (:func:`is_bimodal` of the exact rows), and "kl" = {"mean", "median",
    "bimodal_mean", "bimodal_mode_masses"}: KL(exact ‖ flow) per object (:func:`kl_divergence`,
    nats) over all objects, its mean over the bimodal ones, and the mean over those of its part
    that is the two modes' weights (:func:`mode_mass_kl`; the rest is the modes' shapes); NaN if
    there are no bimodal objects.
    """
    g = check_grid(grid)
    m_flow = overall_metrics(summarize(post, g, truth), truth, edges)
    m_exact = overall_metrics(summarize(exact, g, truth), truth, edges)
    bimodal = is_bimodal(exact, g)
    kl = kl_divergence(exact, post, g)
    return {
        "flow": m_flow,
        "exact": m_exact,
        "sigma_nmad_rel_diff": m_flow["map"]["sigma_nmad"] / m_exact["map"]["sigma_nmad"] - 1.0,
        "eta_diff": m_flow["map"]["eta"] - m_exact["map"]["eta"],
        "bimodal_fraction": float(bimodal.mean()),
        "kl": {"mean": float(kl.mean()), "median": float(np.median(kl)),
               "bimodal_mean": float(kl[bimodal].mean()) if bimodal.any() else math.nan,
               "bimodal_mode_masses": (float(mode_mass_kl(exact[bimodal], post[bimodal], g).mean())
                                       if bimodal.any() else math.nan)},
    }


# ---- figures ------------------------------------------------------------------------------------

def plot_comparison(out_dir: str | os.PathLike, grid: Any, post: np.ndarray, exact: np.ndarray,
                    truth: Any, shown: int = 6) -> list[str]:
    """The four figures of a model's posteriors [N, G] against the exact ones [N, G] at truths
    [N], written into ``out_dir``: zmap_flow.png and zmap_exact.png (MAP against truth), pit.png
    (both PIT histograms), posteriors.png (the first ``shown`` bimodal and ``shown`` unimodal
    objects, :func:`is_bimodal` of the exact rows). Returns the file names.
    """
    from pathlib import Path

    g, out = check_grid(grid), Path(out_dir)
    truth = np.asarray(truth, np.float64)
    plot_map_vs_true(out / "zmap_flow.png", truth, map_estimate(post, g), title="flow MAP")
    plot_map_vs_true(out / "zmap_exact.png", truth, map_estimate(exact, g), title="exact MAP")
    plot_pit(out / "pit.png", {"flow": pit(post, g, truth), "exact": pit(exact, g, truth)})
    bimodal = is_bimodal(exact, g)
    pick = np.concatenate([np.nonzero(bimodal)[0][:shown], np.nonzero(~bimodal)[0][:shown]])
    plot_posteriors(out / "posteriors.png", g, {"exact": exact[pick], "flow": post[pick]},
                    truth[pick])
    return ["zmap_flow.png", "zmap_exact.png", "pit.png", "posteriors.png"]


def plot_map_vs_true(path: str | os.PathLike, z_true: Any, z_map: Any, z_max: float = 3.0,
                     title: str = "") -> None:
    """Scatter/2-D histogram of z_MAP against z_true with the η boundaries |Δz| = 0.15 (1 + z)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.hist2d(
        np.asarray(z_true),
        np.asarray(z_map),
        bins=120,
        range=[[0, z_max], [0, z_max]],
        cmin=1,
        cmap="viridis",
        norm=matplotlib.colors.LogNorm(),
    )
    t = np.linspace(0, z_max, 10)
    ax.plot(t, t, "k-", lw=0.6)
    for s in (1, -1):
        ax.plot(t, t + s * OUTLIER_THRESHOLD * (1 + t), "k--", lw=0.6)
    ax.set(xlabel="z_true", ylabel="z_MAP", xlim=(0, z_max), ylim=(0, z_max), title=title)
    fig.tight_layout()
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_pit(path: str | os.PathLike, pits: dict, bins: int = 40) -> None:
    """PIT histograms {label: [N] values}, normalised (1 = uniform)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, values in pits.items():
        ax.hist(values, bins=bins, range=(0, 1), density=True, histtype="step", label=label)
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set(xlabel="PIT", ylabel="density")
    ax.legend()
    fig.tight_layout()
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_posteriors(
    path: str | os.PathLike, grid: Any, curves: dict, truth: Any, ncols: int = 4
) -> None:
    """Panels of a few posteriors: curves {label: [k, G]} drawn together, the truth [k] as a
    line.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    truth = np.asarray(truth).reshape(-1)
    k = truth.size
    nrows = int(math.ceil(k / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.0 * ncols, 2.2 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= k:
            ax.axis("off")
            continue
        for label, rows in curves.items():
            ax.plot(grid, rows[i], lw=1.0, label=label)
        ax.axvline(truth[i], color="k", ls=":", lw=0.8)
        ax.set_xlabel("z")
        if i == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
