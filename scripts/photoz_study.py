"""Photo-z study (issue #15): a 1-D spline flow p(z | 10 fluxes + 10 errors) against the exact
posterior.

Writes studies/photoz/report.json and figures; resumable (data, exact posteriors and the training
run are cached under studies/photoz/cache, which is not committed). Usage:

    PYTHONPATH=. python scripts/photoz_study.py [--epochs 60] [--members 4] [--train 200000]
    PYTHONPATH=. python scripts/photoz_study.py --conditional-rescaling --out studies/photoz_cr

Default model (chosen by scripts/photoz_diagnostics.py, studies/photoz/diagnostics.json): one
rational-quadratic spline layer of 32 bins conditioned by a 2 x 256 GELU network on asinh
magnitudes and ln errors, batch 256, lr 3e-3 with a cosine schedule; an ensemble of 4 such flows
(seeds 0..3; their mixture is the posterior) trained for 60 epochs each.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from tfgalflow import photoz, posterior
from tfgalflow.atomic import write_json

OUT = Path("studies/photoz")
CACHE = OUT / "cache"
GRID = posterior.parse_grid("0:3:0.005")
EDGES = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
# injected offsets of the simulated "real" set (ln units): zero points a_b (reference band 0),
# errors e_b
INJECTED_FLUX = np.round(np.random.default_rng(11).normal(0.0, 0.05, photoz.N_BANDS), 3)
INJECTED_FLUX[photoz.REFERENCE_BAND] = 0.0
INJECTED_ERROR = np.round(np.random.default_rng(12).normal(0.0, 0.1, photoz.N_BANDS), 3)


def cached(name: str, make):
    path = CACHE / f"{name}.npz"
    if path.exists():
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    t = time.time()
    arrays = make()
    np.savez(path, **arrays)
    print(f"{name}: {time.time() - t:.0f} s", flush=True)
    return arrays


def main() -> None:
    global OUT
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", type=int, default=200_000)
    parser.add_argument("--test", type=int, default=20_000)
    parser.add_argument("--calib", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--patience", type=int, default=20)
    parser.add_argument("--hidden", default="256,256")
    parser.add_argument("--activation", default="gelu")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--bins", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--clip-norm", type=float, default=None,
                        help="TrainConfig.clip_norm: clip each step's gradient to this norm")
    parser.add_argument("--conditional-rescaling", action="store_true",
                        help="TrainConfig.conditional_rescaling: z's location and log-scale "
                             "linear in the features before the spline")
    parser.add_argument("--out", default=str(OUT),
                        help="report, figures and the training run (OUT/cache/run); the data "
                             "cache stays in studies/photoz/cache")
    args = parser.parse_args()
    OUT = Path(args.out)
    CACHE.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    sim = photoz.PhotoZ()

    def simulate(n, seed):
        z, x = sim.simulate(n, seed)
        return {"z": z, "x": x}

    train = cached(f"train_{args.train}", lambda: simulate(args.train, 1))
    test = cached(f"test_{args.test}", lambda: simulate(args.test, 2))
    real = cached(f"real_{args.calib}", lambda: simulate(args.calib, 3))
    real_x = photoz.apply_offsets(real["x"], INJECTED_FLUX, INJECTED_ERROR)
    exact = cached(f"exact_{args.test}", lambda: {"post": sim.exact_posterior(test["x"], GRID)})[
        "post"
    ]

    from tfgalflow.training import TrainConfig, load_run, resume, train as fit
    run_dir = OUT / "cache" / "run"
    hidden = tuple(int(h) for h in args.hidden.split(","))
    config = TrainConfig(
        kind="spline",
        layers=args.layers,
        hidden=hidden,
        activation=args.activation,
        bins=args.bins,
        epochs=args.epochs,
        batch_size=args.batch,
        lr=args.lr,
        patience=args.patience,
        checkpoint_every=5,
        seed=0,
        members=args.members,
        conditional_rescaling=args.conditional_rescaling,
        clip_norm=args.clip_norm,
    )
    data, labels = (
        train["z"][:, None].astype(np.float32),
        sim.features(train["x"]).astype(np.float32),
    )
    t = time.time()
    if (run_dir / "config.json").exists():
        try:
            flow = load_run(run_dir)
        except Exception:                       # unfinished run: continue it
            flow = resume(run_dir, data, labels, verbose=2)
    else:
        flow = fit(data, config, run_dir, labels=labels, verbose=2)
    train_seconds = time.time() - t
    history = [np.genfromtxt(h, delimiter=",", names=True)
               for h in sorted(run_dir.glob("**/history.csv"))]

    t = time.time()
    post = posterior.posterior_grid(flow, sim.features(test["x"]), GRID)
    grid_seconds = time.time() - t
    compared = posterior.compare(post, exact, GRID, test["z"], EDGES)
    m_flow, m_exact = compared["flow"], compared["exact"]

    # calibration of the simulated "real" set
    t = time.time()
    before = posterior.summarize(
        posterior.posterior_grid(flow, sim.features(real_x), GRID), GRID, real["z"]
    )
    cal = photoz.calibrate(flow, real["z"], real_x, softening=sim.softening)
    after = posterior.summarize(
        posterior.posterior_grid(flow, sim.features(cal.apply(real_x)), GRID), GRID, real["z"]
    )
    cal_seconds = time.time() - t
    pulls = cal.pulls(INJECTED_FLUX, INJECTED_ERROR)           # every fitted offset
    # the same fit on a simulated set without offsets: what the flow's own error adds
    null_set = cached(f"null_{args.calib}", lambda: simulate(args.calib, 4))
    null = photoz.calibrate(flow, null_set["z"], null_set["x"], softening=sim.softening)
    null_pulls = null.pulls(np.zeros(photoz.N_BANDS), np.zeros(photoz.N_BANDS))

    report = {
        "settings": {
            "train": args.train,
            "test": args.test,
            "calib": args.calib,
            "grid": "0:3:0.005",
            "train_config": config.to_dict() if hasattr(config, "to_dict") else str(config),
            "features": "asinh magnitudes asinh(F/2σ0) and ln(σ/σ0), σ0 = 0.1",
            "survey": {
                k: (list(v) if isinstance(v, tuple) else v) for k, v in sim.survey.__dict__.items()
            },
        },
        "seconds": {
            "train": train_seconds,
            "posterior_grid_test": grid_seconds,
            "calibration": cal_seconds,
            "total": time.time() - t_start,
        },
        "history": [{"epochs": int(np.atleast_1d(h["epoch"]).max()),
                     "final_loss": float(np.atleast_1d(h["loss"])[-1]),
                     "best_val_loss": float(np.nanmin(np.atleast_1d(h["val_loss"])))}
                    for h in history],
        "exact": m_exact,
        "flow": m_flow,
        "targets": {
            "sigma_nmad_rel_diff": compared["sigma_nmad_rel_diff"],
            "eta_diff": compared["eta_diff"],
            "pit_ks_flow": m_flow["pit_ks"],
            "hpd68_coverage_flow": m_flow["hpd68_coverage"],
            "bimodal_fraction_exact": compared["bimodal_fraction"],
            "kl_exact_flow_bimodal_mean": compared["kl"]["bimodal_mean"],
            "kl_exact_flow_all_mean": compared["kl"]["mean"],
            "kl_exact_flow_all_median": compared["kl"]["median"],
            "calibration_max_abs_pull": float(np.max(np.abs(pulls))),
            "calibration_chi2_per_dof": float(np.mean(pulls**2)),
            "calibration_dof": int(pulls.size),
            "null_calibration_max_abs_pull": float(np.max(np.abs(null_pulls))),
            "null_calibration_chi2_per_dof": float(np.mean(null_pulls**2)),
        },
        "calibration": {
            **cal.to_dict(),
            "injected_flux": INJECTED_FLUX.tolist(),
            "injected_error": INJECTED_ERROR.tolist(),
            "pulls": pulls.tolist(),
            "null": {**null.to_dict(), "pulls": null_pulls.tolist()},
            "before": posterior.overall_metrics(before, real["z"], EDGES),
            "after": posterior.overall_metrics(after, real["z"], EDGES),
        },
    }
    write_json(OUT / "report.json", report)
    print(json.dumps(report["targets"], indent=1))

    posterior.plot_comparison(OUT, GRID, post, exact, test["z"])


if __name__ == "__main__":
    main()
