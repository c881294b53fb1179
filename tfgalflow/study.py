"""The Hernquist acceleration study: mock -> learned DF -> CBE accelerations -> comparison with the
exact model.

This is the chain of An, Naik, Evans & Burrage (2021, Sec. 5) as one function. For each mock
(isotropic, anisotropic with beta = 1/2, isotropic with 1 % and 10 % noise) it

1. samples ``n_stars`` stars from the exact Hernquist DF (``mocks.sample_hernquist``), adds noise
   if asked;
2. trains a flow ensemble on the 6D sample (``training.train``);
3. solves the CBE least squares  v . dlog f/dx + a . dlog f/dv = 0  at positions on rays at
   radii log-spaced in [r_min, r_max] (``cbe.accelerations``) with the learned DF, and with the
   exact DF as a control that isolates the error of the method from the error of learning;
4. with ``rotations`` = M > 0, solves the CBE again with the learned DF averaged over M joint
   rotations of (x, v) (``symmetry.SphericalAverage``: the mocks are spherical, so this removes the
   non-spherical part of the learning error; both results are reported);
5. saves figure data (``plots.save_figure_data``), draws the figures, and writes ``summary.json``
   with the median fractional error |a - a_true| / |a_true| over ``summary_range``.

A study directory whose ``runs/<mock>/`` already holds a run (an interrupted or finished study)
continues it with ``training.resume`` instead of training afresh: finished members are loaded,
unfinished ones continue from their last checkpoint (the mock is re-drawn from its seed, and resume
checks it is the same data).

``StudyConfig.demo()`` is the small default behind ``tfgalflow demo`` / ``make demo`` (a few
minutes on 2 CPU cores); ``StudyConfig()`` is the full study of ``scripts/hernquist_study.py``;
both take command-line overrides through ``StudyConfig.with_overrides``. Everything is in model
units G = M = a = 1.

Conventions, stated here once and used by the study, its figures and ``tfgalflow accel``:

* the radial component of an acceleration is  a_r = a . r_hat,  r_hat = x / |x|
  (:func:`tfgalflow.cbe.radial_component`, the package's one definition), negative for an
  attractive force (Hernquist: a_r = -G M / (r + a)^2);
* the figure of merit is the vector fractional error  |a - a_true| / |a_true|
  (``fractional_error``): summary.json, the printed table and the error panel of
  ``accelerations.png`` all show this one number.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .atomic import write_json
from .errors import InputError
from .hernquist import Hernquist
from .validation import unit_vectors

#: mock name -> (DF kind, fractional noise level)
MOCKS = {"iso": ("iso", 0.0), "aniso": ("aniso", 0.0), "iso_noise1": ("iso", 0.01),
         "iso_noise10": ("iso", 0.10)}

#: the two quantities every output names (summary.json "definitions", the printed table's header)
RADIAL_COMPONENT = "a_r = a . x/|x| (negative for attraction)"
FRACTIONAL_ERROR = "|a - a_true| / |a_true| (vector difference)"


@dataclass(frozen=True)
class StudyConfig:
    """Sizes and seeds of one study run (model units)."""

    mocks: tuple[str, ...] = ("iso", "aniso", "iso_noise1", "iso_noise10")
    n_stars: int = 1_000_000
    star_r_max: float = 100.0      # stars beyond this radius are cut (a long tail helps nobody)
    train: dict = field(default_factory=lambda: {
        "layers": 8, "hidden": [64, 64], "epochs": 200, "batch_size": 2048, "lr": 1e-3,
        "lr_schedule": "cosine", "patience": 20, "members": 4, "validation_split": 0.1})
    n_radii: int = 20
    r_min: float = 0.1
    r_max: float = 10.0
    n_velocities: int = 256
    rotations: int = 64                # M of the spherical average (0: learned DF only)
    summary_range: tuple[float, float] = (0.2, 5.0)
    seed: int = 0

    def __post_init__(self):
        unknown = [m for m in self.mocks if m not in MOCKS]
        if unknown:
            raise InputError(f"unknown mock(s) {unknown}; expected some of {sorted(MOCKS)}")
        if self.n_stars <= 0 or self.n_radii <= 0 or self.n_velocities <= 0:
            raise InputError("n_stars, n_radii and n_velocities must be positive")
        if self.rotations < 0:
            raise InputError(f"rotations = {self.rotations}: expected 0 (none) or a positive "
                             f"number")
        if not 0 < self.r_min < self.r_max:
            raise InputError(f"need 0 < r_min < r_max, got {self.r_min}, {self.r_max}")

    @classmethod
    def demo(cls) -> "StudyConfig":
        """The small built-in default of ``tfgalflow demo``: one isotropic mock, one small flow."""
        return cls(mocks=("iso",), n_stars=100_000,
                   train={"layers": 6, "hidden": [64, 64], "epochs": 40, "batch_size": 1024,
                          "lr": 2e-3, "lr_schedule": "cosine", "patience": 8, "members": 1,
                          "validation_split": 0.1},
                   n_radii=8, r_min=0.2, r_max=5.0, n_velocities=256, rotations=16)

    def with_overrides(self, *, mocks: tuple[str, ...] | list[str] | None = None,
                       n_stars: int | None = None, members: int | None = None,
                       epochs: int | None = None, seed: int | None = None,
                       rotations: int | None = None) -> "StudyConfig":
        """A copy with the given settings replaced; None leaves a setting as it is.

        The command-line overrides of ``tfgalflow demo`` and ``scripts/hernquist_study.py``:
        ``members`` and ``epochs`` go into the ``train`` dict, the others replace the fields of the
        same name (and are validated as in the constructor).
        Example: ``StudyConfig.demo().with_overrides(n_stars=4000, epochs=2)``.
        """
        train = dict(self.train)
        if members is not None:
            train["members"] = members
        if epochs is not None:
            train["epochs"] = epochs
        changes = {"mocks": None if mocks is None else tuple(mocks), "n_stars": n_stars,
                   "seed": seed, "rotations": rotations}
        return dataclasses.replace(self, train=train,
                                   **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        """The config as a JSON-ready dict (the inverse of :meth:`from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StudyConfig":
        """A config from :meth:`to_dict`'s output (study_config.json); unknown keys: InputError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"unknown study config key(s) {unknown}; expected some of "
                             f"{sorted(known)}")
        d = dict(d)
        for key in ("mocks", "summary_range"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


def evaluation_positions(config: StudyConfig) -> np.ndarray:
    """Positions [n_radii, 3]: radii log-spaced in [r_min, r_max], each along a random (seeded)
    direction.
    """
    rng = np.random.default_rng(config.seed + 12345)
    radii = np.geomspace(config.r_min, config.r_max, config.n_radii)
    return radii[:, None] * unit_vectors(config.n_radii, rng)


def fractional_error(acceleration: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """|a - a_true| / |a_true| per position [B] (vector difference, so direction errors count)."""
    return np.linalg.norm(acceleration - truth, axis=1) / np.linalg.norm(truth, axis=1)


def mock_figure_data(cat, model: Hernquist, kind: str, n_bins: int = 12) -> dict:
    """Radius histogram against N ΔM(<r)/M, and binned sigma_r, sigma_t against the Jeans profiles.

    Dispersion errors are the large-sample standard errors sigma / sqrt(2 n) of a Gaussian-like
    spread.
    """
    r = np.linalg.norm(cat.pos, axis=1)
    edges = np.geomspace(max(r.min(), 1e-3), r.max(), 31)
    counts, _ = np.histogram(r, edges)
    model_counts = len(r) * np.diff(model.enclosed_mass(edges)) / model.M
    r_hat = cat.pos / r[:, None]
    v_r = np.sum(cat.vel * r_hat, axis=1)
    v_t2 = np.sum(cat.vel**2, axis=1) - v_r**2
    bins = np.quantile(r, np.linspace(0.02, 0.98, n_bins + 1))
    which = np.digitize(r, bins) - 1
    mid, s_r, s_t, n = [], [], [], []
    for i in range(n_bins):
        sel = which == i
        mid.append(np.median(r[sel]))
        s_r.append(np.sqrt(np.mean(v_r[sel] ** 2)))
        s_t.append(np.sqrt(np.mean(v_t2[sel]) / 2.0))   # one tangential component
        n.append(sel.sum())
    mid, s_r, s_t, n = map(np.asarray, (mid, s_r, s_t, n))
    return dict(kind=kind, r_edges=edges, r_counts=counts, r_model_counts=model_counts, r_mid=mid,
                sigma_r=s_r, sigma_r_err=s_r / np.sqrt(2 * n), sigma_t=s_t,
                sigma_t_err=s_t / np.sqrt(2 * n),
                sigma_r_model=model.sigma_r(mid, kind), sigma_t_model=model.sigma_t(mid, kind))


#: the slice of phase space in df_slices.png: x = r DF_SLICE_DIRECTION, v = DF_SLICE_VELOCITY
DF_SLICE_DIRECTION = (1.0, 0.0, 0.0)
DF_SLICE_VELOCITY = (0.0, 0.2 / np.sqrt(2.0), 0.2 / np.sqrt(2.0))       # |v| = 0.2 sqrt(G M / a)


def df_slice(df, model: Hernquist, kind: str, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log f (exact, learned) [P] along the ray x = r DF_SLICE_DIRECTION [P, 3] at the fixed
    velocity v = DF_SLICE_VELOCITY; r [P] in units of a.
    """
    x = np.outer(r, DF_SLICE_DIRECTION)
    v = np.tile(DF_SLICE_VELOCITY, (len(r), 1))
    exact = model.log_df(x, v, kind)
    learned = np.asarray(df.log_prob(np.concatenate([x, v], axis=1).astype(np.float32)))
    return exact, learned


def run_study(config: StudyConfig, out_dir: str | os.PathLike, log: Callable[[str], None] = print,
              verbose: int = 1) -> dict:
    """Run the study; returns (and writes to ``out_dir/summary.json``) the figures of merit per
    mock.

    Per mock and radius, summary.json's ``per_radius`` rows hold the radial components
    ``a_r_true``, ``a_r_learned`` (and ``a_r_symmetrised``), a_r = a . x/|x|
    (``radial_component``), and the vector fractional errors ``fractional_error`` (and
    ``fractional_error_symmetrised``), |a - a_true| / |a_true| (``fractional_error``);
    ``accelerations.npz`` holds the same numbers for the figure.
    """
    from . import plots
    from .cbe import accelerations, radial_component
    from .mocks import add_noise, cut, sample_hernquist
    from .symmetry import SphericalAverage
    from .training import TrainConfig, resume, train

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "study_config.json", config.to_dict())
    model = Hernquist()
    positions = evaluation_positions(config)
    radii = np.linalg.norm(positions, axis=1)
    a_true_vec = model.acceleration(positions)
    a_r_true = radial_component(positions, a_true_vec)
    in_range = (radii >= config.summary_range[0]) & (radii <= config.summary_range[1])
    train_config = TrainConfig.from_dict({**config.train, "seed": config.seed})

    summary: dict = {"summary_range": list(config.summary_range),
                     "definitions": {"a_r": RADIAL_COMPONENT,
                                     "fractional_error": FRACTIONAL_ERROR},
                     "mocks": {}}
    figure = {key: [] for key in ("a_r_learned", "a_spread", "error_learned", "a_r_symmetrised",
                                  "error_symmetrised", "logf_exact", "logf_learned")}
    exact_control = None
    slice_r = np.geomspace(0.05, 20.0, 60)
    for i, name in enumerate(config.mocks):
        kind, noise = MOCKS[name]
        t0 = time.perf_counter()
        cat = sample_hernquist(config.n_stars, kind=kind, seed=config.seed + 1000 * i,
                               r_max=config.star_r_max)
        if noise > 0:
            cat = add_noise(cat, noise, seed=config.seed + 1000 * i + 1)
            cat = cut(cat, r_max=config.star_r_max)
        plots.save_figure_data(out / f"mock_{name}.npz", "mock",
                               **mock_figure_data(cat, model, kind))
        log(f"[{name}] {len(cat)} stars sampled ({kind}, noise {noise:.0%}); training ...")
        run_dir = out / "runs" / name
        if (run_dir / "config.json").exists():
            log(f"[{name}] {run_dir} exists: resuming it (finished members are loaded)")
            flow = resume(run_dir, data=cat, verbose=verbose)
        else:
            flow = train(cat, train_config, run_dir, verbose=verbose)
        log(f"[{name}] trained in {time.perf_counter() - t0:.0f} s; solving the CBE at "
            f"{len(positions)} positions")
        res = accelerations(flow, positions, n_velocities=config.n_velocities, seed=config.seed)
        exact = accelerations(model.exact_density(kind), positions,
                              n_velocities=config.n_velocities, seed=config.seed)
        if exact_control is None:
            exact_control = exact.acceleration
        err = fractional_error(res.acceleration, a_true_vec)
        err_exact = fractional_error(exact.acceleration, a_true_vec)
        a_r = radial_component(positions, res.acceleration)
        figure["a_r_learned"].append(a_r)
        figure["error_learned"].append(err)
        figure["a_spread"].append(np.zeros(len(positions)) if res.spread is None
                                  else np.linalg.norm(res.spread, axis=1))
        e, l_ = df_slice(flow, model, kind, slice_r)
        figure["logf_exact"].append(e)
        figure["logf_learned"].append(l_)
        m = summary["mocks"][name] = {
            "kind": kind, "noise": noise, "n_stars": len(cat),
            "median_fractional_error": float(np.median(err[in_range])),
            "max_fractional_error": float(np.max(err[in_range])),
            "median_fractional_error_exact_df": float(np.median(err_exact[in_range])),
            "flagged": int(np.sum(res.flagged)),
            "per_radius": [{"r": float(r), "a_r_true": float(t), "a_r_learned": float(a),
                            "fractional_error": float(f)}
                           for r, t, a, f in zip(radii, a_r_true, a_r, err)],
        }
        if config.rotations:
            sym = accelerations(SphericalAverage(flow, config.rotations, seed=config.seed),
                                positions, n_velocities=config.n_velocities, seed=config.seed)
            a_r_sym = radial_component(positions, sym.acceleration)
            err_sym = fractional_error(sym.acceleration, a_true_vec)
            figure["a_r_symmetrised"].append(a_r_sym)
            figure["error_symmetrised"].append(err_sym)
            m.update({
                "rotations": config.rotations,
                "median_fractional_error_symmetrised": float(np.median(err_sym[in_range])),
                "max_fractional_error_symmetrised": float(np.max(err_sym[in_range])),
                "flagged_symmetrised": int(np.sum(sym.flagged))})
            for row, a, f in zip(m["per_radius"], a_r_sym, err_sym):
                row.update({"a_r_symmetrised": float(a), "fractional_error_symmetrised": float(f)})
        lo, hi = config.summary_range
        log(f"[{name}] median |a - a_true|/|a_true| over {lo}a..{hi}a: "
            f"{m['median_fractional_error']:.3%}"
            + (f", averaged over {config.rotations} rotations "
               f"{m['median_fractional_error_symmetrised']:.3%}" if config.rotations else "")
            + f" (exact-DF control {m['median_fractional_error_exact_df']:.1e})")

    names = np.array(config.mocks)
    arrays = {key: np.array(values) for key, values in figure.items() if values}
    plots.save_figure_data(
        out / "accelerations.npz", "accelerations", labels=names, r=radii, a_r_true=a_r_true,
        a_r_exact_df=radial_component(positions, exact_control),
        error_exact_df=fractional_error(exact_control, a_true_vec),
        **{k: v for k, v in arrays.items() if not k.startswith("logf")})
    plots.save_figure_data(out / "df_slices.npz", "df_slices", labels=names, r=slice_r,
                           x_hat=np.array(DF_SLICE_DIRECTION), v=np.array(DF_SLICE_VELOCITY),
                           logf_exact=arrays["logf_exact"], logf_learned=arrays["logf_learned"])
    for data in sorted(out.glob("*.npz")):
        plots.render(data)
    write_json(out / "summary.json", summary)
    return summary


def format_table(summary: dict) -> str:
    """A plain-text table per mock and radius: radial components a_r (true, recovered) and the
    vector fractional error |a - a_true| / |a_true| (the figure of merit), as in summary.json.
    """
    lines = [f"{RADIAL_COMPONENT}, in GM/a^2;  err = {FRACTIONAL_ERROR}"]
    for name, m in summary["mocks"].items():
        sym = "median_fractional_error_symmetrised" in m
        lines.append(f"mock {name} ({m['n_stars']} stars): median err "
                     f"{m['median_fractional_error']:.2%} over r in {summary['summary_range']}"
                     + (f"; {m['median_fractional_error_symmetrised']:.2%} with the DF averaged "
                        f"over {m['rotations']} rotations" if sym else ""))
        lines.append(f"  {'r/a':>7} {'a_r true':>10} {'a_r flow':>10} {'err flow':>9}"
                     + (f" {'a_r sym':>10} {'err sym':>9}" if sym else ""))
        for row in m["per_radius"]:
            lines.append(f"  {row['r']:7.3f} {row['a_r_true']:10.5f} {row['a_r_learned']:10.5f} "
                         f"{row['fractional_error']:9.2%}"
                         + (f" {row['a_r_symmetrised']:10.5f} "
                            f"{row['fractional_error_symmetrised']:9.2%}" if sym else ""))
    return "\n".join(lines)


def load_summary(out_dir: str | os.PathLike) -> dict:
    """Read ``summary.json`` of a finished study."""
    return json.loads((Path(out_dir) / "summary.json").read_text())
