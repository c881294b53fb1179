"""SEVN-NF study (issue #14): emulate the exact population-synthesis grid and infer (Z, α).

Steps (each resumable: finished steps, and each finished event set, are read back from
studies/sevn/work/):
  1. the grid (15 Z x 4 α nodes, 2000 events per node, sorted by node) written as Parquet with
     dictionary-encoded label columns and read back; two whole nodes held out;
  2. a conditional spline flow p(m0, m1' | Z, α) with log columns for both masses, label log
     columns for Z and α, and a tanh conditioner, trained on the other 58 nodes (Keras fit,
     shuffled, best validation weights);
  3. raw-input control: an affine flow without any log transform on raw masses and raw Z (a few
     epochs): NaN-free or not; the errors for non-positive values in log columns;
  4. held-out nodes: mean log-density error vs the exact density (KL and mean |Δ|, nats/event);
  5. unphysical-sample fraction of flow samples per column (m0 in [3, 60]; 0 < m1' <= m0);
  6. the expected log-likelihood of 1000 events along α and along Z at three off-grid truths,
     exact vs flow vs the previous emulator (linear α, ReLU; 20 epochs) as a control;
  7. hyperparameter recovery at the three off-grid (Z, α): per 1000-event set the maximum, the
     Laplace covariance there, and an emcee posterior started from it (12 walkers, 80 steps, 16
     burn-in; τ per set in the report) under the prior Z log-uniform [1e-4, 0.03], α uniform
     [0.5, 5]; 68 % coverage and median |Δ log10 Z| of the posterior median, for the flow (16
     sets per truth: 48 sets, where a calibrated 68 % interval lands in 60-76 % with probability
     0.78; 24 sets would give 0.62) and for the exact density on the same sets and on 32 per
     truth (what the statistics allow).

    PYTHONPATH=. python scripts/sevn_study.py [--out studies/sevn] [--epochs 60]
        [--sets-per-truth 16] [--exact-sets-per-truth 32] [--control-epochs 20]
        [--members 4] [--clip-norm 10]

The emulator is a deep ensemble of K = --members such flows (seeds 0..K-1, gradients clipped to
global norm 10), their mixture (1/K) Σ_k p_k (tfgalflow.model.Ensemble) used in steps 4-7: one
flow's seed-to-seed error moved the 1000-event posteriors by ~0.3 σ along the Z-α degeneracy
(studies/sevn_single_flow: --members 1 --clip-norm 0).
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
    log_likelihood,
    maximise,
    plot_corner,
    plot_likelihood_map,
    sample_posterior,
)
from tfgalflow.model import Ensemble, Flow

TRUTHS = ((2.2e-3, 2.0), (4.4e-4, 0.7), (1.2e-2, 4.0))
N_EVENTS = 1000
#: emcee: the walkers start from the Laplace approximation at the maximum, so a burn-in of ~2 tau
#: suffices; tau ~ 7-8 steps (measured per set, in the report) leaves ~100 independent draws per
#: posterior for its 16 % / 84 % quantiles (their probability error ~0.04)
EMCEE = dict(walkers=12, steps=80, burn=16)
#: draws per truth for the expected log-likelihood profiles (noise ~0.1 nat on 1000 events)
PROFILE_DRAWS = 5000
PRIOR = "Z=1e-4:0.03:log,alpha=0.5:5"
FLOW = dict(
    dim=2,
    label_dim=2,
    layers=6,
    hidden=(64, 64),
    kind="spline",
    bins=8,
    log_columns=(0, 1),
    label_log_columns=(0, 1),
    activation="tanh",
    seed=0,
)
#: The previous emulator (linear alpha, ReLU conditioner): its likelihood in alpha did not
#: interpolate between the alpha nodes; trained as a control for the profiles
CONTROL_FLOW = FLOW | dict(label_log_columns=(0,), activation="relu")


def cached(path: Path, compute):
    if path.exists():
        return json.loads(path.read_text())
    t0 = time.time()
    result = compute()
    result["seconds"] = round(time.time() - t0, 1)
    write_json(path, result)
    return result


def fit(flow: Flow, x, c, epochs: int, batch: int, lr: float, patience: int, seed: int,
        clip_norm: float | None = None):
    import tf_keras as keras

    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(x))
    n_val = len(x) // 10
    val, tr = idx[:n_val], idx[n_val:]
    flow.adapt(x[tr], c[tr])
    steps = epochs * math.ceil(len(tr) / batch)
    schedule = keras.optimizers.schedules.CosineDecay(lr, steps)
    flow.compile(keras.optimizers.Adam(schedule, global_clipnorm=clip_norm), jit_compile=True)
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
    ap.add_argument("--control-epochs", type=int, default=20, help="0: no control flow")
    ap.add_argument(
        "--sets-per-truth", type=int, default=16, help="flow recovery sets per truth"
    )
    ap.add_argument(
        "--exact-sets-per-truth", type=int, default=32, help="exact-density control sets"
    )
    ap.add_argument("--members", type=int, default=4,
                    help="ensemble members (seeds 0..K-1), combined as a mixture (model.Ensemble)")
    ap.add_argument("--clip-norm", type=float, default=10.0,
                    help="global gradient-norm clip of Adam (0: off)")
    args = ap.parse_args()
    if args.members < 1 or args.clip_norm < 0:
        ap.error("--members must be >= 1 and --clip-norm >= 0")
    args.clip_norm = args.clip_norm or None
    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    report = {
        "settings": {
            "flow": FLOW,
            "events_per_node": 2000,
            "held_out_nodes": popsynth.held_out_labels().tolist(),
            "truths": TRUTHS,
            "sets_per_truth": args.sets_per_truth,
            "exact_sets_per_truth": args.exact_sets_per_truth,
            "control_flow": CONTROL_FLOW,
            "control_epochs": args.control_epochs,
            "emcee": EMCEE,
            "n_events": N_EVENTS,
            "prior": PRIOR,
            "epochs_max": args.epochs,
            "members": args.members,
            "clip_norm": args.clip_norm,
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
    # TF checkpoint format: matched by object path (an .h5 file of this subclassed model reloads
    # its spline networks in the wrong order into a fresh Flow)
    members, histories = [], []
    for k in range(args.members):
        weights = work / ("flow.ckpt" if k == 0 else f"flow{k}.ckpt")
        history_file = work / ("history.json" if k == 0 else f"history{k}.json")
        member = Flow(FlowConfig(**(FLOW | dict(seed=k))))
        if weights.with_name(weights.name + ".index").exists():
            member.load_weights(weights)
            history = json.loads(history_file.read_text())
        else:
            t0 = time.time()
            history = fit(member, x, c, args.epochs, batch=1024, lr=2e-3, patience=10, seed=k,
                          clip_norm=args.clip_norm)
            history["seconds"] = round(time.time() - t0, 1)
            member.save_weights(weights)
            write_json(history_file, history)
        members.append(member)
        histories.append(history)
    history = histories[0]
    flow = members[0] if len(members) == 1 else Ensemble(members)
    report["training"] = {
        "epochs": len(history["loss"]),
        "best_val_loss": min(history["val_loss"]),
        "seconds": history.get("seconds"),
        "members": [{"epochs": len(h["loss"]), "best_val_loss": min(h["val_loss"]),
                     "seconds": h.get("seconds")} for h in histories],
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

    # 6. the likelihood along alpha and log Z at the off-grid truths: exact, flow, and the
    #    previous emulator (ReLU, linear alpha) as a control; off-grid KL
    control = None
    if args.control_epochs > 0:
        control = Flow(FlowConfig(**CONTROL_FLOW))
        if (work / "control.ckpt.index").exists():
            control.load_weights(work / "control.ckpt")
        else:
            t0 = time.time()
            h = fit(control, x, c, args.control_epochs, batch=1024, lr=2e-3, patience=10, seed=0)
            h["seconds"] = round(time.time() - t0, 1)
            control.save_weights(work / "control.ckpt")
            write_json(work / "control_history.json", h)
        h = json.loads((work / "control_history.json").read_text())
        report["control_training"] = {
            "epochs": len(h["loss"]),
            "best_val_loss": min(h["val_loss"]),
            "seconds": h["seconds"],
        }
    models = {"exact": popsynth, "flow": flow} | ({"control": control} if control else {})
    report["profiles"] = cached(work / "profiles.json", lambda: profiles(models))

    # 7. hyperparameter recovery: the flow on sets_per_truth sets per truth; the exact density
    #    (control) on the same sets and on more, to show what the statistics allow
    prior = Prior.parse(PRIOR)
    report["recovery_flow"] = recovery(
        flow, "flow", args.sets_per_truth, work / "recovery_flow", out, prior
    )
    report["recovery_exact_same_sets"] = recovery(
        popsynth, "exact", args.sets_per_truth, work / "recovery_exact", out, prior
    )
    report["recovery_exact"] = recovery(
        popsynth, "exact", args.exact_sets_per_truth, work / "recovery_exact", out, prior
    )
    report["flow_vs_exact_same_sets"] = paired(
        report["recovery_flow"]["sets"], report["recovery_exact_same_sets"]["sets"]
    )

    ho = [r for r in report["held_out"]["nodes"] if r["kind"] == "held_out"]
    rf, rx = report["recovery_flow"], report["recovery_exact"]
    cov_ok = all(0.60 <= v <= 0.76 for v in rf["coverage_68"].values())
    report["targets"] = {
        "held_out_kl_nats_max": {
            "measured": max(r["kl_nats"] for r in ho),
            "target": "<= 0.05",
            "met": max(r["kl_nats"] for r in ho) <= 0.05,
        },
        "held_out_mean_abs_nats_max": {
            "measured": max(r["mean_abs_nats"] for r in ho),
            "target": "(<= 0.05 if read as mean |error|)",
            "met": max(r["mean_abs_nats"] for r in ho) <= 0.05,
        },
        "coverage_68": {
            "measured": rf["coverage_68"],
            "target": "0.60-0.76 (each label)",
            "sets": rf["n_sets"],
            "met": cov_ok,
            "binomial_std": rf["binomial_std"],
            "exact_density_same_sets": report["recovery_exact_same_sets"]["coverage_68"],
            "exact_density_all_sets": {"coverage_68": rx["coverage_68"], "sets": rx["n_sets"]},
        },
        "median_abs_dlog10Z": {
            "measured": rf["median_abs_dlog10Z"],
            "target": "<= 0.1",
            "met": rf["median_abs_dlog10Z"] <= 0.1,
            "exact_density_same_sets": report["recovery_exact_same_sets"]["median_abs_dlog10Z"],
        },
        "unphysical_fraction": {
            "measured": report["unphysical"]["fraction_any"],
            "target": "< 1e-3",
            "met": report["unphysical"]["fraction_any"] < 1e-3,
        },
        "raw_input_training_nan_free": report["raw_input_control"]["nan_free"],
    }
    _recovery_figure(out / "recovery.png", report)
    _profile_figure(out / "alpha_profile.png", report["profiles"])
    _figures(out, flow, history, held)
    write_json(out / "report.json", report)
    print(json.dumps(report["targets"], indent=1))


def profiles(models: dict) -> dict:
    """E[log L] of 1000 events along alpha (at the true Z) and log Z (at the true alpha).

    The expectation over events x ~ p(x | truth) is 1000 x the mean over PROFILE_DRAWS draws, so
    the curves show the likelihood shape without one set's noise; KL(truth) = E[log p - log q] is
    the emulator's off-grid error at the truth.
    """
    rows = []
    alphas = np.linspace(0.5, 5.0, 91)
    zs = np.logspace(-4, math.log10(0.03), 61)
    for t_i, truth in enumerate(TRUTHS):
        ev, _ = popsynth.simulate(np.array([truth]), PROFILE_DRAWS, seed=7 + t_i)
        row = {"truth": list(truth), "alpha": alphas.tolist(), "Z": zs.tolist()}
        for name, model in models.items():
            along_a = np.stack([np.full_like(alphas, truth[0]), alphas], 1)
            along_z = np.stack([zs, np.full_like(zs, truth[1])], 1)
            la = log_likelihood(model, ev, along_a) * N_EVENTS / len(ev)
            lz = log_likelihood(model, ev, along_z) * N_EVENTS / len(ev)
            at_truth = log_likelihood(model, ev, np.array(truth))[0] / len(ev)
            row[name] = {
                "dlogL_alpha": (la - la.max()).tolist(),
                "dlogL_Z": (lz - lz.max()).tolist(),
                "argmax_alpha": float(alphas[np.argmax(la)]),
                "argmax_Z": float(zs[np.argmax(lz)]),
                "mean_log_p_at_truth": float(at_truth),
            }
        for name in models:
            if name != "exact":
                row[name]["kl_at_truth_nats"] = (
                    row["exact"]["mean_log_p_at_truth"] - row[name]["mean_log_p_at_truth"]
                )
        rows.append(row)
    return {"n_draws": PROFILE_DRAWS, "scaled_to_events": N_EVENTS, "truths": rows}


def event_set(t_i: int, s: int) -> np.ndarray:
    """Set s of N_EVENTS events at TRUTHS[t_i] (the same seeds for every model)."""
    return popsynth.simulate(np.array([TRUTHS[t_i]]), N_EVENTS, seed=1000 + 100 * t_i + s)[0]


def recovery(model, tag: str, sets: int, work: Path, out: Path, prior: Prior) -> dict:
    """Maximum, Laplace start and emcee posterior for `sets` event sets per truth; resumable
    (one JSON per set in `work`)."""
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for t_i, truth in enumerate(TRUTHS):
        for s in range(sets):
            path = work / f"truth{t_i}_set{s:02d}.json"
            if path.exists():
                rows.append(json.loads(path.read_text()))
                continue
            t0 = time.time()
            ev = event_set(t_i, s)
            best = maximise(model, ev, prior)
            post = sample_posterior(
                model, ev, prior, **EMCEE, seed=s, start=best["labels"],
                start_cov=best["laplace_cov_u"],
            )
            iv = post.intervals()
            row = {
                "truth": list(truth),
                "set": s,
                "maximum": best["labels"],
                "laplace_start": best["laplace_cov_u"] is not None,
                "intervals_68": iv,
                "covered": post.covers(truth),
                "dlog10Z": math.log10(iv["Z"][1] / truth[0]),
                "dalpha": iv["alpha"][1] - truth[1],
                "sd_log10Z": float(np.log10(post.samples[:, 0]).std()),
                "sd_alpha": float(post.samples[:, 1].std()),
                "autocorr_steps": list(post.autocorr),
                "acceptance": post.acceptance,
                "seconds": round(time.time() - t0, 1),
            }
            write_json(path, row)
            rows.append(row)
            print(f"{tag} truth {t_i} set {s}: {iv} covered {row['covered']} "
                  f"tau {np.round(post.autocorr, 1)} {row['seconds']} s", flush=True)
            if t_i == 0 and s == 0:
                plot_corner(post, out / f"corner_{tag}.png", truth)
                plot_likelihood_map(
                    likelihood_map(model, ev, prior, 40), out / f"likelihood_map_{tag}.png",
                    truth, prior,
                )
    n = len(rows)
    cov = {k: float(np.mean([r["covered"][k] for r in rows])) for k in prior.names}
    tau = np.array([r["autocorr_steps"] for r in rows])
    kept = EMCEE["walkers"] * (EMCEE["steps"] - EMCEE["burn"])
    return {
        "n_sets": n,
        "emcee": EMCEE,
        "coverage_68": cov,
        "coverage_68_both": float(np.mean([all(r["covered"].values()) for r in rows])),
        "coverage_68_per_truth": [
            {k: float(np.mean([r["covered"][k] for r in rows if r["truth"] == list(t)]))
             for k in prior.names}
            for t in TRUTHS
        ],
        "binomial_std": math.sqrt(0.68 * 0.32 / n),
        "calibrated_pass_probability": calibrated_pass_probability(n),
        "median_abs_dlog10Z": float(np.median([abs(r["dlog10Z"]) for r in rows])),
        "median_abs_dalpha": float(np.median([abs(r["dalpha"]) for r in rows])),
        "median_sd_log10Z": float(np.median([r["sd_log10Z"] for r in rows])),
        "median_sd_alpha": float(np.median([r["sd_alpha"] for r in rows])),
        "autocorr_steps_max": float(tau.max()),
        "autocorr_steps_median": float(np.median(tau)),
        "effective_samples_min": float(kept / tau.max()),
        "laplace_start_fraction": float(np.mean([r["laplace_start"] for r in rows])),
        "seconds": float(sum(r["seconds"] for r in rows)),
        "sets": rows,
    }


def calibrated_pass_probability(n: int) -> float:
    """P(coverage in [0.60, 0.76]) for n sets of a perfectly calibrated 68 % interval."""
    from scipy import stats

    k = np.arange(n + 1)
    ok = (k >= 0.60 * n - 1e-9) & (k <= 0.76 * n + 1e-9)
    return float(stats.binom.pmf(k[ok], n, 0.68).sum())


def paired(flow_rows: list, exact_rows: list) -> dict:
    """Flow vs exact posterior medians on the same event sets, in units of the exact posterior
    standard deviation."""
    dz = [
        (math.log10(f["intervals_68"]["Z"][1]) - math.log10(e["intervals_68"]["Z"][1]))
        / e["sd_log10Z"]
        for f, e in zip(flow_rows, exact_rows)
    ]
    da = [
        (f["intervals_68"]["alpha"][1] - e["intervals_68"]["alpha"][1]) / e["sd_alpha"]
        for f, e in zip(flow_rows, exact_rows)
    ]
    width = [
        (f["sd_log10Z"] / e["sd_log10Z"], f["sd_alpha"] / e["sd_alpha"])
        for f, e in zip(flow_rows, exact_rows)
    ]
    return {
        "median_shift_in_exact_sd": {
            "log10Z": float(np.median(dz)),
            "alpha": float(np.median(da)),
        },
        "median_abs_shift_in_exact_sd": {
            "log10Z": float(np.median(np.abs(dz))),
            "alpha": float(np.median(np.abs(da))),
        },
        "median_width_ratio_flow_over_exact": {
            "log10Z": float(np.median([w[0] for w in width])),
            "alpha": float(np.median([w[1] for w in width])),
        },
    }


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


def _recovery_figure(path: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flow_rows = report["recovery_flow"]["sets"]
    exact_rows = report["recovery_exact_same_sets"]["sets"]
    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for ax, key, log in ((axes[0], "Z", True), (axes[1], "alpha", False)):
        for rows, dx, colour, tag in ((exact_rows, -0.15, "grey", "exact"),
                                      (flow_rows, 0.15, "C0", "flow")):
            for i, r in enumerate(rows):
                lo, mid, hi = r["intervals_68"][key]
                t = r["truth"][0 if key == "Z" else 1]
                f = (lambda v: math.log10(v / t)) if log else (lambda v: v - t)
                ax.errorbar(i + dx, f(mid), [[f(mid) - f(lo)], [f(hi) - f(mid)]], fmt="o",
                            ms=3, color=colour, label=tag if i == 0 else None)
        ax.axhline(0, color="k", lw=0.8)
        cf = report["recovery_flow"]["coverage_68"][key]
        ce = report["recovery_exact_same_sets"]["coverage_68"][key]
        ax.set_ylabel("Δ log10 Z (dex)" if log else "Δ α")
        ax.set_title(f"{key}: 68 % intervals cover the truth in {cf:.0%} (flow), {ce:.0%} (exact)",
                     fontsize=9)
        n = report["recovery_flow"]["n_sets"] // len(TRUTHS)
        for k in range(1, len(TRUTHS)):
            ax.axvline(k * n - 0.5, color="k", ls=":", lw=0.8)
    axes[0].legend(fontsize=8)
    axes[1].set_xlabel("event set (1000 events each), grouped by truth " + ", ".join(
        f"({z:g}, {a:g})" for z, a in TRUTHS))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _profile_figure(path: Path, prof: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = prof["truths"]
    fig, axes = plt.subplots(2, len(rows), figsize=(4 * len(rows), 6.5), squeeze=False)
    styles = {"exact": ("k", 2.0), "flow": ("C0", 1.2), "control": ("C3", 1.0)}
    names = {"exact": "exact", "flow": "flow (log α, tanh)", "control": "control (α, ReLU)"}
    for j, row in enumerate(rows):
        for name, (colour, lw) in styles.items():
            if name not in row:
                continue
            axes[0, j].plot(row["alpha"], row[name]["dlogL_alpha"], color=colour, lw=lw,
                            label=names[name])
            axes[1, j].plot(row["Z"], row[name]["dlogL_Z"], color=colour, lw=lw)
        for i, (v, key) in enumerate(((row["truth"][1], "α"), (row["truth"][0], "Z"))):
            axes[i, j].axvline(v, color="grey", ls=":")
            axes[i, j].set_ylim(-40, 2)
            axes[i, j].set_xlabel(key)
        for a in popsynth.ALPHA_GRID:
            axes[0, j].axvline(a, color="grey", lw=0.5, alpha=0.4)
        axes[1, j].set_xscale("log")
        axes[0, j].set_title(f"truth Z={row['truth'][0]:g}, α={row['truth'][1]:g}", fontsize=9)
    axes[0, 0].set_ylabel("E[Δ log L], 1000 events")
    axes[1, 0].set_ylabel("E[Δ log L], 1000 events")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
