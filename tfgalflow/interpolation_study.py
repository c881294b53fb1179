"""The Dehnen interpolation study: one conditional flow f(x, v | γ, a/r_a) trained on a sparse
label grid, measured at the grid nodes and at held-out labels it never saw (issue #12, item 4).

The FEDHEX use of a conditional flow is to interpolate between distributions on a grid of labels.
Here the family is exact (:mod:`tfgalflow.dehnen`: Dehnen 1993 γ-models with Osipkov–Merritt
anisotropy, labels c = (γ, a/r_a), model units G = M = a = 1), so every number has a truth:

1. ``n_per_node`` stars at every node of ``gammas`` x ``ra_inverses``
   (:func:`tfgalflow.mocks.sample_dehnen_grid`, cut at r < ``star_r_max``) train one flow (or an
   ensemble) with the labels as conditioning inputs (:func:`tfgalflow.training.train`,
   label_dim = 2);
2. at every node and every ``held_out`` label (inside the grid, never trained on):

   * the KL estimate  KL(p || q) = E_p[log p - log q]  over ``n_test`` fresh exact stars, where the
     exact density of the truncated mock is  p = f(x, v | c) / M(< star_r_max)
     (:meth:`tfgalflow.dehnen.Dehnen.log_df`; f integrates to M = 1 over all phase space), so the
     normalisation of the flow is tested too; its Monte Carlo standard error is reported;
   * β(r) = 1 - <v_t²> / (2 <v_r²>) of ``n_beta`` flow samples (``flow.sample(n, labels)``) in
     radial bins against the exact β(r) = r² / (r² + r_a²) (Osipkov 1979; Merritt 1985) at the
     bin's median radius, with the same estimator on the exact stars as the floor set by sampling
     noise and bin width;
   * the CBE accelerations (:func:`tfgalflow.cbe.accelerations`) at ``n_radii`` radii log-spaced in
     [r_min, r_max] x ``n_directions`` random directions (the same positions for every label),
     with the learned DF, with its average over ``rotations`` joint rotations of (x, v)
     (:class:`tfgalflow.symmetry.SphericalAverage`), and with the exact conditional DF
     (:class:`tfgalflow.exact.DehnenFamilyDF`) as the control that isolates the method's error;
     figure of merit the vector fractional error |a - a_true| / |a_true|
     (:func:`tfgalflow.study.fractional_error`, a_true from :meth:`Dehnen.acceleration`, which
     depends on γ only), median over ``summary_range``;
3. probes what the learned model does with bad labels (wrong width, NaN, outside the family's
   valid range, far outside the training grid: ``far_label``) and records the outcome;
4. writes ``report.json`` (per label, per group "grid" / "held_out", the targets side by side),
   the figure data ``interpolation.npz`` and the figures ``accelerations.png``, ``beta.png``,
   ``labels.png`` (atomically).

Resumable: ``runs/flow/`` is continued with :func:`tfgalflow.training.resume` (finished members are
loaded) and each label's evaluation is cached in ``cache/<label>.json``; re-running into the same
directory with the same config only redoes what is missing. Changing only evaluation settings (the
fields declared ``evaluation_only``: held-out labels, positions, velocities, rotations, sample
sizes) measures the trained flow again (the cached evaluations are dropped); a directory trained
with another config is refused (InputError), so cached numbers never mix settings.

References: Dehnen 1993, MNRAS 265, 250; Osipkov 1979; Merritt 1985, AJ 90, 1027; An, Naik, Evans
& Burrage 2021, MNRAS 506, 5721 (the CBE method).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from .atomic import atomic_file, write_json
from .config_fields import (check_keys, coerce_fields, evaluation_only_fields, field_help,
                            option)
from .errors import InputError

#: The issue's targets (report.json "targets"; compared with the measured numbers in "verdict").
TARGETS = {
    "held_out_median_error_symmetrised_max": 0.02,
    "held_out_over_grid_error_ratio_max": 1.5,
    "held_out_over_grid_kl_ratio_max": 1.5,
    "exact_df_control_max": 1e-4,
}

FRACTIONAL_ERROR = "|a - a_true| / |a_true| (vector difference)"
KL_ESTIMATE = ("mean over exact stars of log p - log q, p = f(x, v | c) / M(< star_r_max) the "
               "exact density of the truncated mock, q the flow (nats)")
BETA = "1 - <v_t^2> / (2 <v_r^2>) in radial bins"


@dataclass(frozen=True)
class InterpolationConfig:
    """Sizes, grid and seeds of one interpolation study (model units G = M = a = 1).

    Every field is a flag of ``scripts/dehnen_interpolation_study.py`` (``--n-per-node`` for
    ``n_per_node``; lists as ``0.5,1,1.5``, label pairs as ``0.75:0.25,1.25:0.75``), see
    :meth:`field_help` and :meth:`with_overrides`.
    """

    gammas: tuple = option((0.5, 1.0, 1.5), "inner slopes γ of the training grid", "floats")
    ra_inverses: tuple = option((0.0, 0.5, 1.0), "a/r_a values of the training grid", "floats")
    held_out: tuple = option(((0.75, 0.25), (1.25, 0.75)),
                             "held-out labels γ:a/r_a inside the grid, never trained on", "pairs",
                             evaluation_only=True)
    far_label: tuple = option((2.5, 0.0), "a label far outside the grid, probed for the report "
                                          "(γ,a/r_a)", "floats", evaluation_only=True)
    n_per_node: int = option(40_000, "stars per grid node", "int")
    star_r_max: float = option(100.0, "stars beyond this radius are cut (units of a)", "float")
    layers: int = option(6, "autoregressive layers of the flow", "int")
    hidden: tuple = option((64, 64), "hidden widths of each MADE", "ints")
    epochs: int = option(40, "maximum epochs", "int")
    batch_size: int = option(1024, "points per optimizer step", "int")
    lr: float = option(2e-3, "peak learning rate (cosine schedule)", "float")
    patience: int = option(10, "early-stopping patience (0: never stop)", "int")
    members: int = option(1, "ensemble members", "int")
    activation: str = option("relu", "hidden activation of the MADEs (relu, gelu, tanh, ...: "
                             "smooth ones interpolate between label nodes more smoothly)",
                             "str")
    clip_norm: float = option(0.0, "global gradient-norm clip of the optimizer (0: off; "
                              "TrainConfig.clip_norm)", "float")
    label_noise: float = option(0.0, "σ of the training-label noise in standardised units "
                                "(0: off; TrainConfig.label_noise)", "float")
    ra_inverse_asinh: float = option(
        0.0, "the networks see a/r_a as asinh((a/r_a) / s) with this s (0: off, linear; "
        "TrainConfig.label_asinh 1:s): past r_a an OM model's β(r) depends on r a/r_a, so "
        "s = a / star_r_max spreads the a/r_a scales the stars can see", "float")
    coordinates: str = option("cartesian", "what the flow learns: 'cartesian' (x, v) or "
                              "'spherical' (r, v_r, v_t; TrainConfig.coordinates)", "str")
    n_radii: int = option(16, "radii log-spaced in [r_min, r_max]", "int", evaluation_only=True)
    n_directions: int = option(2, "random directions per radius", "int", evaluation_only=True)
    r_min: float = option(0.1, "smallest evaluation radius (units of a)", "float",
                          evaluation_only=True)
    r_max: float = option(10.0, "largest evaluation radius (units of a)", "float",
                          evaluation_only=True)
    n_velocities: int = option(256, "velocities K per position of the CBE solve", "int",
                               evaluation_only=True)
    rotations: int = option(32, "rotations M of the spherical average (0: off)", "int",
                            evaluation_only=True)
    summary_range: tuple = option((0.2, 5.0), "radius range of the medians (units of a)",
                                  "floats", evaluation_only=True)
    n_test: int = option(20_000, "exact stars per label for the KL estimate", "int",
                         evaluation_only=True)
    n_beta: int = option(20_000, "flow samples per label for β(r)", "int", evaluation_only=True)
    beta_bins: int = option(8, "radial bins of β(r), log-spaced in [r_min, r_max]", "int",
                            evaluation_only=True)
    seed: int = option(0, "seed of mocks, training, positions and rotations", "int")

    def __post_init__(self) -> None:
        from .coordinates import COORDINATES
        from .dehnen import check_label

        coerce_fields(self)
        if self.coordinates not in COORDINATES:
            raise InputError(f"InterpolationConfig.coordinates = {self.coordinates!r}: expected "
                             f"one of {', '.join(COORDINATES)}")
        if not self.activation:
            raise InputError("InterpolationConfig.activation is empty: expected an activation "
                             "name, e.g. gelu")
        for name in ("n_per_node", "layers", "epochs", "batch_size", "members", "n_radii",
                     "n_directions", "n_velocities", "n_test", "n_beta", "beta_bins"):
            if getattr(self, name) < 1:
                raise InputError(f"InterpolationConfig.{name} = {getattr(self, name)}: expected "
                                 f">= 1")
        if self.rotations < 0 or self.patience < 0 or self.seed < 0 or self.clip_norm < 0 \
                or self.label_noise < 0 or self.ra_inverse_asinh < 0:
            raise InputError("InterpolationConfig.rotations, patience, seed, clip_norm, "
                             "label_noise and ra_inverse_asinh must be >= 0")
        if not 0 < self.r_min < self.r_max or len(self.summary_range) != 2 \
                or not self.summary_range[0] < self.summary_range[1]:
            raise InputError(f"need 0 < r_min < r_max and summary_range = (lo, hi) with lo < hi; "
                             f"got {self.r_min}, {self.r_max}, {self.summary_range}")
        if len(self.far_label) != 2:
            raise InputError(f"InterpolationConfig.far_label = {self.far_label}: expected "
                             f"(γ, a/r_a)")
        for g, k in self.grid_labels + self.held_out:
            check_label(g, k)          # InputError naming the limit a/r_a <= max_ra_inverse(γ)
        for g, k in self.held_out:
            if not (min(self.gammas) <= g <= max(self.gammas)
                    and min(self.ra_inverses) <= k <= max(self.ra_inverses)):
                raise InputError(f"held-out label ({g}, {k}) lies outside the training grid "
                                 f"γ in [{min(self.gammas)}, {max(self.gammas)}], a/r_a in "
                                 f"[{min(self.ra_inverses)}, {max(self.ra_inverses)}]")
            if (g, k) in self.grid_labels:
                raise InputError(f"held-out label ({g}, {k}) is a grid node")

    @property
    def grid_labels(self) -> tuple:
        """The training nodes ((γ, a/r_a), ...), row-major over gammas (as sample_dehnen_grid)."""
        return tuple((g, k) for g in self.gammas for k in self.ra_inverses)

    def train_config(self) -> Any:
        """The :class:`~tfgalflow.training.TrainConfig` of the flow (label_dim = 2)."""
        from .training import TrainConfig

        return TrainConfig(layers=self.layers, hidden=self.hidden, epochs=self.epochs,
                           batch_size=self.batch_size, lr=self.lr, lr_schedule="cosine",
                           patience=self.patience, members=self.members, label_dim=2,
                           validation_split=0.1, seed=self.seed, coordinates=self.coordinates,
                           activation=self.activation, clip_norm=self.clip_norm or None,
                           label_noise=self.label_noise,
                           label_asinh=((1, self.ra_inverse_asinh),) if self.ra_inverse_asinh
                           else ())

    @classmethod
    def tiny(cls) -> "InterpolationConfig":
        """A seconds-sized config for tests: 2 x 2 grid, one held-out label, a 1-layer flow."""
        return cls(gammas=(0.5, 1.5), ra_inverses=(0.0, 1.0), held_out=((1.0, 0.5),),
                   n_per_node=400, layers=1, hidden=(8,), epochs=1, batch_size=256, patience=0,
                   n_radii=3, n_directions=1, r_min=0.3, r_max=3.0, n_velocities=32,
                   rotations=2, n_test=200, n_beta=200, beta_bins=2)

    # -- serialisation and overrides ----------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-ready dict (tuples as lists); the inverse of :meth:`from_dict`."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "InterpolationConfig":
        """A config from :meth:`to_dict`'s output; unknown keys: InputError naming them."""
        check_keys(cls, d)
        return cls(**dict(d))

    def with_overrides(self, **overrides: Any) -> "InterpolationConfig":
        """A copy with fields replaced; values may be text as on the command line
        (``gammas="0.5,1,1.5"``, ``held_out="0.75:0.25,1.25:0.75"``).
        """
        check_keys(InterpolationConfig, overrides, "InterpolationConfig.with_overrides")
        return dataclasses.replace(self, **overrides)

    @classmethod
    def field_help(cls) -> dict[str, tuple[str, str]]:
        """{field: (kind, help)} for building command-line flags."""
        return field_help(cls)


# ---- positions, labels, per-label evaluation ----------------------------------------------------


def evaluation_positions(config: InterpolationConfig) -> np.ndarray:
    """Positions [n_radii * n_directions, 3]: radii log-spaced in [r_min, r_max], each along
    ``n_directions`` random (seeded) directions; the same for every label.
    """
    rng = np.random.default_rng(config.seed + 12345)
    radii = np.repeat(np.geomspace(config.r_min, config.r_max, config.n_radii),
                      config.n_directions)
    directions = rng.normal(size=(radii.size, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return radii[:, None] * directions


def label_name(label: tuple[float, float]) -> str:
    """A file-safe name of a label (γ, a/r_a), e.g. 'g0.75_k0.25'."""
    return f"g{label[0]:g}_k{label[1]:g}"


def beta_profile(pos: np.ndarray, vel: np.ndarray, edges: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """β = 1 - <v_t²> / (2 <v_r²>) per radial bin of ``edges`` [B + 1] for stars pos, vel [N, 3].

    Returns (median radius [B], β [B], stars per bin [B]); NaN where a bin holds < 10 stars.
    """
    r = np.linalg.norm(pos, axis=1)
    v_r = np.sum(vel * pos, axis=1) / r
    v_t2 = np.sum(vel**2, axis=1) - v_r**2
    which = np.digitize(r, edges) - 1
    mid, beta, count = [], [], []
    for b in range(len(edges) - 1):
        sel = which == b
        n = int(sel.sum())
        count.append(n)
        mid.append(float(np.median(r[sel])) if n else float(np.sqrt(edges[b] * edges[b + 1])))
        beta.append(1.0 - np.mean(v_t2[sel]) / (2.0 * np.mean(v_r[sel] ** 2)) if n >= 10
                    else np.nan)
    return np.asarray(mid), np.asarray(beta), np.asarray(count)


def evaluated_labels(config: InterpolationConfig) -> list[tuple[str, tuple[float, float]]]:
    """[(group, label), ...] in the study's evaluation order: the nodes ("grid"), then the
    held-out labels. A label's place in it seeds its exact stars (:func:`_kl_stars`).
    """
    return [("grid", lab) for lab in config.grid_labels] + [
        ("held_out", lab) for lab in config.held_out]


def _kl_stars(flow: Any, label: tuple[float, float], config: InterpolationConfig,
              index: int) -> tuple[int, Any, np.ndarray]:
    """(seed, exact stars, ln p - ln q [n_test]) of the KL estimate at the ``index``-th label of
    :func:`evaluated_labels`: ``n_test`` stars of the truncated mock, seeded by the index.
    """
    from .mocks import sample_dehnen

    seed = config.seed + 7919 * (index + 1)
    test = sample_dehnen(config.n_test, *label, seed=seed, r_max=config.star_r_max)
    return seed, test, log_density_gap(flow, label, test.pos, test.vel, config.star_r_max)


def log_density_gap(density: Any, label: tuple[float, float], pos: np.ndarray, vel: np.ndarray,
                    r_max: float) -> np.ndarray:
    """log p - log q [N] at stars pos, vel [N, 3] of the Dehnen model ``label`` cut at r < r_max.

    p = f(x, v | c) / M(< r_max) is the exact density of the truncated mock (f integrates to
    M = 1 over all phase space), q = ``density.log_prob(w, c)``; the mean over exact stars is the
    Monte Carlo estimate of KL(p || q) >= 0.
    """
    from .dehnen import Dehnen

    model = Dehnen(*label)
    log_p = model.log_df(pos, vel) - math.log(float(model.enclosed_mass(r_max)))
    w = np.concatenate([pos, vel], axis=1).astype(np.float32)
    c = np.tile(np.asarray(label, np.float32), (len(w), 1))
    return log_p - np.asarray(density.log_prob(w, c), np.float64)


def kl_by_shell(delta: np.ndarray, r_p: np.ndarray, r_q: np.ndarray, edges: Any) -> dict:
    """Split a KL estimate over radial shells by the chain rule of relative entropy.

    With shells S_j = [edges[j], edges[j+1]) covering the support of p, P_j and Q_j the masses of p
    and q in S_j, and p_j, q_j the densities conditioned on S_j,

        KL(p || q) = Σ_j P_j ln(P_j / Q_j) + Σ_j P_j KL(p_j || q_j),
        KL(p_j || q_j) = E_{p_j}[ln p - ln q] - ln(P_j / Q_j)

    (Cover & Thomas 2006, §2.5): the first term is what q gets wrong about *how many* stars lie in
    each shell, the second what it gets wrong *within* each shell, and every term is >= 0 up to
    Monte Carlo error. With P_j from the exact stars (the same ones as the total) the terms add up
    to the sample mean of ``delta`` exactly. q's mass outside the shells (flow samples beyond the
    last edge) is ``q_outside``; it enters through Σ Q_j = 1 - q_outside.

    Args:
        delta: ln p - ln q [N] at N exact stars (:func:`log_density_gap`).
        r_p: radii [N] of those stars.
        r_q: radii [M] of M samples of q (the flow).
        edges: shell edges [J + 1], increasing; p must have no mass outside [edges[0], edges[-1]).

    Returns:
        JSON-ready dict: edges, p_mass and q_mass [J], q_outside, kl_masses (the first sum),
        kl_within [J] (KL(p_j || q_j)), kl_within_stderr [J] (from the spread of ``delta`` in the
        shell and the binomial errors of P_j and Q_j), contribution [J] (P_j KL(p_j || q_j)) and
        kl (the sample mean of ``delta``). A shell with exact stars but no sample of q cannot be
        split (kl_masses is inf, that shell's kl_within, its error and contribution NaN): take
        more samples of q or wider shells.
    """
    delta, r_p, r_q = (np.asarray(a, np.float64) for a in (delta, r_p, r_q))
    edges = _shell_edges(edges)
    if delta.shape != r_p.shape:
        raise InputError(f"delta {list(delta.shape)} and r_p {list(r_p.shape)} differ in shape")
    which_p = np.digitize(r_p, edges) - 1
    if np.any((which_p < 0) | (which_p >= edges.size - 1)):
        raise InputError(f"{int(np.sum((which_p < 0) | (which_p >= edges.size - 1)))} exact "
                         f"stars lie outside the shells [{edges[0]:g}, {edges[-1]:g})")
    which_q = np.digitize(r_q, edges) - 1
    n, m, shells = r_p.size, r_q.size, edges.size - 1
    p_mass = np.bincount(which_p, minlength=shells)[:shells] / n
    inside_q = (which_q >= 0) & (which_q < shells)
    q_mass = np.bincount(which_q[inside_q], minlength=shells) / m
    within, stderr = np.full(shells, np.nan), np.full(shells, np.nan)
    with np.errstate(divide="ignore"):
        log_ratio = np.log(p_mass) - np.log(q_mass)
    for j in np.flatnonzero((p_mass > 0) & (q_mass > 0)):
        d = delta[which_p == j]
        within[j] = d.mean() - log_ratio[j]
        var_ratio = (1 - p_mass[j]) / (n * p_mass[j]) + (1 - q_mass[j]) / (m * q_mass[j])
        stderr[j] = math.sqrt(d.var() / d.size + var_ratio)
    occupied = p_mass > 0
    kl_masses = float(np.sum(p_mass[occupied] * log_ratio[occupied]))
    contribution = np.where(occupied, p_mass * within, 0.0)
    return {
        "edges": edges.tolist(), "p_mass": p_mass.tolist(), "q_mass": q_mass.tolist(),
        "q_outside": float(1.0 - inside_q.mean()), "kl_masses": kl_masses,
        "kl_within": within.tolist(), "kl_within_stderr": stderr.tolist(),
        "contribution": contribution.tolist(), "kl": float(delta.mean()),
    }


def _shell_edges(edges: Any) -> np.ndarray:
    """``edges`` as float64 [J + 1], or InputError unless at least two increasing radii."""
    edges = np.asarray(edges, np.float64)
    if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise InputError(f"edges {edges.tolist()}: expected at least two increasing radii")
    return edges


def kl_by_radius(flow: Any, label: tuple[float, float], config: InterpolationConfig,
                 index: int, edges: Any, n_flow: int = 40_000) -> dict:
    """The study's KL estimate at ``label`` split over radial shells (:func:`kl_by_shell`), with
    β of the flow's samples and of the exact stars per shell against the exact β.

    The exact stars are those of :func:`evaluate_label` for the same ``index`` (the label's place
    in the study's order: nodes, then held-out labels), so ``kl`` equals the report's KL; the
    flow's shell masses come from ``n_flow`` of its samples at the label.

    Returns:
        the :func:`kl_by_shell` dict plus label, r_median [J] (median radius of the exact stars
        per shell), beta_flow, beta_exact_stars and beta_exact [J] (at r_median).
    """
    from .dehnen import Dehnen

    edges = np.asarray(edges, np.float64)
    seed, test, delta = _kl_stars(flow, label, config, index)
    sample = np.asarray(flow.sample(n_flow, np.asarray(label, np.float32), seed=seed + 2),
                        np.float64)
    out = kl_by_shell(delta, np.linalg.norm(test.pos, axis=1),
                      np.linalg.norm(sample[:, :3], axis=1), edges)
    r_mid, beta_stars, _ = beta_profile(test.pos, test.vel, edges)
    _, beta_flow, _ = beta_profile(sample[:, :3], sample[:, 3:], edges)
    return {"label": list(label), **out, "r_median": r_mid.tolist(),
            "beta_flow": beta_flow.tolist(), "beta_exact_stars": beta_stars.tolist(),
            "beta_exact": np.asarray(Dehnen(*label).beta(r_mid), np.float64).tolist()}


def evaluate_label(flow: Any, label: tuple[float, float], config: InterpolationConfig,
                   positions: np.ndarray, symmetrised: Any = None, index: int = 0) -> dict:
    """Every figure of merit of the flow at one label (module docstring, step 2), JSON-ready."""
    from .cbe import accelerations
    from .dehnen import Dehnen
    from .exact import DehnenFamilyDF
    from .study import fractional_error

    model = Dehnen(*label)
    c = np.asarray(label, np.float32)
    radii = np.linalg.norm(positions, axis=1)
    lo, hi = config.summary_range
    in_range = (radii >= lo) & (radii <= hi)

    # KL(p || q) over exact stars of the truncated mock
    seed, test, delta = _kl_stars(flow, label, config, index)
    test_r = np.linalg.norm(test.pos, axis=1)
    test_in = (test_r >= lo) & (test_r <= hi)

    # beta(r): flow samples vs exact beta(r), exact stars as the noise / binning floor
    edges = np.geomspace(config.r_min, config.r_max, config.beta_bins + 1)
    sample = np.asarray(flow.sample(config.n_beta, c, seed=seed + 1), np.float64)
    r_mid, beta_flow, n_flow = beta_profile(sample[:, :3], sample[:, 3:], edges)
    _, beta_stars, _ = beta_profile(test.pos, test.vel, edges)
    beta_true = model.beta(r_mid)
    beta_in = (r_mid >= lo) & (r_mid <= hi) & np.isfinite(beta_flow)
    stars_in = (r_mid >= lo) & (r_mid <= hi) & np.isfinite(beta_stars)

    # CBE accelerations: learned, rotation average, exact-DF control
    a_true = model.acceleration(positions)
    t0 = time.perf_counter()
    res = accelerations(flow, positions, n_velocities=config.n_velocities, seed=config.seed,
                        labels=c)
    err = fractional_error(res.acceleration, a_true)
    exact = accelerations(DehnenFamilyDF(), positions, n_velocities=config.n_velocities,
                          seed=config.seed, labels=c)
    err_exact = fractional_error(exact.acceleration, a_true)
    out = {
        "label": list(label), "max_ra_inverse": _max_ra_inverse(label[0]),
        "kl": float(np.mean(delta)), "kl_stderr": float(np.std(delta) / math.sqrt(len(delta))),
        "rms_log_density_error": float(np.sqrt(np.mean(delta**2))),
        "kl_in_range": float(np.mean(delta[test_in])),
        "beta": {"r": r_mid.tolist(), "flow": beta_flow.tolist(),
                 "exact_stars": beta_stars.tolist(), "exact": beta_true.tolist(),
                 "flow_samples_per_bin": n_flow.tolist()},
        "beta_max_abs_error": _max_or_nan(np.abs(beta_flow - beta_true)[beta_in]),
        "beta_max_abs_error_exact_stars": _max_or_nan(np.abs(beta_stars - beta_true)[stars_in]),
        "median_fractional_error": float(np.nanmedian(err[in_range])),
        "median_fractional_error_exact_df": float(np.nanmedian(err_exact[in_range])),
        "max_fractional_error_exact_df": float(np.nanmax(err_exact[in_range])),
        "flagged": int(np.sum(res.flagged)), "flagged_exact_df": int(np.sum(exact.flagged)),
        "per_position": {"r": radii.tolist(), "fractional_error": err.tolist(),
                         "fractional_error_exact_df": err_exact.tolist()},
    }
    if symmetrised is not None:
        sym = accelerations(symmetrised, positions, n_velocities=config.n_velocities,
                            seed=config.seed, labels=c)
        err_sym = fractional_error(sym.acceleration, a_true)
        out["median_fractional_error_symmetrised"] = float(np.nanmedian(err_sym[in_range]))
        out["flagged_symmetrised"] = int(np.sum(sym.flagged))
        out["per_position"]["fractional_error_symmetrised"] = err_sym.tolist()
    out["cbe_seconds"] = time.perf_counter() - t0
    return out


def _max_ra_inverse(gamma: float) -> float | None:
    from .dehnen import max_ra_inverse

    limit = max_ra_inverse(gamma)
    return None if math.isinf(limit) else float(limit)


def _max_or_nan(values: np.ndarray) -> float:
    return float(np.max(values)) if values.size else math.nan


# ---- bad labels ---------------------------------------------------------------------------------


def probe_bad_labels(flow: Any, config: InterpolationConfig) -> list[dict]:
    """What the learned model does today with bad labels: one row per case and call.

    Cases: wrong width [N, 3], NaN, γ outside the family's [0, 3), a/r_a beyond the family's
    f >= 0 limit, and ``far_label`` (valid for the family, far outside the training grid). Calls:
    ``flow.log_prob``, ``cbe.accelerations`` with the flow (and, for the far label, the exact DF,
    so the learned acceleration there can be compared with the truth). Each row records
    ``outcome`` = "InputError" (clear refusal), "returned" (numbers, with ``flagged`` positions),
    or another exception type (a crash), with its message.
    """
    from .cbe import accelerations
    from .dehnen import Dehnen, max_ra_inverse
    from .study import fractional_error

    x = np.array([[1.0, 0.0, 0.0, 0.0, 0.3, 0.0], [0.0, 2.0, 0.0, 0.2, 0.0, 0.1]], np.float32)
    positions = evaluation_positions(config)
    radii = np.linalg.norm(positions, axis=1)
    in_range = (radii >= config.summary_range[0]) & (radii <= config.summary_range[1])
    g_far, k_far = config.far_label
    cases = {
        "wrong_width": np.array([1.0, 0.0, 0.0], np.float32),
        "nan": np.array([np.nan, 0.0], np.float32),
        "gamma_outside_family": np.array([3.5, 0.0], np.float32),
        "ra_inverse_beyond_f_positive": np.array(
            [1.0, 1.5 * max_ra_inverse(1.0)], np.float32),
        "far_outside_grid": np.array([g_far, k_far], np.float32),
    }
    rows = []
    for case, c in cases.items():
        for call in ("log_prob", "accelerations"):
            row: dict[str, Any] = {"case": case, "label": [float(v) for v in c], "call": call}
            try:
                if call == "log_prob":
                    value = np.asarray(flow.log_prob(x, np.tile(c, (len(x), 1))))
                    row["value"] = [float(v) for v in value]
                else:
                    res = accelerations(flow, positions, n_velocities=config.n_velocities,
                                        seed=config.seed, labels=c)
                    row["flagged"] = int(np.sum(res.flagged))
                    row["positions"] = len(positions)
                    if case == "far_outside_grid":
                        err = fractional_error(res.acceleration,
                                               Dehnen(g_far, k_far).acceleration(positions))
                        row["median_fractional_error"] = float(np.nanmedian(err[in_range]))
                row["outcome"] = "returned"
            except InputError as exc:
                row.update(outcome="InputError", message=str(exc))
            except Exception as exc:  # noqa: BLE001 - the probe records crashes, it must not crash
                row.update(outcome=type(exc).__name__, message=str(exc)[:300])
            rows.append(row)
    return rows


# ---- the study ----------------------------------------------------------------------------------


def run_interpolation_study(config: InterpolationConfig, out_dir: str | os.PathLike,
                            log: Callable[[str], None] = print, verbose: int = 2) -> dict:
    """Run (or continue) the study into ``out_dir``; returns the report (also ``report.json``).

    Raises InputError if ``out_dir`` holds a study with a different config.
    """
    from .mocks import sample_dehnen_grid
    from .symmetry import SphericalAverage
    from .training import resume, train

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "study_config.json"
    if config_path.exists():
        # fields added since that study ran take their defaults (what it ran with)
        previous = InterpolationConfig.from_dict(json.loads(config_path.read_text())).to_dict()
        current = config.to_dict()
        changed = sorted(k for k in set(previous) | set(current)
                         if previous.get(k) != current.get(k))
        evaluation = evaluation_only_fields(InterpolationConfig)
        training = [k for k in changed if k not in evaluation]
        if training:
            raise InputError(f"{out} holds a study with another config (fields {training} "
                             f"differ); use a new --out or the same settings (only the "
                             f"evaluation settings {sorted(evaluation)} may change)")
        if changed:
            # the cached evaluations were measured with the old settings: drop them before the
            # new config is recorded, so a kill in between never pairs old numbers with it
            log(f"evaluation settings {changed} changed: the trained flow is measured again")
            shutil.rmtree(out / "cache", ignore_errors=True)
    write_json(config_path, config.to_dict())
    (out / ".gitignore").write_text("runs/\ncache/\n")

    t0 = time.perf_counter()
    cat = sample_dehnen_grid(config.gammas, config.ra_inverses, config.n_per_node,
                             seed=config.seed, r_max=config.star_r_max)
    run_dir = out / "runs" / "flow"
    log(f"{len(cat)} stars on {len(config.grid_labels)} nodes; training {run_dir}")
    if (run_dir / "config.json").exists():
        flow = resume(run_dir, data=cat, verbose=verbose)
    else:
        flow = train(cat, config.train_config(), run_dir, verbose=verbose)
    train_seconds = time.perf_counter() - t0
    log(f"trained/loaded in {train_seconds:.0f} s")

    positions = evaluation_positions(config)
    sym = (SphericalAverage(flow, config.rotations, seed=config.seed) if config.rotations
           else None)
    labels = evaluated_labels(config)
    results = {}
    for i, (group, label) in enumerate(labels):
        name = label_name(label)
        cached = out / "cache" / f"{name}.json"
        if cached.exists():
            results[name] = json.loads(cached.read_text())
            log(f"[{name}] cached")
            continue
        r = evaluate_label(flow, label, config, positions, sym, index=i)
        r["group"] = group
        write_json(cached, r)
        results[name] = r
        log(f"[{name}] ({group}) KL {r['kl']:.4f} ± {r['kl_stderr']:.4f} nats; median |da|/|a| "
            f"{r['median_fractional_error']:.2%}"
            + (f", {config.rotations} rotations {r['median_fractional_error_symmetrised']:.2%}"
               if sym is not None else "")
            + f"; exact DF {r['median_fractional_error_exact_df']:.1e}; max |Δβ| "
              f"{r['beta_max_abs_error']:.3f} (exact stars "
              f"{r['beta_max_abs_error_exact_stars']:.3f})"
              f"; {r['cbe_seconds']:.0f} s")

    probes_path = out / "cache" / "bad_labels.json"
    if probes_path.exists():
        probes = json.loads(probes_path.read_text())
    else:
        probes = probe_bad_labels(flow, config)
        write_json(probes_path, probes)
    report = build_report(config, results, probes, n_stars=len(cat))
    save_figure_data(out / "interpolation.npz", config, results)
    render(out / "interpolation.npz")
    write_json(out / "report.json", report)
    return report


def _pooled_median(results: dict, group: str, key: str, lo: float, hi: float) -> float:
    """Median of per-position errors ``key`` over r in [lo, hi], pooled over a group's labels."""
    values = []
    for r in results.values():
        if r["group"] == group and key in r["per_position"]:
            rr = np.asarray(r["per_position"]["r"])
            values.append(np.asarray(r["per_position"][key])[(rr >= lo) & (rr <= hi)])
    return float(np.nanmedian(np.concatenate(values))) if values else math.nan


def build_report(config: InterpolationConfig, results: dict, probes: list[dict],
                 n_stars: int) -> dict:
    """report.json: per-label numbers, per-group aggregates, targets and verdicts side by side."""
    lo, hi = config.summary_range
    groups = {}
    for group in ("grid", "held_out"):
        rows = [r for r in results.values() if r["group"] == group]
        g = {"labels": [r["label"] for r in rows],
             "kl_mean": float(np.mean([r["kl"] for r in rows])),
             "kl_max": float(np.max([r["kl"] for r in rows])),
             "beta_max_abs_error": _max_or_nan(np.array(
                 [r["beta_max_abs_error"] for r in rows
                  if math.isfinite(r["beta_max_abs_error"])])),
             "median_fractional_error": _pooled_median(results, group, "fractional_error", lo,
                                                       hi),
             "exact_df_control_max": float(np.max([r["median_fractional_error_exact_df"]
                                                   for r in rows]))}
        if config.rotations:
            g["median_fractional_error_symmetrised"] = _pooled_median(
                results, group, "fractional_error_symmetrised", lo, hi)
        groups[group] = g
    grid, held = groups["grid"], groups["held_out"]
    # A SphericalDF (coordinates = 'spherical') is rotation-invariant: its average over any
    # rotations is itself, so its error is the rotation-averaged error.
    invariant = config.coordinates == "spherical" and not config.rotations
    measured = {
        "held_out_median_error_symmetrised": held.get(
            "median_fractional_error_symmetrised",
            held["median_fractional_error"] if invariant else None),
        "held_out_over_grid_error_ratio": held["median_fractional_error"]
        / grid["median_fractional_error"],
        "held_out_over_grid_kl_ratio": held["kl_mean"] / grid["kl_mean"],
        "exact_df_control": max(grid["exact_df_control_max"], held["exact_df_control_max"]),
    }
    if config.rotations:
        measured["held_out_over_grid_error_ratio_symmetrised"] = (
            held["median_fractional_error_symmetrised"]
            / grid["median_fractional_error_symmetrised"])
    sym_ratio = measured.get("held_out_over_grid_error_ratio_symmetrised",
                             measured["held_out_over_grid_error_ratio"])
    verdict = {
        "held_out_median_error_symmetrised": (
            measured["held_out_median_error_symmetrised"] is not None
            and measured["held_out_median_error_symmetrised"]
            <= TARGETS["held_out_median_error_symmetrised_max"]),
        "held_out_over_grid_error_ratio": bool(
            sym_ratio <= TARGETS["held_out_over_grid_error_ratio_max"]),
        "held_out_over_grid_kl_ratio": bool(
            measured["held_out_over_grid_kl_ratio"] <= TARGETS["held_out_over_grid_kl_ratio_max"]),
        "exact_df_control": bool(measured["exact_df_control"] <= TARGETS["exact_df_control_max"]),
    }
    return {
        "config": config.to_dict(), "n_stars": n_stars,
        "definitions": {"fractional_error": FRACTIONAL_ERROR, "kl": KL_ESTIMATE, "beta": BETA,
                        "median": f"median over positions with {lo} <= r/a <= {hi}, pooled over "
                                  f"a group's labels",
                        "error_ratio": "held-out over grid median fractional error, with the "
                                       "rotation average when rotations > 0"},
        "targets": TARGETS, "measured": measured, "verdict": verdict, "groups": groups,
        "labels": {name: {k: v for k, v in r.items() if k != "per_position"}
                   for name, r in results.items()},
        "bad_labels": probes,
    }


def load_report(out_dir: str | os.PathLike) -> dict:
    """Read ``report.json`` of a finished study."""
    return json.loads((Path(out_dir) / "report.json").read_text())


#: Default inner shell edges of :func:`radial_kl_report` (units of a; star_r_max closes the last).
KL_SHELL_EDGES = (0.0, 0.2, 1.0, 5.0, 10.0, 20.0, 50.0)


def radial_kl_report(out_dir: str | os.PathLike, edges: Any = KL_SHELL_EDGES,
                     n_flow: int = 40_000, extra_labels: Any = (),
                     log: Callable[[str], None] = print) -> dict:
    """Split the KL estimate of every label of a trained study over radial shells.

    Reads ``study_config.json`` and the trained flow ``runs/flow`` of the study in ``out_dir``,
    runs :func:`kl_by_radius` at its nodes and held-out labels (the study's exact stars, so each
    total equals its report's KL) and writes ``kl_by_radius.json`` and ``kl_by_radius.png``
    (KL(p_j || q_j) and β against radius, nodes vs held-out labels) atomically. ``edges`` are the
    inner shell edges; star_r_max closes the last shell. ``extra_labels`` [(γ, a/r_a), ...] are
    measured too (group "extra", fresh exact stars): more labels the flow never saw, e.g. every
    cell centre of the grid.

    Raises InputError if the study has no trained flow.
    """
    from .dehnen import check_label
    from .training import load_run

    out = Path(out_dir)
    config_path, run_dir = out / "study_config.json", out / "runs" / "flow"
    if not config_path.exists() or not (run_dir / "config.json").exists():
        raise InputError(f"{out}: no trained study (study_config.json and runs/flow); run "
                         f"scripts/dehnen_interpolation_study.py --out {out} first")
    config = InterpolationConfig.from_dict(json.loads(config_path.read_text()))
    shells = _shell_edges([float(e) for e in edges if float(e) < config.star_r_max]
                          + [config.star_r_max])
    labels = evaluated_labels(config) + [
        ("extra", tuple(float(v) for v in lab)) for lab in extra_labels]
    for group, (g, k) in labels:
        if group == "extra":
            check_label(g, k)           # InputError naming the limit a/r_a <= max_ra_inverse(γ)
    names = [label_name(label) for _, label in labels]
    if len(set(names)) < len(names):
        raise InputError(f"extra labels {[list(lab) for lab in extra_labels]}: each must differ "
                         f"from the others and from the study's nodes and held-out labels")
    flow = load_run(run_dir)
    rows = {}
    for i, ((group, label), name) in enumerate(zip(labels, names)):
        r = kl_by_radius(flow, label, config, index=i, edges=shells, n_flow=n_flow)
        r["group"] = group
        rows[name] = r
        log(f"[{name}] ({group}) KL {r['kl']:.4f} = masses {r['kl_masses']:+.4f} "
            + " ".join(f"{c:+.4f}" for c in r["contribution"]))
    report = {
        "definitions": {
            "kl_within": "KL(p_j || q_j) of the densities conditioned on shell j (nats)",
            "contribution": "P_j KL(p_j || q_j); kl = kl_masses + sum of contributions",
            "kl_masses": "sum_j P_j ln(P_j / Q_j): the shell masses' share of the KL",
        },
        "n_flow_samples": n_flow, "labels": rows,
    }
    write_json(out / "kl_by_radius.json", report)
    _render_radial_kl(rows, out / "kl_by_radius.png", config.summary_range)
    return report


def _render_radial_kl(rows: dict, path: Path, summary_range: Any) -> None:
    """kl_by_radius.png: KL(p_j || q_j) against the shells' median radius (nodes grey, held-out
    labels bold, extra labels dashed) and β of the held-out labels' flow samples vs exact.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    ax_kl, ax_beta = fig.subplots(1, 2)
    styles = {"grid": dict(lw=0.8, alpha=0.5, color="0.5"),
              "held_out": dict(lw=2.0, marker="o"),
              "extra": dict(lw=1.2, ls="--", marker=".")}
    for r in rows.values():
        held = r["group"] == "held_out"
        name = (None if r["group"] == "grid"
                else f"({r['label'][0]:.3g}, {r['label'][1]:.3g})"
                + (" extra" if r["group"] == "extra" else ""))
        ax_kl.plot(r["r_median"], r["kl_within"], label=name, **styles[r["group"]])
        if held:
            line, = ax_beta.plot(r["r_median"], r["beta_flow"], marker="o", label=f"flow {name}")
            ax_beta.plot(r["r_median"], r["beta_exact"], ls="--", color=line.get_color(),
                         label=f"exact {name}")
    ax_kl.plot([], [], color="0.5", lw=0.8, label="grid nodes")
    for ax in (ax_kl, ax_beta):
        ax.set_xscale("log")
        ax.set_xlabel("r / a (median of the shell)")
        ax.axvspan(*summary_range, color="0.9", zorder=0)
    ax_kl.set_yscale("symlog", linthresh=0.01)
    ax_kl.set_ylabel("KL within the shell (nats)")
    ax_beta.set_ylabel("β = 1 − <v_t²> / 2<v_r²>")
    ax_kl.legend(fontsize=7, ncol=2)
    ax_beta.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


# ---- figures ------------------------------------------------------------------------------------


def save_figure_data(path: str | os.PathLike, config: InterpolationConfig, results: dict) -> Path:
    """``interpolation.npz``: labels [L, 2], held_out [L] bool, r [P], error_learned,
    error_symmetrised (if rotations), error_exact_df [L, P], beta_r, beta_flow, beta_exact_stars,
    beta_exact [L, B], kl [L], summary_range [2], rotations (0-d).
    """
    rows = list(results.values())
    arrays = {
        "labels": np.array([r["label"] for r in rows]),
        "held_out": np.array([r["group"] == "held_out" for r in rows]),
        "r": np.asarray(rows[0]["per_position"]["r"]),
        "error_learned": np.array([r["per_position"]["fractional_error"] for r in rows]),
        "error_exact_df": np.array([r["per_position"]["fractional_error_exact_df"]
                                    for r in rows]),
        "beta_r": np.array([r["beta"]["r"] for r in rows]),
        "beta_flow": np.array([r["beta"]["flow"] for r in rows]),
        "beta_exact_stars": np.array([r["beta"]["exact_stars"] for r in rows]),
        "beta_exact": np.array([r["beta"]["exact"] for r in rows]),
        "kl": np.array([r["kl"] for r in rows]),
        "summary_range": np.asarray(config.summary_range),
        "rotations": np.asarray(config.rotations),
    }
    if config.rotations:
        arrays["error_symmetrised"] = np.array(
            [r["per_position"]["fractional_error_symmetrised"] for r in rows])
    path = Path(path)
    with atomic_file(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)
    return path


def _per_radius_median(r: np.ndarray, err: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median of err [P] over the directions at each radius (radii equal to round-off)."""
    radii, which = np.unique(np.round(r, 9), return_inverse=True)
    return radii, np.array([np.nanmedian(err[which == i]) for i in range(len(radii))])


def _save(fig: Any, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")


def render(data_path: str | os.PathLike) -> list[Path]:
    """Draw accelerations.png, beta.png and labels.png beside ``interpolation.npz``."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    data_path = Path(data_path)
    with np.load(data_path) as npz:
        d = {k: npz[k] for k in npz.files}
    out = data_path.parent
    names = [f"({g:g}, {k:g})" for g, k in d["labels"]]
    lo, hi = d["summary_range"]
    held = d["held_out"]

    # accelerations.png: error against r, grid nodes vs held-out labels, with / without rotations
    panels = [("error_learned", "learned DF")]
    if "error_symmetrised" in d:
        panels.append(("error_symmetrised", f"averaged over {int(d['rotations'])} rotations"))
    fig = Figure(figsize=(5.2 * len(panels), 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, (key, title) in zip(axes, panels):
        held_colour = iter(f"C{i}" for i in range(1, 10))
        grid_label = "grid nodes"
        for i, name in enumerate(names):
            radii, med = _per_radius_median(d["r"], d[key][i])
            if held[i]:
                ax.plot(radii, med, "o-", ms=4, lw=2, color=next(held_colour),
                        label=f"held out {name}")
            else:
                ax.plot(radii, med, "-", lw=1, color="C0", alpha=0.45, label=grid_label)
                grid_label = None
        radii, ctrl = _per_radius_median(d["r"], np.nanmax(d["error_exact_df"], axis=0))
        ax.plot(radii, ctrl, "k:", label="exact-DF control (max over labels)")
        ax.axvspan(lo, hi, color="0.93", zorder=0)
        ax.axhline(0.02, color="grey", lw=0.8, ls="--")
        ax.set(xscale="log", yscale="log", xlabel="r / a", title=title,
               ylabel=r"$|\mathbf{a} - \mathbf{a}_{\rm true}|\,/\,|\mathbf{a}_{\rm true}|$"
               " (median over directions)")
        ax.legend(fontsize=7)
    fig.suptitle("Dehnen family (γ, a/r_a): CBE acceleration error", fontsize=10)
    _save(fig, out / "accelerations.png")

    # beta.png: one panel per label
    n = len(names)
    cols = min(4, n)
    rows_ = math.ceil(n / cols)
    fig = Figure(figsize=(3.0 * cols, 2.5 * rows_), layout="constrained")
    axes = fig.subplots(rows_, cols, squeeze=False, sharex=True, sharey=True).ravel()
    for i, ax in enumerate(axes):
        if i >= n:
            ax.set_visible(False)
            continue
        ax.plot(d["beta_r"][i], d["beta_exact"][i], "k-", label="exact")
        ax.plot(d["beta_r"][i], d["beta_exact_stars"][i], "s", ms=3, mfc="none", color="0.4",
                label="exact stars")
        ax.plot(d["beta_r"][i], d["beta_flow"][i], "o", ms=3, color="C3" if held[i] else "C0",
                label="flow samples")
        ax.set(xscale="log", title=("held out " if held[i] else "node ") + names[i])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.title.set_fontsize(8)
        if i == 0:
            ax.legend(fontsize=6)
    fig.supxlabel("r / a")
    fig.supylabel("β(r)")
    _save(fig, out / "beta.png")

    # labels.png: the label plane, nodes and held-out labels, annotated with KL
    fig = Figure(figsize=(5.0, 4.0), layout="constrained")
    ax = fig.subplots()
    for i, (g, k) in enumerate(d["labels"]):
        ax.plot(g, k, "o" if not held[i] else "*", ms=8 if not held[i] else 13,
                color="C0" if not held[i] else "C3")
        ax.annotate(f"KL {d['kl'][i]:.3f}", (g, k), textcoords="offset points", xytext=(5, 5),
                    fontsize=7)
    ax.set(xlabel="γ", ylabel="a / r_a", title="training nodes (o) and held-out labels (*)")
    ax.margins(0.2)
    _save(fig, out / "labels.png")
    return [out / "accelerations.png", out / "beta.png", out / "labels.png"]


__all__ = ["InterpolationConfig", "TARGETS", "evaluation_positions", "label_name",
           "beta_profile", "log_density_gap", "evaluate_label", "probe_bad_labels",
           "run_interpolation_study",
           "build_report", "load_report", "save_figure_data", "render"]
