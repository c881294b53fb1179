"""Figures, each drawn from saved figure data.

Every figure has two halves: the numbers it shows are saved first as an ``.npz``
(``save_figure_data``), and a ``*_figure`` function draws it from those numbers alone, so a figure
can be restyled and re-rendered without re-running a study (``render('DATA.npz')`` writes the PNG).
Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas directly: no pyplot state,
no display needed.

Figure-data layouts (arrays in the ``.npz``; scalars as 0-d arrays; strings as 0-d string arrays;
model units G = M = a = 1 throughout):

``mock``          kind, r_edges [R+1], r_counts [R], r_model_counts [R], r_mid [S], sigma_r [S],
                  sigma_r_err [S], sigma_t [S], sigma_t_err [S], sigma_r_model [S],
                  sigma_t_model [S]
``accelerations`` labels [M], r [B], a_r_true [B], a_r_learned [M, B], a_spread [M, B],
                  error_learned [M, B], a_r_exact_df [B], error_exact_df [B]; optionally
                  a_r_symmetrised [M, B] and error_symmetrised [M, B] (the learned DF averaged over
                  rotations, ``symmetry.SphericalAverage``). ``a_r_*`` are radial components
                  a_r = a . x/|x| (negative for attraction, ``study.radial_component``);
                  ``error_*`` are vector fractional errors |a - a_true| / |a_true|
                  (``study.fractional_error``); a_spread is |sigma_a| of the ensemble members
                  (0 for a single flow).
``df_slices``     labels [M], r [P], x_hat [3], v [3], logf_exact [M, P], logf_learned [M, P]
                  (log f along the slice x = r x_hat at the fixed velocity v)
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from .atomic import atomic_file
from .errors import FileError, InputError

_LAYOUTS = {
    "mock": ("kind", "r_edges", "r_counts", "r_model_counts", "r_mid", "sigma_r", "sigma_r_err",
             "sigma_t", "sigma_t_err", "sigma_r_model", "sigma_t_model"),
    "accelerations": ("labels", "r", "a_r_true", "a_r_learned", "a_spread", "error_learned",
                      "a_r_exact_df", "error_exact_df"),
    "df_slices": ("labels", "r", "x_hat", "v", "logf_exact", "logf_learned"),
}
_OPTIONAL_TOGETHER = {"accelerations": ("a_r_symmetrised", "error_symmetrised")}


def _missing(figure: str, keys) -> list[str]:
    """Required keys of ``figure`` missing from ``keys`` (an optional group: when half given)."""
    missing = [k for k in _LAYOUTS[figure] if k not in keys]
    group = _OPTIONAL_TOGETHER.get(figure, ())
    if any(k in keys for k in group):
        missing += [k for k in group if k not in keys]
    return missing


def save_figure_data(path: str | os.PathLike, figure: str, **arrays) -> Path:
    """Write the arrays of figure type ``figure`` (a layout above) to ``path`` (.npz)."""
    if figure not in _LAYOUTS:
        raise InputError(f"unknown figure type {figure!r}; expected one of {sorted(_LAYOUTS)}")
    missing = _missing(figure, arrays)
    if missing:
        raise InputError(f"figure data for {figure!r} is missing {missing}")
    path = Path(path)
    with atomic_file(path, suffix=".npz") as tmp:
        np.savez(tmp, figure=np.array(figure), **{k: np.asarray(v) for k, v in arrays.items()})
    return path


def load_figure_data(path: str | os.PathLike) -> dict:
    """Figure data written by ``save_figure_data``: a dict with key ``figure`` and the arrays."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise FileError(f"cannot read figure data {path}: {exc}") from exc
    if "figure" not in data or str(data["figure"]) not in _LAYOUTS:
        raise FileError(f"{path} is not tfgalflow figure data (no known 'figure' entry)")
    missing = _missing(str(data["figure"]), data)
    if missing:
        raise FileError(f"{path}: {str(data['figure'])!r} figure data lacks {missing} (written by "
                        f"an older tfgalflow; re-run the study to regenerate it)")
    return data


def figure(data: Mapping[str, np.ndarray]):
    """The ``matplotlib.figure.Figure`` of figure data ``data`` (as from ``load_figure_data``)."""
    draw = {"mock": mock_figure, "accelerations": accelerations_figure,
            "df_slices": df_slices_figure}
    return draw[str(data["figure"])](data)


def render(data_path: str | os.PathLike, png_path: str | os.PathLike | None = None) -> Path:
    """Draw the figure stored in ``data_path`` to ``png_path`` (default: same name, ``.png``)."""
    png_path = Path(png_path) if png_path is not None else Path(data_path).with_suffix(".png")
    return _save(figure(load_figure_data(data_path)), png_path)


def _figure(ncols: int, width: float = 4.6, height: float = 3.8):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _readable_log_ticks(fig) -> None:
    """Label log axes spanning few decades at 1-2-5 values (0.2, 0.5, 1, 2, 5, ...), in plain
    numbers.

    Matplotlib labels only powers of ten, so a 0.2..5 axis would show "10^0" alone. Axes spanning
    many decades keep one tick per decade; values outside 1e-3..1e4 keep the 10^n notation.
    """
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    for ax in fig.axes:
        for axis, limits in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            if axis.get_scale() != "log":
                continue
            axis.set_minor_formatter(NullFormatter())     # minor labels of short log axes overlap
            lo, hi = sorted(limits)
            decades = range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
            for mantissas in ((1, 2, 5), (1,)):
                ticks = [m * 10.0**k for k in decades for m in mantissas
                         if lo <= m * 10.0**k * (1 + 1e-9) and m * 10.0**k <= hi * (1 + 1e-9)]
                if len(ticks) <= 9:
                    break
            if len(ticks) < 2 or len(ticks) > 9 or ticks[0] < 1e-3 or ticks[-1] > 1e4:
                continue
            axis.set_major_locator(FixedLocator(ticks))
            axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))


def _save(fig, path: str | os.PathLike) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    FigureCanvasAgg(fig)
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    return path


def mock_figure(data: Mapping[str, np.ndarray]):
    """Sampled radii against the model's dM/dr; binned velocity dispersions against the Jeans
    profiles.
    """
    fig, (ax_r, ax_s) = _figure(2)
    edges = data["r_edges"]
    ax_r.stairs(data["r_counts"], edges, label="mock", color="k")
    ax_r.stairs(data["r_model_counts"], edges, label="model  N ΔM(<r)/M", color="C3", ls="--")
    ax_r.set(xscale="log", yscale="log", xlabel="r / a", ylabel="stars per bin",
             title=f"Hernquist mock ({data['kind']})")
    ax_r.legend()
    r = data["r_mid"]
    for key, name, colour in (("sigma_r", r"$\sigma_r$", "C0"), ("sigma_t", r"$\sigma_t$", "C1")):
        ax_s.errorbar(r, data[key], yerr=data[f"{key}_err"], fmt="o", ms=3, color=colour,
                      label=f"{name} mock")
        ax_s.plot(r, data[f"{key}_model"], color=colour, label=f"{name} Jeans")
    ax_s.set(xscale="log", xlabel="r / a", ylabel=r"dispersion / $\sqrt{GM/a}$",
             title="velocity dispersions")
    ax_s.legend()
    _readable_log_ticks(fig)
    return fig


def accelerations_figure(data: Mapping[str, np.ndarray]):
    """Left: recovered against true radial component -a_r with radius. Right: the vector fractional
    error |a - a_true| / |a_true|, the number summary.json and the study's table report per radius.

    The exact-DF control uses the same least squares with the exact DF's derivatives, so its error
    isolates the numerical floor of the method; the gap between it and a learned curve is the error
    due to learning. Error bars (the ensemble's member spread |sigma_a|) are drawn only when
    nonzero.
    """
    from matplotlib.transforms import blended_transform_factory

    fig, (ax_a, ax_e) = _figure(2)
    order = np.argsort(data["r"])
    r = data["r"][order]
    ax_a.plot(r, -data["a_r_true"][order], color="k", lw=2, label="exact Hernquist")
    ax_e.plot(r, data["error_exact_df"][order], color="k", ls=":", label="exact-DF control")
    for i, label in enumerate(np.atleast_1d(data["labels"])):
        minus_a_r, spread = -data["a_r_learned"][i][order], data["a_spread"][i][order]
        if np.any(spread > 0):
            ax_a.errorbar(r, minus_a_r, yerr=spread, fmt="o", ms=3, color=f"C{i}",
                          label=f"{label} (bars: member spread)")
        else:
            ax_a.plot(r, minus_a_r, "o", ms=3, color=f"C{i}", label=str(label))
        ax_e.plot(r, data["error_learned"][i][order], "o-", ms=3, color=f"C{i}", label=str(label))
        if "error_symmetrised" in data:
            ax_a.plot(r, -data["a_r_symmetrised"][i][order], "s", ms=4, mfc="none", color=f"C{i}",
                      label=f"{label}, spherical average")
            ax_e.plot(r, data["error_symmetrised"][i][order], "s--", ms=3, mfc="none",
                      color=f"C{i}", label=f"{label}, spherical average")
    ax_a.set(xscale="log", yscale="log", xlabel="r / a",
             ylabel=r"$-a_r = -\mathbf{a}\cdot\hat{\mathbf{r}}$  / (GM/a$^2$)",
             title="radial component of the acceleration")
    ax_e.set(xscale="log", yscale="log", xlabel="r / a",
             ylabel=r"$|\mathbf{a} - \mathbf{a}_{\rm true}|\, /\, |\mathbf{a}_{\rm true}|$",
             title="fractional error of the vector a")
    ax_e.axhline(0.01, color="grey", lw=0.8, ls="--")
    ax_e.text(0.02, 0.01, "1 %", color="grey", fontsize=8, ha="left", va="bottom",
              transform=blended_transform_factory(ax_e.transAxes, ax_e.transData))
    ax_a.legend(fontsize=8)
    ax_e.legend(fontsize=8)
    _readable_log_ticks(fig)
    return fig


def _vector(v) -> str:
    return "(" + ", ".join(f"{c:.3g}" for c in np.asarray(v, dtype=float) + 0.0) + ")"


def df_slices_figure(data: Mapping[str, np.ndarray]):
    """Learned against exact log f along one slice of phase space (x = r x_hat at a fixed v), one
    panel per mock; the title names the slice.
    """
    labels = np.atleast_1d(data["labels"])
    fig, axes = _figure(len(labels))
    for ax, label, exact, learned in zip(axes, labels, data["logf_exact"], data["logf_learned"]):
        ax.plot(data["r"], exact, color="k", lw=2, label="exact")
        ax.plot(data["r"], learned, color="C3", ls="--", label="flow")
        ax.set(xscale="log", xlabel="r / a", ylabel="log f(x, v)", title=str(label))
        ax.legend()
    fig.suptitle(f"log f(x, v) along x = r {_vector(data['x_hat'])} at fixed\n"
                 f"v = {_vector(data['v'])} " + r"$\sqrt{GM/a}$", fontsize=10)
    _readable_log_ticks(fig)
    return fig
