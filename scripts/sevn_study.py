"""SEVN-NF study (issue #14): emulate the exact population-synthesis grid and infer (Z, α).

Steps (each resumable: finished steps are read back from studies/sevn/work/):
  1. the grid (15 Z x 4 α nodes, 2000 events per node, sorted by node) written as Parquet with
     dictionary-encoded label columns and read back; two whole nodes held out;
  2. a conditional spline flow p(m0, m1' | Z, α) with log columns for both masses and a label log
     column for Z, trained on the other 58 nodes (Keras fit, shuffled, best validation weights);
  3. raw-input control: the same flow without any log transform on raw masses and raw Z (a few
     epochs): NaN-free or not; the errors for non-positive values in log columns;
  4. held-out nodes: mean log-density error vs the exact density (KL and mean |Δ|, nats/event);
  5. unphysical-sample fraction of flow samples per column (m0 in [3, 60]; 0 < m1' <= m0);
  6. hyperparameter recovery at three off-grid (Z, α), 8 independent 1000-event sets each: emcee
     posterior under the prior Z log-uniform [1e-4, 0.03], α uniform [0.5, 5]; 68 % coverage and
     median |Δ log10 Z| of the posterior median, for the flow and (control) for the exact density.

    PYTHONPATH=. python scripts/sevn_study.py [--out studies/sevn] [--epochs 60]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

import tfgalflow  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow)
from tfgalflow import popsynth
from tfgalflow.atomic import write_json
from tfgalflow.catalogue import read_parquet, write_parquet
from tfgalflow.errors import InputError
from tfgalflow.flows import FlowConfig
from tfgalflow.inference import (
    Prior,
    likelihood_map,
    plot_corner,
    plot_likelihood_map,
    sample_posterior,
)
from tfgalflow.model import Flow

TRUTHS = ((2.2e-3, 2.0), (4.4e-4, 0.7), (1.2e-2, 4.0))
SETS_PER_TRUTH = 8
N_EVENTS = 1000
PRIOR = "Z=1e-4:0.03:log,alpha=0.5:5"
FLOW = dict(
    dim=2,
    label_dim=2,
    layers=6,
    hidden=(64, 64),
    kind="spline",
    bins=8,
    log_columns=(0, 1),
    label_log_columns=(0,),
    seed=0,
)


def cached(path: Path, compute):
    if path.exists():
        return json.loads(path.read_text())
    t0 = time.time()
    result = compute()
    result["seconds"] = round(time.time() - t0, 1)
    write_json(path, result)
    return result


def fit(flow: Flow, x, c, epochs: int, batch: int, lr: float, patience: int, seed: int):
    import tf_keras as keras

    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(x))
    n_val = len(x) // 10
    val, tr = idx[:n_val], idx[n_val:]
    flow.adapt(x[tr], c[tr])
    steps = epochs * math.ceil(len(tr) / batch)
    schedule = keras.optimizers.schedules.CosineDecay(lr, steps)
    flow.compile(keras.optimizers.Adam(schedule), jit_compile=True)
    keras.utils.set_random_seed(seed)
    stop = keras.callbacks.EarlyStopping("val_loss", patience=patience, restore_best_weights=True)
    hist = flow.fit(
        x[tr],
        c[tr],
        batch_size=batch,
        epochs=epochs,
        shuffle=True,
        verbose=0,
        validation_data=(x[val], c[val]),
        callbacks=[stop],
    )
    return {k: [float(v) for v in vals] for k, vals in hist.history.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="studies/sevn")
    ap.add_argument("--epochs", type=int, default=60)
    args = ap.parse_args()
    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    report = {
        "settings": {
            "flow": FLOW,
            "events_per_node": 2000,
            "held_out_nodes": popsynth.held_out_labels().tolist(),
            "truths": TRUTHS,
            "sets_per_truth": SETS_PER_TRUTH,
            "n_events": N_EVENTS,
            "prior": PRIOR,
            "epochs_max": args.epochs,
        }
    }

    # 1. the grid as Parquet (sorted by node, labels dictionary-encoded), minus the held-out nodes
    grid_file = work / "grid.parquet"
    if not grid_file.exists():
        events, labels = popsynth.simulate("grid", n_per_node=2000, seed=0)
        write_parquet(grid_file, events, labels, popsynth.EVENT_NAMES, popsynth.LABEL_NAMES)
    table = read_parquet(grid_file, popsynth.EVENT_NAMES, popsynth.LABEL_NAMES)
    held = popsynth.held_out_labels()
    keep = ~np.any([np.all(np.isclose(table.labels, h), axis=1) for h in held], axis=0)
    x, c = table.events[keep], table.labels[keep]
    report["data"] = {
        "rows_total": len(table),
        "rows_train": int(keep.sum()),
        "parquet_bytes": grid_file.stat().st_size,
    }

    # 2. the emulator
    weights = work / "flow.weights.h5"
    flow = Flow(FlowConfig(**FLOW))
    if weights.exists():
        flow.load_weights(weights)
        history = json.loads((work / "history.json").read_text())
    else:
        t0 = time.time()
        history = fit(flow, x, c, args.epochs, batch=1024, lr=2e-3, patience=10, seed=0)
        history["seconds"] = round(time.time() - t0, 1)
        flow.save_weights(weights)
        write_json(work / "history.json", history)
    report["training"] = {
        "epochs": len(history["loss"]),
        "best_val_loss": min(history["val_loss"]),
        "seconds": history.get("seconds"),
    }

    # 3. raw inputs, no log transform (the reference's setup), and the log-column errors
    def raw_control():
        raw = Flow(
            FlowConfig(dim=2, label_dim=2, layers=6, hidden=(64, 64), kind="affine", seed=0)
        )
        h = fit(raw, x, c, epochs=8, batch=1024, lr=2e-3, patience=8, seed=0)
        errors = {}
        bad = x[:100].copy()
        bad[3, 1] = 0.0
        for name, call in (
            ("data", lambda: Flow(FlowConfig(**FLOW)).adapt(bad, c[:100])),
            (
                "label",
                lambda: Flow(FlowConfig(**FLOW)).adapt(
                    x[:100], np.where(np.arange(100)[:, None] == 7, 0.0, c[:100])
                ),
            ),
        ):
            try:
                call()
                errors[name] = None
            except InputError as exc:
                errors[name] = str(exc)
        return {
            "loss": h["loss"],
            "val_loss": h["val_loss"],
            "nan_free": bool(np.all(np.isfinite(h["loss"] + h["val_loss"]))),
            "errors_for_non_positive": errors,
        }

    report["raw_input_control"] = cached(work / "raw_control.json", raw_control)

    # 4. held-out nodes (and two training nodes for comparison): log-density error vs exact
    def heldout():
        rows = []
        compare = [
            popsynth.grid_labels()[popsynth.node_index(7, 0)],
            popsynth.grid_labels()[popsynth.node_index(2, 3)],
        ]
        for kind, labels in [("held_out", h) for h in held] + [("training", t) for t in compare]:
            ev, lab = popsynth.simulate(np.array([labels]), 20000, seed=11)
            d = popsynth.log_prob(ev, lab) - flow.log_prob(ev, lab).numpy().astype(np.float64)
            rows.append(
                {
                    "kind": kind,
                    "labels": labels.tolist(),
                    "kl_nats": float(d.mean()),
                    "kl_stderr": float(d.std() / math.sqrt(len(d))),
                    "mean_abs_nats": float(np.abs(d).mean()),
                }
            )
        return {"nodes": rows}

    report["held_out"] = cached(work / "held_out.json", heldout)

    # 5. unphysical fraction of flow samples
    def unphysical():
        labels = np.concatenate([held, np.array(TRUTHS), popsynth.training_labels()])
        n = 20000
        samples = np.concatenate(
            [
                flow.sample(n, np.tile(lab, (n, 1)).astype(np.float32), seed=k).numpy()
                for k, lab in enumerate(labels)
            ]
        )
        frac = popsynth.unphysical_fraction(samples)
        return {
            "n_samples": int(samples.shape[0]),
            "n_label_points": int(len(labels)),
            "fraction_per_column": {"m0 in [3, 60]": frac["m0"], "0 < m1 <= m0": frac["m1"]},
            "fraction_any": frac["any"],
        }

    report["unphysical"] = cached(work / "unphysical.json", unphysical)

    # 6. hyperparameter recovery
    prior = Prior.parse(PRIOR)

    def recovery(model, tag):
        rows = []
        for t_i, truth in enumerate(TRUTHS):
            for s in range(SETS_PER_TRUTH):
                ev, _ = popsynth.simulate(np.array([truth]), N_EVENTS, seed=1000 + 100 * t_i + s)
                post = sample_posterior(model, ev, prior, walkers=16, steps=300, burn=100, seed=s)
                iv = post.intervals()
                rows.append(
                    {
                        "truth": list(truth),
                        "set": s,
                        "intervals_68": iv,
                        "covered": post.covers(truth),
                        "dlog10Z": math.log10(iv["Z"][1] / truth[0]),
                        "dalpha": iv["alpha"][1] - truth[1],
                    }
                )
                if t_i == 0 and s == 0:
                    plot_corner(post, out / f"corner_{tag}.png", truth)
                    plot_likelihood_map(
                        likelihood_map(model, ev, prior, 40),
                        out / f"likelihood_map_{tag}.png",
                        truth,
                        prior,
                    )
        cov = {n: float(np.mean([r["covered"][n] for r in rows])) for n in prior.names}
        return {
            "sets": rows,
            "coverage_68": cov,
            "median_abs_dlog10Z": float(np.median([abs(r["dlog10Z"]) for r in rows])),
            "median_abs_dalpha": float(np.median([abs(r["dalpha"]) for r in rows])),
        }

    report["recovery_flow"] = cached(work / "recovery_flow.json", lambda: recovery(flow, "flow"))
    report["recovery_exact"] = cached(
        work / "recovery_exact.json", lambda: recovery(popsynth, "exact")
    )

    ho = [r for r in report["held_out"]["nodes"] if r["kind"] == "held_out"]
    rf = report["recovery_flow"]
    report["targets"] = {
        "held_out_kl_nats_max": {"measured": max(r["kl_nats"] for r in ho), "target": "<= 0.05"},
        "held_out_mean_abs_nats_max": {
            "measured": max(r["mean_abs_nats"] for r in ho),
            "target": "(<= 0.05 if read as mean |error|)",
        },
        "coverage_68": {
            "measured": rf["coverage_68"],
            "target": "0.60-0.76",
            "sets": len(rf["sets"]),
        },
        "median_abs_dlog10Z": {"measured": rf["median_abs_dlog10Z"], "target": "<= 0.1"},
        "unphysical_fraction": {
            "measured": report["unphysical"]["fraction_any"],
            "target": "< 1e-3",
        },
        "raw_input_training_nan_free": report["raw_input_control"]["nan_free"],
    }
    _figures(out, flow, history, held)
    write_json(out / "report.json", report)
    print(json.dumps(report["targets"], indent=1))


def _figures(out: Path, flow: Flow, history: dict, held: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(history["loss"], label="train")
    ax.plot(history["val_loss"], label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("-log p (nats/event)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(len(held), 2, figsize=(8, 3.2 * len(held)), squeeze=False)
    for i, lab in enumerate(held):
        ev, _ = popsynth.simulate(np.array([lab]), 20000, seed=5)
        s = flow.sample(20000, np.tile(lab, (20000, 1)).astype(np.float32), seed=5).numpy()
        for j, name in enumerate(("m0", "m1'")):
            bins = np.linspace(0, 60, 61)
            axes[i, j].hist(ev[:, j], bins, histtype="step", density=True, label="exact")
            axes[i, j].hist(s[:, j], bins, histtype="step", density=True, label="flow")
            axes[i, j].set_xlabel(f"{name} (Msun)")
            axes[i, j].set_title(f"held-out Z={lab[0]:.2g}, alpha={lab[1]:g}")
        axes[i, 0].legend()
    fig.tight_layout()
    fig.savefig(out / "held_out_marginals.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
