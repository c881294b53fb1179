"""Photo-z diagnostics (issue #15): short trainings on subsets, scored by KL(exact ‖ flow).

Each call trains one configuration on the first ``--n-train`` galaxies of the study's training set
(more than its 2·10^5: a new simulated set of that size; ``--copies R``: those galaxies plus R new
noise realisations of each, :meth:`tfgalflow.photoz.PhotoZ.reobserve`) and scores it on the first
``--n-eval`` galaxies of its test set (exact posteriors cached), then
adds one entry (keyed by ``--tag``) to studies/photoz/diagnostics.json: mean KL over all galaxies
and over the exactly bimodal ones, median KL, MAP σ_NMAD and η (flow and exact), PIT KS, 68 % HPD
coverage, epochs run, best validation loss and the training time. The mean KL over the galaxies is
also the gap between the flow's and the exact posterior's expected -ln p(z_true | x), so it is the
quantity maximum likelihood lowers. The bimodal KL is also split by the chain rule into the two
modes' weights and their shapes (:func:`tfgalflow.posterior.mode_mass_kl`).

``--model mdn`` trains the reference photo-z pipeline's other model instead of a flow: a mixture
density network (Bishop 1994), p(z | x) = Σ_k w_k(x) N(z; μ_k(x), σ_k(x)) with ``--components``
Gaussians whose weights, means and log-widths (clipped to [-7, 3] in standardised z) come from the
same conditioner (``--hidden``, ``--activation``) on the standardised features, trained by Adam
with the same batch, learning rate (cosine decay), clipping, validation split and epochs, keeping
the best validation epoch. It is a baseline for the flows, not a package model. ``--rescore``
scores an entry's saved flow again (new metrics on an old run) instead of training. Every entry
saves its posteriors in its cache directory, and ``--mix TAG,TAG,...`` scores the equal-weight
mixture of several entries' posteriors (an ensemble, of flows, MDNs or both) as a new entry. Usage:

    PYTHONPATH=. python scripts/photoz_diagnostics.py --tag base --n-train 50000 --epochs 30
    PYTHONPATH=. python scripts/photoz_diagnostics.py --tag mdn_k8 --model mdn --components 8 \
        --n-train 200000 --epochs 60 --activation gelu --batch 256 --lr 3e-3 --clip-norm 5
    PYTHONPATH=. python scripts/photoz_diagnostics.py --tag mix --mix c0_e60_clip5,mdn_k8_e60_clip5
    PYTHONPATH=. python scripts/photoz_diagnostics.py --tag res --model mdn --blocks 4 \
        --hidden 256 --n-train 1000000 --epochs 30 --activation gelu --batch 256 --lr 3e-3 \
        --clip-norm 5                   # a residual conditioner on 10^6 new galaxies
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from tfgalflow import photoz, posterior
from tfgalflow.atomic import atomic_file, write_json

OUT = Path("studies/photoz")
CACHE = OUT / "cache"
GRID = posterior.parse_grid("0:3:0.005")
POSTERIOR = "posterior.npy"         # each entry's [n_eval, G] posteriors, in its cache dir


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
    parser.add_argument("--model", choices=("flow", "mdn"), default="flow",
                        help="a spline flow (the package's) or the mixture density network "
                             "baseline")
    parser.add_argument("--components", type=int, default=8, help="Gaussians of --model mdn")
    parser.add_argument("--blocks", type=int, default=0,
                        help="--model mdn: a residual conditioner of this many pre-norm blocks "
                             "(LayerNorm, Dense, activation, Dense, added back) of the first "
                             "--hidden width, instead of the plain --hidden stack")
    parser.add_argument("--snr-features", action="store_true",
                        help="append the 10 signal-to-noise ratios F_b / σ_b to the 20 features "
                             "(a redundant, derived input)")
    parser.add_argument("--rescore", action="store_true",
                        help="score the entry's saved flow again instead of training")
    parser.add_argument("--mix", metavar="TAG,TAG,...",
                        help="score the equal-weight mixture of these entries' saved posteriors "
                             "(an ensemble of flows and MDNs) as entry --tag")
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

    run_dir = CACHE / f"diag_{args.tag}"
    report_path = OUT / "diagnostics.json"

    def read_report() -> dict:          # read late: other diagnostics may finish meanwhile
        return json.loads(report_path.read_text()) if report_path.exists() else {}

    if args.rescore and not args.mix:
        old = read_report().get(args.tag)
        if old is None or not (run_dir / "config.json").exists():
            parser.error(f"--rescore: no entry {args.tag!r} with a saved flow in {run_dir}")
        # the entry's own conditioning features, whatever flags this call was given
        args.snr_features = bool(old["settings"].get("snr_features", False))
    features_eval = conditioning(sim, d["xt"][:args.n_eval], args)
    if args.mix:
        tags = args.mix.split(",")
        missing = [t for t in tags if not (CACHE / f"diag_{t}" / POSTERIOR).exists()]
        if len(tags) < 2 or missing:
            parser.error(f"--mix: needs two or more entries with saved posteriors "
                         f"(missing: {missing})")
        post = np.mean([np.load(CACHE / f"diag_{t}" / POSTERIOR) for t in tags], axis=0)
        entry = {"settings": vars(args), "mixture_of": tags, **scores(post, exact, zt)}
    elif args.rescore:
        from tfgalflow.training import load_run
        post = posterior.posterior_grid(load_run(run_dir), features_eval, GRID)
        entry = {**old, **scores(post, exact, zt)}
    else:
        z_train, x_train = training_set(args, sim, d)
        labels = conditioning(sim, x_train, args)
        t = time.time()
        if args.model == "mdn":
            log_density, trained = train_mdn(z_train.astype(np.float32), labels, args)
            seconds = time.time() - t
            post = posterior.normalise(log_density(features_eval, GRID), GRID)
            settings = vars(args)
        else:
            flow, trained, config = train_flow(z_train, labels, args, run_dir)
            seconds = time.time() - t
            post = posterior.posterior_grid(flow, features_eval, GRID)
            settings = {**vars(args), "train_config": config.to_dict()}
        entry = {"settings": settings, "seconds": seconds, **trained, **scores(post, exact, zt)}
    if not args.mix:
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(run_dir / POSTERIOR, suffix=".npy") as tmp:
            np.save(tmp, post.astype(np.float32))
    report = read_report()
    report[args.tag] = entry
    write_json(report_path, report)
    print(json.dumps({k: v for k, v in entry.items() if k != "settings"}))


def conditioning(sim: photoz.PhotoZ, inputs: np.ndarray, args: argparse.Namespace
                 ) -> np.ndarray:
    """The models' conditioning features [N, 20] (asinh magnitudes, ln errors) of inputs [N, 20],
    with ``--snr-features`` also the signal-to-noise ratios F_b / σ_b [N, 30]."""
    features = sim.features(inputs)
    if args.snr_features:
        n = photoz.N_BANDS
        features = np.concatenate([features, inputs[:, :n] / inputs[:, n:]], axis=1)
    return features.astype(np.float32)


def training_set(args: argparse.Namespace, sim: photoz.PhotoZ, d: dict
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(z [n], inputs [n, 20]): the first ``--n-train`` cached galaxies, or a new set of that size
    (more than the cache holds, or ``--copies``: plus new noise realisations of each)."""
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
    return z_train, x_train


def train_flow(z: np.ndarray, labels: np.ndarray, args: argparse.Namespace, run_dir: Path):
    """(flow, {epochs_run, best_val_loss, val_loss_every_tenth}, TrainConfig): the package's
    training of a spline flow (ensemble) on z [n] given labels [n, 20]."""
    from tfgalflow.training import TrainConfig, train

    config = TrainConfig(
        kind="spline", layers=args.layers, hidden=tuple(int(h) for h in args.hidden.split(",")),
        activation=args.activation, bins=args.bins, epochs=args.epochs,
        batch_size=args.batch, lr=args.lr, patience=args.patience, checkpoint_every=0,
        seed=args.seed, members=args.members, weight_decay=args.weight_decay,
        validation_split=args.validation_split, clip_norm=args.clip_norm,
    )
    shutil.rmtree(run_dir, ignore_errors=True)
    flow = train(z[:, None].astype(np.float32), config, run_dir, labels=labels, verbose=0)
    epochs_run, best_val, val_curve = [], [], []
    for h in sorted(run_dir.glob("**/history.csv")):
        rows = np.genfromtxt(h, delimiter=",", names=True)
        val = np.atleast_1d(rows["val_loss"])
        epochs_run.append(int(np.atleast_1d(rows["epoch"]).max()))     # 1-based epochs
        best_val.append(float(np.nanmin(val)))
        val_curve.append(every_tenth(val))
    return flow, {"epochs_run": epochs_run, "best_val_loss": best_val,
                  "val_loss_every_tenth": val_curve}, config


def train_mdn(z: np.ndarray, labels: np.ndarray, args: argparse.Namespace):
    """(log_density, {epochs_run, best_val_loss, val_loss_every_tenth}) of a mixture density
    network trained on z [n] given labels [n, 20] (module docstring); ``log_density(labels [N,
    20], grid [G])`` is ln p(z_g | labels) [N, G] per unit z, at the best validation epoch.

    ln p(z | x) = logsumexp_k [ln w_k + ln N(u; μ_k, σ_k)] - ln s_z, u = (z - m_z) / s_z.
    """
    import os
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import tensorflow as tf
    import tf_keras as keras

    rng = np.random.default_rng(args.seed)
    order = rng.permutation(z.size)
    n_val = int(round(args.validation_split * z.size))
    val, fit = order[:n_val], order[n_val:]
    c_mean, c_std = labels[fit].mean(0), labels[fit].std(0)
    z_mean, z_std = float(z[fit].mean()), float(z[fit].std())
    c = ((labels - c_mean) / c_std).astype(np.float32)
    u = ((z - z_mean) / z_std).astype(np.float32)
    keras.utils.set_random_seed(args.seed)
    inputs = keras.Input((labels.shape[1],))
    widths = [int(w) for w in args.hidden.split(",")]
    if args.blocks:                     # pre-norm residual MLP (He et al. 2016; Xiong et al. 2020)
        h = keras.layers.Dense(widths[0])(inputs)
        for _ in range(args.blocks):
            r = keras.layers.LayerNormalization()(h)
            r = keras.layers.Dense(widths[0], activation=args.activation)(r)
            h = keras.layers.Add()([h, keras.layers.Dense(widths[0])(r)])
        h = keras.layers.Activation(args.activation)(keras.layers.LayerNormalization()(h))
    else:
        h = inputs
        for width in widths:
            h = keras.layers.Dense(width, activation=args.activation)(h)
    net = keras.Model(inputs, keras.layers.Dense(3 * args.components)(h))
    log_2pi = float(np.log(2.0 * np.pi))

    def log_prob(params, uu):          # ln p(u | x) [N] in standardised units
        logits, mu, raw = tf.split(params, 3, axis=-1)
        log_sigma = tf.clip_by_value(raw, -7.0, 3.0)
        comp = (-0.5 * tf.square((uu[:, None] - mu) * tf.exp(-log_sigma)) - log_sigma
                - 0.5 * log_2pi)
        return tf.reduce_logsumexp(tf.nn.log_softmax(logits) + comp, axis=-1)

    steps = args.epochs * int(np.ceil(fit.size / args.batch))
    optimizer = keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(args.lr, steps),
                                      global_clipnorm=args.clip_norm)

    @tf.function
    def step(cb, ub):
        with tf.GradientTape() as tape:
            loss = -tf.reduce_mean(log_prob(net(cb), ub))
        grads = tape.gradient(loss, net.trainable_variables)
        optimizer.apply_gradients(zip(grads, net.trainable_variables))

    @tf.function
    def summed(cb, ub):
        return -tf.reduce_sum(log_prob(net(cb), ub))

    data = (tf.data.Dataset.from_tensor_slices((c[fit], u[fit]))
            .shuffle(fit.size, seed=args.seed).batch(args.batch))
    best, best_weights, curve, since = np.inf, None, [], 0
    for _ in range(args.epochs):
        for cb, ub in data:
            step(cb, ub)
        loss = sum(float(summed(c[val][i:i + 20_000], u[val][i:i + 20_000]))
                   for i in range(0, n_val, 20_000)) / n_val + np.log(z_std)   # nat per unit z
        curve.append(loss)
        if loss < best:
            best, best_weights, since = loss, net.get_weights(), 0
        else:
            since += 1
            if since >= args.patience:
                break
    net.set_weights(best_weights)

    def log_density(features: np.ndarray, grid: np.ndarray) -> np.ndarray:
        cc = ((features - c_mean) / c_std).astype(np.float32)
        g = ((grid - z_mean) / z_std).astype(np.float32)
        rows = []
        for i in range(0, len(cc), 200):
            params = net(cc[i:i + 200])
            k = int(params.shape[0])
            lp = log_prob(tf.repeat(params, g.size, axis=0), tf.tile(g, [k]))
            rows.append(tf.reshape(lp, (k, g.size)).numpy().astype(np.float64))
        return np.concatenate(rows) - np.log(z_std)

    return log_density, {"epochs_run": [len(curve)], "best_val_loss": [float(best)],
                         "val_loss_every_tenth": [every_tenth(curve)]}


def every_tenth(losses) -> list[float]:
    """About ten of a validation-loss curve's values, evenly spaced, rounded to 1e-4 nat."""
    return [round(float(v), 4) for v in losses[::max(1, len(losses) // 10)]]


def scores(post: np.ndarray, exact: np.ndarray, zt: np.ndarray) -> dict:
    """The entry's metrics of posteriors [N, G] against the exact ones [N, G] at truths [N]."""
    kl = posterior.kl_divergence(exact, post, GRID)
    bimodal = posterior.is_bimodal(exact, GRID)
    s_flow, s_exact = posterior.summarize(post, GRID, zt), posterior.summarize(exact, GRID, zt)
    m_flow = posterior.point_metrics(s_flow["map"], zt)
    m_exact = posterior.point_metrics(s_exact["map"], zt)
    return {
        "kl_all_mean": float(kl.mean()),
        "kl_all_median": float(np.median(kl)),
        "kl_bimodal_mean": float(kl[bimodal].mean()),
        "kl_bimodal_mode_masses": float(
            posterior.mode_mass_kl(exact[bimodal], post[bimodal], GRID).mean()),
        "kl_unimodal_mean": float(kl[~bimodal].mean()),
        "sigma_nmad": [m_flow["sigma_nmad"], m_exact["sigma_nmad"]],
        "eta": [m_flow["eta"], m_exact["eta"]],
        "pit_ks": posterior.pit_ks(s_flow["pit"]),
        "hpd68_coverage": float(np.mean(s_flow["hpd_level"] <= 0.68)),
    }


if __name__ == "__main__":
    main()
