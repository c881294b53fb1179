"""Deconvolution study: a flow fitted to the 10 %-noise Hernquist mock, plain vs deconvolved.

    python scripts/deconvolution_study.py --out studies/deconvolution            # reduced size
    python scripts/deconvolution_study.py --out studies/deconvolution_1e6 --n 1000000 \\
        --coordinates spherical --members 4 --epochs 20 --batch-size 2048 --lr 1e-3 \\
        --velocities 16384 --clip-norm 10                                         # issue size

The mock is ``mocks.sample_hernquist(n, "iso", r_max=100)`` with ``mocks.add_noise(cat, 0.1)``
(each Cartesian coordinate times 1 + 0.1 N(0, 1), the reference study's convention; the catalogue
records fractional errors s = 0.1), cut at r < 100a as in ``tfgalflow.study``. Two flows with the
same architecture, epochs, batches, members and seeds are trained on it: the plain
maximum-likelihood fit (learns the noise-convolved DF) and ``TrainConfig(deconvolve=True,
noise_samples=K)`` (learns the error-free DF; tfgalflow.deconvolution). A third fit, the plain
one on the same stars before the noise ("noise_free"), is the ceiling: what a perfect
deconvolution could reach with this flow and budget. A fourth ("deconvolved_selected") is the
deconvolved fit told how the catalogue was cut (``selection_r_max=100``: the cut acts on the
noisy radii, so without its normaliser the deconvolved DF is pushed low inside ~r_max). With
``--coordinates spherical`` all learn (r, v_r, v_t) (the package's best route for a spherical
system, a :class:`~tfgalflow.spherical_df.SphericalDF`; the errors still act on the Cartesian
columns); that DF is exactly rotation invariant, so its "rotations" column is the learned one.
For each:

* accelerations from the CBE (``cbe.accelerations``) at ``--radii`` radii log-spaced over
  0.1a-10a, learned DF and its ``SphericalAverage`` over ``--rotations`` rotations; figure of merit
  the median vector fractional error |a - a_true| / |a_true| (``study.fractional_error``, exact
  Hernquist acceleration) over 0.2a <= r <= 5a;
* the log-density error against the exact DF at ``--n-test`` fresh noise-free stars:
  Δ = log f_learned - log f_exact (f_exact renormalised to the r < 100a cut, f / M(<100a)),
  reported as rms(Δ), and mean(-Δ) = KL(f_exact || f_learned) (nats), over all test stars and
  over 0.2a <= r <= 5a; and the same rms in bins of the test star's binding energy
  ε = 1 − v²/(2Ψ(r)) (ε → 0 is the escape edge, where f → 0 and a handful of stars can carry
  most of the squared error). Δ per test star is kept in results/<name>.delta.npy, and each
  plain/other ratio of an rms comes with a bootstrap interval over the test stars (16th-84th and
  2.5th-97.5th percentiles of 2000 resamples, the same resample for both fits): how well 20000
  test stars determine it.

Resumable: runs/<name>/ are continued with ``training.resume`` (finished ones are loaded) and each
evaluation is cached in results/<name>.json. Writes report.json and figures (accelerations.png,
logdensity.png) into --out.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from tfgalflow.validation import unit_vectors
from tfgalflow.atomic import write_json
from tfgalflow.catalogue.core import NOISE_PROPOSALS
from tfgalflow.cbe import accelerations, radial_component
from tfgalflow.hernquist import Hernquist
from tfgalflow.mocks import add_noise, cut, sample_hernquist
from tfgalflow.study import fractional_error
from tfgalflow.symmetry import SphericalAverage
from tfgalflow.training import TrainConfig, resume, train

STAR_R_MAX = 100.0
FITS = ("plain", "deconvolved", "noise_free", "deconvolved_selected")
SUMMARY_RANGE = (0.2, 5.0)
PARTS = ("all", "in_range")              # the test stars a bootstrap interval is over
NOISE = 0.1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=100_000, help="stars in the mock")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", default="64,64")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--noise-samples", type=int, default=8, help="K of the deconvolved fit")
    p.add_argument("--noise-proposal", default="kernel", choices=NOISE_PROPOSALS,
                   help="TrainConfig.noise_proposal of the deconvolved fits (kernel by default, "
                        "as the studies before the tilt ran)")
    p.add_argument("--coordinates", default="cartesian", choices=("cartesian", "spherical"))
    p.add_argument("--members", type=int, default=1, help="ensemble members of each fit")
    p.add_argument("--clip-norm", type=float, default=None, help="TrainConfig.clip_norm")
    p.add_argument("--radii", type=int, default=20)
    p.add_argument("--velocities", type=int, default=256)
    p.add_argument("--rotations", type=int, default=32)
    p.add_argument("--n-test", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--support", action="store_true",
                   help="every fit bounds the radius at the mock's r_max (TrainConfig."
                        "support_r_max = 100: the flow learns log(r / (100 - r)))")
    p.add_argument("--fits", default="plain,deconvolved,noise_free,deconvolved_selected",
                   help="the fits to run, of plain, deconvolved, noise_free, "
                        "deconvolved_selected")
    args = p.parse_args()
    wanted = [f.strip() for f in args.fits.split(",") if f.strip()]
    if not wanted or not set(wanted) <= set(FITS):
        p.error(f"--fits {args.fits!r}: expected names from {', '.join(FITS)}")

    out = Path(args.out)
    (out / "results").mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "fits")}
    settings.update(noise=NOISE, noise_convention="coordinate", star_r_max=STAR_R_MAX,
                    summary_range=list(SUMMARY_RANGE))
    write_json(out / "study_settings.json", settings)

    model = Hernquist()
    clean = sample_hernquist(args.n, "iso", seed=args.seed, r_max=STAR_R_MAX)
    cat = cut(add_noise(clean, NOISE, seed=args.seed + 1), r_max=STAR_R_MAX)
    test = sample_hernquist(args.n_test, "iso", seed=args.seed + 2, r_max=STAR_R_MAX)
    rng = np.random.default_rng(args.seed + 3)
    radii = np.geomspace(0.1, 10.0, args.radii)
    positions = radii[:, None] * unit_vectors(args.radii, rng)
    a_true = model.acceleration(positions)
    in_range = (radii >= SUMMARY_RANGE[0]) & (radii <= SUMMARY_RANGE[1])
    test_r = test.r
    test_in_range = (test_r >= SUMMARY_RANGE[0]) & (test_r <= SUMMARY_RANGE[1])
    test_epsilon = 1.0 - test.speed ** 2 / (2.0 * model.relative_potential(test_r))
    # f integrates to M = 1 over all phase space; the mock is cut at r < 100a
    log_f_exact = (model.log_df(test.pos, test.vel, "iso")
                   - np.log(float(model.enclosed_mass(STAR_R_MAX))))

    base = TrainConfig(layers=args.layers, hidden=tuple(int(h) for h in args.hidden.split(",")),
                       epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       lr_schedule="cosine", patience=0, validation_split=0.1, seed=args.seed,
                       coordinates=args.coordinates, members=args.members,
                       clip_norm=args.clip_norm,
                       support_r_max=STAR_R_MAX if args.support else None)
    fits = {"plain": base,
            "deconvolved": base.with_overrides(deconvolve=True, noise_samples=args.noise_samples,
                                               noise_proposal=args.noise_proposal),
            "noise_free": base,
            "deconvolved_selected": base.with_overrides(
                deconvolve=True, noise_samples=args.noise_samples, selection_r_max=STAR_R_MAX,
                noise_proposal=args.noise_proposal)}
    # the plain fit to the same stars before the noise: what a perfect deconvolution could reach
    # with this flow and budget (its error is the flow's own, not the noise's)
    data = {"plain": cat, "deconvolved": cat, "noise_free": clean, "deconvolved_selected": cat}
    results = {}
    for name, config in ((k, v) for k, v in fits.items() if k in wanted):
        cached = out / "results" / f"{name}.json"
        if cached.exists():
            results[name] = json.loads(cached.read_text())
            print(f"[{name}] cached: {cached}")
            continue
        run_dir = out / "runs" / name
        t0 = time.perf_counter()
        if (run_dir / "config.json").exists():
            flow = resume(run_dir, data=data[name], verbose=2)
        else:
            flow = train(data[name], config, run_dir, verbose=2)
        train_s = time.perf_counter() - t0
        epochs_run = sum(np.atleast_1d(np.genfromtxt(
            run_dir / f"member_{k:03d}" / "history.csv", delimiter=",", names=True)["epoch"]).size
            for k in range(args.members))
        t0 = time.perf_counter()
        res = accelerations(flow, positions, n_velocities=args.velocities, seed=args.seed)
        sym = res if args.coordinates == "spherical" else accelerations(   # already symmetric
            SphericalAverage(flow, args.rotations, seed=args.seed), positions,
            n_velocities=args.velocities, seed=args.seed)
        err, err_sym = fractional_error(res.acceleration, a_true), fractional_error(
            sym.acceleration, a_true)
        delta = np.asarray(flow.log_prob(test.phase_space), np.float64) - log_f_exact
        np.save(out / "results" / f"{name}.delta.npy", delta)
        r = {"train_seconds": train_s, "eval_seconds": time.perf_counter() - t0,
             "epochs_run": int(epochs_run),      # summed over the members
             "seconds_per_epoch": train_s / max(1, int(epochs_run)),
             "median_fractional_error": float(np.median(err[in_range])),
             "median_fractional_error_symmetrised": float(np.median(err_sym[in_range])),
             "rms_log_density_error": float(np.sqrt(np.mean(delta ** 2))),
             "kl_exact_learned": float(-np.mean(delta)),
             "rms_log_density_error_in_range": float(np.sqrt(np.mean(delta[test_in_range] ** 2))),
             "kl_exact_learned_in_range": float(-np.mean(delta[test_in_range])),
             "per_radius": {"r": radii.tolist(), "fractional_error": err.tolist(),
                            "fractional_error_symmetrised": err_sym.tolist(),
                            "a_r": radial_component(positions, res.acceleration).tolist(),
                            "a_r_symmetrised": radial_component(positions,
                                                                sym.acceleration).tolist()},
             "log_density_error_by_radius": _binned(test_r, delta),
             "log_density_error_by_energy": _binned_energy(test_epsilon, delta)}
        write_json(cached, r)
        results[name] = r
        print(f"[{name}] {r['epochs_run']} epochs in {train_s:.0f} s; median |da|/|a| "
              f"{r['median_fractional_error']:.2%} learned, "
              f"{r['median_fractional_error_symmetrised']:.2%} with {args.rotations} rotations; "
              f"rms log-density error {r['rms_log_density_error']:.3f}, KL "
              f"{r['kl_exact_learned']:.3f} nats")

    keys = ("median_fractional_error", "median_fractional_error_symmetrised",
            "rms_log_density_error", "kl_exact_learned", "rms_log_density_error_in_range",
            "kl_exact_learned_in_range")
    ratios = {f"ratios_plain_over_{name}": {key: results["plain"][key] / results[name][key]
                                            for key in keys}
              for name in results if name != "plain" and "plain" in results}
    intervals = _bootstrap_ratios(out, results, test_in_range)
    report = {
        "settings": settings, "n_stars": len(cat),
        "definitions": {
            "fractional_error": "|a - a_true| / |a_true| (vector), median over 0.2a <= r <= 5a",
            "rms_log_density_error": "rms of log f_learned - log f_exact at noise-free test stars",
            "kl_exact_learned": "mean of log f_exact - log f_learned at noise-free test stars"},
        "results": {k: {kk: vv for kk, vv in v.items() if kk not in ("per_radius",)}
                    for k, v in results.items()},
        # ratios_plain_over_noise_free: the largest any deconvolution could reach with this
        # flow and budget
        **ratios,
        # the same ratios of rms errors resampled over the test stars: [16, 84] and [2.5, 97.5]
        # percentiles (fits evaluated before Δ was saved have none)
        "bootstrap_intervals_plain_over": intervals,
        "targets": {"median_fractional_error_at_1e6": 0.015,
                    "log_density_error_ratio": 2.0}}
    write_json(out / "report.json", report)
    _figures(out, results, args.rotations)
    print(json.dumps({k: v for k, v in report.items() if k.startswith("ratios")}, indent=1))


def _binned_energy(epsilon: np.ndarray, delta: np.ndarray) -> dict:
    """Count, mean and rms of Δ log f in bins of the binding energy ε = 1 − v²/(2Ψ(r))."""
    edges = (0.0, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0)
    rows = {"epsilon": [], "count": [], "mean": [], "rms": [], "share_of_squares": []}
    total = float(np.sum(delta ** 2))
    for lo, hi in zip(edges[:-1], edges[1:]):
        d = delta[(epsilon >= lo) & (epsilon < hi)]
        rows["epsilon"].append([lo, hi])
        rows["count"].append(int(d.size))
        rows["mean"].append(float(d.mean()) if d.size else None)
        rows["rms"].append(float(np.sqrt(np.mean(d ** 2))) if d.size else None)
        rows["share_of_squares"].append(float(np.sum(d ** 2)) / total)
    return rows


def _bootstrap_ratios(out: Path, results: dict, in_range: np.ndarray,
                      resamples: int = 2000) -> dict:
    """{fit: {"all": [p16, p84, p2.5, p97.5], "in_range": [...]}}: percentiles of
    rms(Δ_plain) / rms(Δ_fit) over resamples of the test stars (with replacement, one resample
    for both fits, so their shared test stars stay paired).
    """
    deltas = {name: np.load(out / "results" / f"{name}.delta.npy") for name in results
              if (out / "results" / f"{name}.delta.npy").exists()}
    if "plain" not in deltas:
        return {}
    rng = np.random.default_rng(12345)
    n = deltas["plain"].size
    squares = {name: d ** 2 for name, d in deltas.items()}
    ratios = {(name, part): [] for name in deltas if name != "plain" for part in PARTS}
    for _ in range(resamples):                   # one resample of the test stars for every fit
        idx = rng.integers(0, n, size=n)
        for part, mask in zip(PARTS, (np.ones(n, bool), in_range[idx])):
            plain = np.sqrt(squares["plain"][idx][mask].mean())
            for name in deltas:
                if name != "plain":
                    ratios[name, part].append(plain / np.sqrt(squares[name][idx][mask].mean()))
    intervals = {}
    for (name, part), values in ratios.items():
        intervals.setdefault(name, {})[part] = np.percentile(values, [16, 84, 2.5, 97.5]).tolist()
    return intervals


def _binned(r: np.ndarray, delta: np.ndarray, n_bins: int = 12) -> dict:
    """Mean and rms of Δ log f in log-spaced radial bins of the test stars."""
    edges = np.geomspace(0.05, STAR_R_MAX, n_bins + 1)
    idx = np.digitize(r, edges) - 1
    rows = {"r_mid": [], "mean": [], "rms": [], "count": []}
    for b in range(n_bins):
        d = delta[idx == b]
        if d.size:
            rows["r_mid"].append(float(np.sqrt(edges[b] * edges[b + 1])))
            rows["mean"].append(float(d.mean()))
            rows["rms"].append(float(np.sqrt(np.mean(d ** 2))))
            rows["count"].append(int(d.size))
    return rows


def _figures(out: Path, results: dict, rotations: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, style in (("plain", "C0"), ("deconvolved", "C1"), ("noise_free", "C2"),
                        ("deconvolved_selected", "C3")):
        if name not in results:
            continue
        pr = results[name]["per_radius"]
        ax.loglog(pr["r"], pr["fractional_error"], style + "--", label=f"{name}, learned")
        ax.loglog(pr["r"], pr["fractional_error_symmetrised"], style + "-",
                  label=f"{name}, {rotations} rotations")
    ax.axvspan(*SUMMARY_RANGE, color="0.9", zorder=0)
    ax.set_xlabel("r / a")
    ax.set_ylabel("|a - a_true| / |a_true|")
    ax.set_title("Hernquist iso, 10 % noise")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accelerations.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, style in (("plain", "C0"), ("deconvolved", "C1"), ("noise_free", "C2"),
                        ("deconvolved_selected", "C3")):
        if name not in results:
            continue
        b = results[name]["log_density_error_by_radius"]
        ax.semilogx(b["r_mid"], b["mean"], style + "-o", ms=3, label=f"{name}: mean Δ")
        ax.semilogx(b["r_mid"], b["rms"], style + ":", label=f"{name}: rms Δ")
    ax.axhline(0.0, color="k", lw=0.5)
    ax.set_xlabel("r / a (noise-free test stars)")
    ax.set_ylabel("Δ = log f_learned - log f_exact")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "logdensity.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
