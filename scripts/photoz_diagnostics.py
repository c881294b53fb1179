"""Photo-z diagnostics (issue #15): short trainings on subsets, scored by KL(exact ‖ flow).

Each call trains one configuration on the first ``--n-train`` galaxies of the study's training set
(more than its 2·10^5: a new simulated set of that size; ``--copies R``: those galaxies plus R new
noise realisations of each, :meth:`tfgalflow.photoz.PhotoZ.reobserve`) and scores it on the first
``--n-eval`` galaxies of its test set (exact posteriors cached), then
adds one entry (keyed by ``--tag``) to studies/photoz/diagnostics.json: mean KL over all galaxies
and over the exactly bimodal ones, median KL, MAP σ_NMAD and η (flow and exact), PIT KS, 68 % HPD
coverage, epochs run, best validation loss and the training time. The mean KL over the galaxies is
also the gap between the flow's and the exact posterior's expected -ln p(z_true | x), so it is the
quantity maximum likelihood lowers. Usage:

    PYTHONPATH=. python scripts/photoz_diagnostics.py --tag base --n-train 50000 --epochs 30
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from tfgalflow import photoz, posterior
from tfgalflow.atomic import write_json

OUT = Path("studies/photoz")
CACHE = OUT / "cache"
GRID = posterior.parse_grid("0:3:0.005")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tag", required=True)
    parser.add_argument("--n-train", type=int, default=50_000)
    parser.add_argument("--n-eval", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--patience", type=int, default=20)
    parser.add_argument("--hidden", default="256,256")
    parser.add_argument("--activation", default="relu")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--bins", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--members", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weight-decay", type=float, default=0.0,
                        help="TrainConfig.weight_decay (decoupled, AdamW)")
    parser.add_argument("--copies", type=int, default=0,
                        help="train on the galaxies plus this many new noise realisations of each "
                             "(PhotoZ.reobserve)")
    parser.add_argument("--validation-split", type=float, default=0.1)
    parser.add_argument("--clip-norm", type=float, default=None,
                        help="TrainConfig.clip_norm (global gradient norm)")
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    sim = photoz.PhotoZ()
    path = CACHE / "diag_data.npz"
    if not path.exists():
        z, x = sim.simulate(200_000, 1)                 # the study's training set (seed 1)
        zt, xt = sim.simulate(20_000, 2)                # the study's test set (seed 2)
        exact = sim.exact_posterior(xt[:args.n_eval], GRID)
        np.savez(path, z=z, x=x, zt=zt[:args.n_eval], xt=xt[:args.n_eval], exact=exact)
    with np.load(path) as f:
        d = {k: f[k] for k in f.files}
    exact, zt = d["exact"][:args.n_eval], d["zt"][:args.n_eval]

    from tfgalflow.training import TrainConfig, train
    config = TrainConfig(
        kind="spline", layers=args.layers, hidden=tuple(int(h) for h in args.hidden.split(",")),
        activation=args.activation, bins=args.bins, epochs=args.epochs,
        batch_size=args.batch, lr=args.lr, patience=args.patience, checkpoint_every=0,
        seed=args.seed, members=args.members, weight_decay=args.weight_decay,
        validation_split=args.validation_split, clip_norm=args.clip_norm,
    )
    run_dir = CACHE / f"diag_{args.tag}"
    shutil.rmtree(run_dir, ignore_errors=True)
    n = args.n_train
    z_train, x_train = d["z"][:n], d["x"][:n]
    if n > d["z"].size or args.copies:
        # the cached set is simulate(200_000, 1) (again, with its templates and amplitudes);
        # a larger n is a new set of that size, not a superset
        z_all, x_all, truth = sim.simulate(max(n, d["z"].size), 1, return_truth=True)
        z_train, x_train = z_all[:n], x_all[:n]
        if args.copies:
            z_new, x_new = sim.reobserve(z_train, x_train,
                                         {k: v[:n] for k, v in truth.items()}, args.copies,
                                         seed=101)
            z_train, x_train = np.concatenate([z_train, z_new]), np.concatenate([x_train, x_new])
    t = time.time()
    flow = train(z_train[:, None].astype(np.float32), config, run_dir,
                 labels=sim.features(x_train).astype(np.float32), verbose=0)
    seconds = time.time() - t
    histories = sorted(run_dir.glob("**/history.csv"))
    epochs_run, best_val, val_curve = [], [], []
    for h in histories:
        rows = np.genfromtxt(h, delimiter=",", names=True)
        val = np.atleast_1d(rows["val_loss"])
        epochs_run.append(int(np.atleast_1d(rows["epoch"]).max()))     # 1-based epochs
        best_val.append(float(np.nanmin(val)))
        val_curve.append([round(float(v), 4) for v in val[::max(1, val.size // 10)]])

    post = posterior.posterior_grid(flow, sim.features(d["xt"][:args.n_eval]), GRID)
    kl = posterior.kl_divergence(exact, post, GRID)
    bimodal = posterior.is_bimodal(exact, GRID)
    s_flow, s_exact = posterior.summarize(post, GRID, zt), posterior.summarize(exact, GRID, zt)
    m_flow = posterior.point_metrics(s_flow["map"], zt)
    m_exact = posterior.point_metrics(s_exact["map"], zt)
    entry = {
        "settings": {**vars(args), "train_config": config.to_dict()},
        "seconds": seconds,
        "epochs_run": epochs_run,
        "best_val_loss": best_val,
        "val_loss_every_tenth": val_curve,
        "kl_all_mean": float(kl.mean()),
        "kl_all_median": float(np.median(kl)),
        "kl_bimodal_mean": float(kl[bimodal].mean()),
        "kl_unimodal_mean": float(kl[~bimodal].mean()),
        "sigma_nmad": [m_flow["sigma_nmad"], m_exact["sigma_nmad"]],
        "eta": [m_flow["eta"], m_exact["eta"]],
        "pit_ks": posterior.pit_ks(s_flow["pit"]),
        "hpd68_coverage": float(np.mean(s_flow["hpd_level"] <= 0.68)),
    }
    report_path = OUT / "diagnostics.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    report[args.tag] = entry
    write_json(report_path, report)
    print(json.dumps({k: v for k, v in entry.items() if k != "settings"}))


if __name__ == "__main__":
    main()
