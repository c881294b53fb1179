"""Figures of the task reports, drawn from ``report.json``'s numbers (and flow draws for scatter).

Built with ``matplotlib.figure.Figure`` and the Agg canvas (no pyplot state); every PNG is written
atomically (:func:`tfgalflow.atomic.atomic_file`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..atomic import atomic_file

P_THRESHOLD = 0.01


def save_figure(fig: Any, path: Path) -> str:
    """Write ``fig`` to ``path`` (PNG, 120 dpi) atomically; the file name."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    return path.name


def ellipse(mu: np.ndarray, cov: np.ndarray, k: float = 2.0, points: int = 100) -> np.ndarray:
    """The k-sigma contour {mu + k L (cos t, sin t)} of N(mu, cov), L = chol(cov): [points, 2]."""
    t = np.linspace(0.0, 2.0 * np.pi, points)
    return np.asarray(mu) + k * np.stack([np.cos(t), np.sin(t)], -1) @ np.linalg.cholesky(cov).T


def _figure(ncols: int, width: float = 4.4, height: float = 3.9):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def field_figures(task: Any, report: Mapping[str, Any], model: Any, out_dir: Path) -> list[str]:
    """labels.png (metric maps over the label plane), samples.png (flow vs exact), pvalues.png,
    loss.png (training history): the file names written into ``out_dir``.
    """
    from ..training import read_history
    from .base import RUN_DIR
    from .gaussian_field import field_mean

    rows = report["metrics"]["per_label"]
    labels = np.array([r["label"] for r in rows])
    nodes = task.training_labels()
    on_node = np.array([r["group"] == "heldout_nodes" for r in rows])
    names = []

    # 1. metric maps over the label plane
    fig, axes = _figure(3)
    maps = (
        ("kl", np.array([r["kl"] for r in rows]), 0.05, "KL estimate (nat/event)"),
        (
            "offset",
            np.array([np.max(r["mean_offset_sigma"]) for r in rows]),
            0.1,
            r"max$_i$ $|\hat\mu_i - \mu_i| / \sigma_i$",
        ),
        (
            "frob",
            np.array([r["cov_frobenius_rel"] for r in rows]),
            0.1,
            r"$\|\hat\Sigma - \Sigma\|_F / \|\Sigma\|_F$",
        ),
    )
    for ax, (_, values, target, title) in zip(axes, maps):
        ax.scatter(nodes[:, 0], nodes[:, 1], s=6, c="0.7", label="training nodes")
        for mask, marker, text in ((on_node, "s", "held-out nodes"), (~on_node, "o", "off-grid")):
            sc = ax.scatter(
                labels[mask, 0],
                labels[mask, 1],
                c=values[mask],
                marker=marker,
                s=55,
                cmap="viridis",
                vmin=0.0,
                vmax=2 * target,
                edgecolors="k",
                linewidths=0.5,
                label=text,
            )
        fig.colorbar(sc, ax=ax, label=f"{title} (target {target:g})")
        ax.set(
            xlabel=r"$\lambda_1$",
            ylabel=r"$\lambda_2$",
            xlim=(-0.05, 1.05),
            ylim=(-0.05, 1.05),
            aspect="equal",
        )
    axes[0].legend(
        loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3, fontsize=7, frameon=False
    )
    names.append(save_figure(fig, out_dir / "labels.png"))

    # 2. flow draws and 2-sigma ellipses: the whole plane, and the worst-KL label
    fig, axes = _figure(2, width=5.0, height=4.8)
    worst = int(np.argmax([r["kl"] for r in rows]))
    for i, r in enumerate(rows):
        exact, flow = ellipse(r["mu"], r["cov"]), ellipse(r["mu_hat"], r["cov_hat"])
        for ax in axes if i == worst else axes[:1]:
            if ax is axes[1]:
                draws = model.sample(2000, np.asarray(r["label"], np.float32), seed=i).numpy()
                ax.scatter(
                    draws[:, 0], draws[:, 1], s=2, c="tab:red", alpha=0.3, label="flow draws"
                )
                for k in (1.0, 3.0):
                    ax.plot(*ellipse(r["mu"], r["cov"], k).T, c="k", lw=0.8)
            ax.plot(*exact.T, c="k", lw=1.0, label="exact 2$\\sigma$" if i == worst else None)
            ax.plot(
                *flow.T,
                c="tab:red",
                ls="--",
                lw=1.0,
                label="flow 2$\\sigma$" if i == worst else None,
            )
    axes[0].scatter(*field_mean(nodes).T, s=4, c="0.6", label=r"$\mu$ of training nodes")
    axes[0].set(
        title="held-out labels: exact vs flow 2$\\sigma$ contours",
        xlabel="$x_1$",
        ylabel="$x_2$",
        aspect="equal",
    )
    lam = rows[worst]["label"]
    axes[1].set(
        title=f"worst KL: lambda = ({lam[0]:.3f}, {lam[1]:.3f}), KL = {rows[worst]['kl']:.3g}",
        xlabel="$x_1$",
        ylabel="$x_2$",
        aspect="equal",
    )
    for ax in axes:
        ax.legend(fontsize=7, loc="best")
    names.append(save_figure(fig, out_dir / "samples.png"))

    # 3. p-values per held-out label
    fig, axes = _figure(1, width=7.0)
    ax = axes[0]
    order = np.argsort([r["chi2"]["p_value"] for r in rows])
    x = np.arange(len(rows))
    ax.semilogy(
        x, [rows[j]["chi2"]["p_value"] for j in order], "o", c="k", label="chi2 (8x8 raw counts)"
    )
    for name, marker in (("ks", "v"), ("classifier", "^"), ("energy", "s"), ("mmd", "D")):
        if "other_tests" in rows[0]:
            ax.semilogy(
                x,
                [max(rows[j]["other_tests"][name]["p_value"], 1e-6) for j in order],
                marker,
                ms=4,
                alpha=0.6,
                label=name,
            )
    ax.axhline(P_THRESHOLD, c="tab:red", lw=0.8, label=f"p = {P_THRESHOLD}")
    ax.set(
        xlabel="held-out label (sorted by chi2 p)",
        ylabel="p-value (flow vs exact events)",
        ylim=(1e-6, 1.5),
    )
    ax.legend(fontsize=7, ncol=3)
    names.append(save_figure(fig, out_dir / "pvalues.png"))

    # 4. the loss curve
    history = read_history(out_dir / RUN_DIR)
    if len(history["epoch"]):
        fig, axes = _figure(1, width=6.0)
        ax = axes[0]
        ax.plot(history["epoch"], history["loss"], label="training")    # epochs count from 1
        if np.isfinite(history.get("val_loss", [np.nan])).any():
            ax.plot(history["epoch"], history["val_loss"], label="validation")
        ax.set(xlabel="epoch", ylabel="-mean log p (nat/event)")
        ax.legend()
        names.append(save_figure(fig, out_dir / "loss.png"))
    return names
