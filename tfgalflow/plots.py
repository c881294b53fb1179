"""Figures, each drawn from saved figure data.

Every figure has two halves: the numbers it shows are saved first as an ``.npz`` (``save_figure_data``), and a
``plot_*`` function draws the PNG from those numbers alone, so a figure can be restyled and re-rendered without
re-running a study (``tfgalflow plot DATA.npz``). Figures are built with ``matplotlib.figure.Figure`` and the Agg
canvas directly: no pyplot state, no display needed.

Figure-data layouts (arrays in the ``.npz``; scalars as 0-d arrays; strings as 0-d string arrays):

``mock``          kind, r_edges [R+1], r_counts [R], r_model_counts [R], r_mid [S], sigma_r [S], sigma_r_err [S],
                  sigma_t [S], sigma_t_err [S], sigma_r_model [S], sigma_t_model [S]   (model units)
``accelerations`` labels [M], r [B], a_true [B], a_learned [M, B], a_spread [M, B], a_exact_df [B]
                  (radial acceleration magnitudes |a_r| at radius r, model units; a_spread is the ensemble
                  member-to-member standard deviation, 0 for a single flow); optional a_symmetrised [M, B]
                  (the learned DF averaged over rotations, ``symmetry.SphericalAverage``)
``df_slices``     labels [M], r [P], logf_exact [M, P], logf_learned [M, P]
                  (log f along a slice of phase space: position on a ray, velocity fixed; see the study)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from .atomic import atomic_file
from .errors import FileError, InputError

_LAYOUTS = {
    "mock": ("kind", "r_edges", "r_counts", "r_model_counts", "r_mid", "sigma_r", "sigma_r_err", "sigma_t",
             "sigma_t_err", "sigma_r_model", "sigma_t_model"),
    "accelerations": ("labels", "r", "a_true", "a_learned", "a_spread", "a_exact_df"),
    "df_slices": ("labels", "r", "logf_exact", "logf_learned"),
}


def save_figure_data(path: str | os.PathLike, figure: str, **arrays) -> Path:
    """Write the arrays behind figure type ``figure`` (a key of the layouts above) to ``path`` (.npz), atomically."""
    if figure not in _LAYOUTS:
        raise InputError(f"unknown figure type {figure!r}; expected one of {sorted(_LAYOUTS)}")
    missing = [k for k in _LAYOUTS[figure] if k not in arrays]
    if missing:
        raise InputError(f"figure data for {figure!r} is missing {missing}")
    path = Path(path)
    with atomic_file(path, suffix=".npz") as tmp:
        np.savez(tmp, figure=np.array(figure), **{k: np.asarray(v) for k, v in arrays.items()})
    return path


def load_figure_data(path: str | os.PathLike) -> dict:
    """Read figure data written by ``save_figure_data``; returns a dict with key ``figure`` and the arrays."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise FileError(f"cannot read figure data {path}: {exc}") from exc
    if "figure" not in data or str(data["figure"]) not in _LAYOUTS:
        raise FileError(f"{path} is not tfgalflow figure data (no known 'figure' entry)")
    return data


def render(data_path: str | os.PathLike, png_path: str | os.PathLike | None = None) -> Path:
    """Draw the figure stored in ``data_path`` to ``png_path`` (default: same name, ``.png``)."""
    data = load_figure_data(data_path)
    png_path = Path(png_path) if png_path is not None else Path(data_path).with_suffix(".png")
    draw = {"mock": plot_mock, "accelerations": plot_accelerations, "df_slices": plot_df_slices}
    return draw[str(data["figure"])](data, png_path)


def _figure(ncols: int, width: float = 4.6, height: float = 3.8):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _save(fig, path: str | os.PathLike) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.ticker import NullFormatter

    path = Path(path)
    for ax in fig.axes:                    # log axes spanning < 2 decades label minor ticks, which overlap
        ax.xaxis.set_minor_formatter(NullFormatter())
    FigureCanvasAgg(fig)
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    return path


def plot_mock(data: Mapping[str, np.ndarray], path: str | os.PathLike) -> Path:
    """Sampled radii against the model's dM/dr, and binned velocity dispersions against the Jeans profiles."""
    fig, (ax_r, ax_s) = _figure(2)
    edges = data["r_edges"]
    ax_r.stairs(data["r_counts"], edges, label="mock", color="k")
    ax_r.stairs(data["r_model_counts"], edges, label="model  N ΔM(<r)/M", color="C3", ls="--")
    ax_r.set(xscale="log", yscale="log", xlabel="r / a", ylabel="stars per bin", title=f"Hernquist mock ({data['kind']})")
    ax_r.legend()
    r = data["r_mid"]
    for key, name, colour in (("sigma_r", r"$\sigma_r$", "C0"), ("sigma_t", r"$\sigma_t$", "C1")):
        ax_s.errorbar(r, data[key], yerr=data[f"{key}_err"], fmt="o", ms=3, color=colour, label=f"{name} mock")
        ax_s.plot(r, data[f"{key}_model"], color=colour, label=f"{name} Jeans")
    ax_s.set(xscale="log", xlabel="r / a", ylabel=r"dispersion / $\sqrt{GM/a}$", title="velocity dispersions")
    ax_s.legend()
    return _save(fig, path)


def plot_accelerations(data: Mapping[str, np.ndarray], path: str | os.PathLike) -> Path:
    """Recovered against true |a_r| with radius (left) and the fractional error |Δa|/|a| (right).

    The exact-DF control uses the same least squares with the exact DF's derivatives, so its error isolates
    the numerical floor of the method; the gap between it and a learned curve is the error due to learning.
    """
    fig, (ax_a, ax_e) = _figure(2)
    r, a_true = data["r"], data["a_true"]
    order = np.argsort(r)
    ax_a.plot(r[order], a_true[order], color="k", lw=2, label="exact Hernquist")
    ax_e.plot(r[order], np.abs(data["a_exact_df"][order] - a_true[order]) / a_true[order], color="k", ls=":",
              label="exact-DF control")
    for i, label in enumerate(np.atleast_1d(data["labels"])):
        a, spread = data["a_learned"][i][order], data["a_spread"][i][order]
        ax_a.errorbar(r[order], a, yerr=spread, fmt="o", ms=3, color=f"C{i}", label=str(label))
        ax_e.plot(r[order], np.abs(a - a_true[order]) / a_true[order], "o-", ms=3, color=f"C{i}", label=str(label))
        if "a_symmetrised" in data:
            a_sym = data["a_symmetrised"][i][order]
            ax_a.plot(r[order], a_sym, "s", ms=4, mfc="none", color=f"C{i}", label=f"{label}, spherical average")
            ax_e.plot(r[order], np.abs(a_sym - a_true[order]) / a_true[order], "s--", ms=3, color=f"C{i}",
                      mfc="none", label=f"{label}, spherical average")
    ax_a.set(xscale="log", yscale="log", xlabel="r / a", ylabel=r"$|a_r|$ / (GM/a$^2$)", title="accelerations")
    ax_e.set(xscale="log", yscale="log", xlabel="r / a", ylabel=r"$|a - a_{\rm true}| / |a_{\rm true}|$",
             title="fractional error")
    ax_e.axhline(0.01, color="grey", lw=0.8, ls="--")
    ax_a.legend(fontsize=8)
    ax_e.legend(fontsize=8)
    return _save(fig, path)


def plot_df_slices(data: Mapping[str, np.ndarray], path: str | os.PathLike) -> Path:
    """Learned against exact log f along slices of phase space, one panel per mock."""
    labels = np.atleast_1d(data["labels"])
    fig, axes = _figure(len(labels))
    for ax, label, exact, learned in zip(axes, labels, data["logf_exact"], data["logf_learned"]):
        ax.plot(data["r"], exact, color="k", lw=2, label="exact")
        ax.plot(data["r"], learned, color="C3", ls="--", label="flow")
        ax.set(xscale="log", xlabel="r / a", ylabel="log f", title=str(label))
        ax.legend()
    return _save(fig, path)
