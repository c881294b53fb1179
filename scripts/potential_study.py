"""Potential network on the Hernquist mocks: Φ, |a| and ρ errors, no symmetry assumed (issue #17).

    python scripts/potential_study.py --out studies/potential                # iso, reduced size
    python scripts/potential_study.py --out studies/potential --mocks iso aniso

Per mock: sample n stars exactly (tfgalflow.mocks.sample_hernquist, r < 100a), train a flow on them
(tfgalflow.training.train, as tfgalflow.study does; resumed if runs/<mock> exists), fit the
potential network to the learned DF at the mock's stars (tfgalflow.potential.fit_potential; saved
in potentials/<mock>_learned) and, as a control, to the exact DF at the same stars (<mock>_exact:
the network's own error, free of the flow's). Errors at radii log-spaced in 0.2a-20a, each in many
random directions, against the exact Hernquist Φ, a and ρ:

* acceleration: |a − a_true| / |a_true| (vector), rms and median; sign bias = mean of
  (a_r − a_r,true) / |a_r,true| (radial component);
* potential: |ΔΦ − ΔΦ_true| / |Φ_true| with ΔΦ = Φ(x) − Φ(x_ref) (the gauge), and the same after
  removing the best constant offset (median difference over the evaluation set);
* density: |ρ / ρ_true − 1|.

and the per-position least squares (tfgalflow.cbe.accelerations, K velocities) of the learned DF,
with and without the rotation average (tfgalflow.symmetry.SphericalAverage, M rotations), at a
subset of the positions. With ``--member-groups 1,2,4,8`` the potential is also fitted to
ensembles of K of the members and rms(K)^2 = A^2 + B^2/K fitted (members_<mock>.png): A is the
error all members share, which no ensemble size removes. Every stage's result is stored
(results/<mock>_<stage>.json) and skipped when present: re-running continues. Writes report.json
and figures (errors_<mock>.png).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from tfgalflow.atomic import write_json
from tfgalflow.cbe import accelerations, radial_component
from tfgalflow.hernquist import Hernquist
from tfgalflow.mocks import add_noise, cut, sample_hernquist
from tfgalflow.potential import PotentialConfig, fit_potential, is_potential_dir, load_potential
from tfgalflow.symmetry import SphericalAverage
from tfgalflow.training import TrainConfig, load_run, train
from tfgalflow.validation import unit_vectors

MOCKS = {"iso": ("iso", 0.0), "aniso": ("aniso", 0.0), "iso_noise1": ("iso", 0.01),
         "iso_noise10": ("iso", 0.10)}
H = Hernquist()


def positions(n_radii: int, n_dirs: int, lo: float, hi: float, seed: int) -> np.ndarray:
    """[n_radii * n_dirs, 3]: radii log-spaced in [lo, hi], each in n_dirs random directions."""
    r = np.repeat(np.geomspace(lo, hi, n_radii), n_dirs)
    return r[:, None] * unit_vectors(r.size, np.random.default_rng(seed))


def acceleration_errors(x: np.ndarray, a: np.ndarray) -> dict:
    truth = H.acceleration(x)
    err = np.linalg.norm(a - truth, axis=1) / np.linalg.norm(truth, axis=1)
    ar, ar_true = radial_component(x, a), radial_component(x, truth)
    return {"frac": err, "bias": (ar - ar_true) / np.abs(ar_true)}


def summarise(x: np.ndarray, values: dict, ranges: dict) -> dict:
    """rms / median / max (and mean for signed values) of each error over each radial range."""
    r = np.linalg.norm(x, axis=1)
    out = {}
    for name, (lo, hi) in ranges.items():
        sel = (r >= lo) & (r <= hi)
        for key, v in values.items():
            v = v[sel & np.isfinite(v)]
            if key.endswith("bias"):
                out[f"{key}_mean_{name}"] = float(np.mean(v))
            else:
                out[f"{key}_rms_{name}"] = float(np.sqrt(np.mean(v**2)))
                out[f"{key}_median_{name}"] = float(np.median(v))
    return out


def potential_errors(pot, x: np.ndarray) -> dict:
    out = pot.evaluate(x)
    r = np.linalg.norm(x, axis=1)
    ref = np.asarray(pot.constants["reference"], np.float64)
    dphi_true = H.potential(r) - H.potential(np.linalg.norm(ref))
    diff = out["potential"] - dphi_true
    acc = acceleration_errors(x, out["acceleration"])
    return {"acc": acc["frac"], "acc_bias": acc["bias"],
            "phi_gauge": np.abs(diff) / np.abs(H.potential(r)),
            "phi": np.abs(diff - np.median(diff)) / np.abs(H.potential(r)),
            "rho": np.abs(out["density"] / H.density(r) - 1.0),
            "supported": out["supported"].astype(float)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="studies/potential")
    p.add_argument("--mocks", nargs="+", default=["iso"], choices=sorted(MOCKS))
    p.add_argument("--n", type=int, default=100_000, help="stars per mock")
    p.add_argument("--epochs", type=int, default=30, help="flow training epochs")
    p.add_argument("--members", type=int, default=1)
    p.add_argument(
        "--fit-points", type=int, default=32768, help="stars the potential is fitted at"
    )
    p.add_argument("--fit-epochs", type=int, default=100)
    p.add_argument("--fit-patience", type=int, default=30,
                   help="early-stopping patience of the potential fit (epochs)")
    p.add_argument("--activation", default="relu",
                   help="hidden activation of the flows' MADEs (TrainConfig.activation; a smooth "
                        "one, e.g. gelu, gives a smooth ∇ log f)")
    p.add_argument("--clip-norm", type=float, default=None,
                   help="gradient-norm clip of the flows' training (TrainConfig.clip_norm)")
    p.add_argument("--radii", type=int, default=30)
    p.add_argument("--directions", type=int, default=16)
    p.add_argument("--lsq-radii", type=int, default=15)
    p.add_argument("--lsq-directions", type=int, default=4)
    p.add_argument("--rotations", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--member-groups", default="",
                   help="K,K,...: also fit the potential to ensembles of K of the trained members "
                        "(members gK..gK+K-1 for the first two groups g), to see how its error "
                        "falls with the ensemble size")
    args = p.parse_args()
    out = Path(args.out)
    (out / "results").mkdir(parents=True, exist_ok=True)
    settings = vars(args)
    write_json(out / "settings.json", settings)
    ranges = {"0.2-20": (0.2, 20.0), "0.4-20": (0.4, 20.0), "0.3-5": (0.3, 5.0)}
    x_eval = positions(args.radii, args.directions, 0.2, 20.0, args.seed + 7)
    x_lsq = positions(args.lsq_radii, args.lsq_directions, 0.2, 20.0, args.seed + 8)
    report = {"settings": settings, "ranges": ranges, "mocks": {}}
    for i, name in enumerate(args.mocks):
        kind, noise = MOCKS[name]
        cat = sample_hernquist(args.n, kind=kind, seed=args.seed + 1000 * i, r_max=100.0)
        if noise > 0:
            cat = cut(add_noise(cat, noise, seed=args.seed + 1000 * i + 1), r_max=100.0)
        run_dir = out / "runs" / name
        t0 = time.perf_counter()
        if (run_dir / "config.json").exists():
            try:
                flow = load_run(run_dir)
            except Exception:   # noqa: BLE001 - unfinished run: continue it
                from tfgalflow.training import resume
                flow = resume(run_dir, data=cat, verbose=2)
        else:
            tc = TrainConfig.from_dict({"layers": 6, "hidden": [64, 64], "epochs": args.epochs,
                                        "batch_size": 1024, "lr": 2e-3, "lr_schedule": "cosine",
                                        "patience": 8, "members": args.members,
                                        "validation_split": 0.1, "seed": args.seed,
                                        "clip_norm": args.clip_norm,
                                        "activation": args.activation})
            flow = train(cat, tc, run_dir, verbose=2)
        print(f"[{name}] flow ready ({time.perf_counter() - t0:.0f} s)", flush=True)
        fit_idx = np.random.default_rng(args.seed).permutation(len(cat))[:args.fit_points]
        data = np.concatenate([cat.pos[fit_idx], cat.vel[fit_idx]], axis=1)
        cfg = PotentialConfig(epochs=args.fit_epochs, patience=args.fit_patience, seed=args.seed,
                              hidden=(64, 64, 64))
        m = report["mocks"][name] = {"kind": kind, "noise": noise, "n_stars": len(cat)}
        for which, df in (("exact", H.exact_density(kind)), ("learned", flow)):
            pdir = out / "potentials" / f"{name}_{which}"
            t0 = time.perf_counter()
            if is_potential_dir(pdir):
                pot = load_potential(pdir)
            else:
                pot = fit_potential(df, cfg, data=data, verbose=2)
                pot.save(pdir, export=False)
            err = potential_errors(pot, x_eval)
            m[f"potential_{which}"] = {**summarise(x_eval, err, ranges),
                                       "epochs_run": len(pot.history.get("loss", [])),
                                       "fit_seconds": round(time.perf_counter() - t0)}
            np.savez(out / "results" / f"{name}_{which}.npz", x=x_eval, **err)
            print(f"[{name}] potential fitted to the {which} DF: "
                  f"acc rms(0.4-20) {m[f'potential_{which}']['acc_rms_0.4-20']:.3%}", flush=True)
        if args.member_groups:
            m["member_groups"] = member_groups(flow, args, cfg, data, x_eval, ranges,
                                               out, name)
        for which, df in (("lsq", flow), ("lsq_rotavg", SphericalAverage(flow, args.rotations,
                                                                         seed=args.seed))):
            path = out / "results" / f"{name}_{which}.json"
            if path.exists():
                m[which] = json.loads(path.read_text())
                continue
            t0 = time.perf_counter()
            res = accelerations(df, x_lsq, n_velocities=256, seed=args.seed)
            err = acceleration_errors(x_lsq, res.acceleration)
            m[which] = {
                **summarise(x_lsq, {"acc": err["frac"], "acc_bias": err["bias"]}, ranges),
                "flagged": int(res.flagged.sum()),
                "seconds": round(time.perf_counter() - t0),
            }
            np.savez(out / "results" / f"{name}_{which}.npz", x=x_lsq, acc=err["frac"])
            write_json(path, m[which])
            print(
                f"[{name}] {which}: acc rms(0.4-20) {m[which]['acc_rms_0.4-20']:.3%}", flush=True
            )
        write_json(out / "report.json", report)
        figure(out, name)
    write_json(out / "report.json", report)


def member_groups(flow, args: argparse.Namespace, cfg: PotentialConfig, data: np.ndarray,
                  x_eval: np.ndarray, ranges: dict, out: Path, name: str) -> dict:
    """The potential fitted to ensembles of K of the members (``--member-groups``), up to two
    disjoint groups per K, each saved in potentials/<mock>_learned_k<K>_g<g> and resumed, and the
    fit of the acceleration rms over 0.4a-20a to rms(K)^2 = A^2 + B^2 / K (errors shared by all
    members, A, and independent ones, B/sqrt(K); least squares in rms^2 over every group).

    Returns {"groups": {"<K>_<g>": summary}, "shared_A": A, "independent_B": B,
    "power_law_alpha": alpha, "power_law_members_for_1pct": K at which c K^-alpha = 1 %}.
    """
    from tfgalflow.model import Ensemble
    members = list(getattr(flow, "members", None) or [flow])
    groups, ks, rms2 = {}, [], []
    for k in sorted({int(v) for v in args.member_groups.split(",")}):
        for g in range(min(2, len(members) // k)):
            pdir = out / "potentials" / (f"{name}_learned" if k == len(members)   # the main fit
                                         else f"{name}_learned_k{k}_g{g}")
            chosen = members[g * k:(g + 1) * k]
            t0 = time.perf_counter()
            if is_potential_dir(pdir):
                pot = load_potential(pdir)
            else:
                df = chosen[0] if k == 1 else Ensemble(chosen)
                pot = fit_potential(df, cfg, data=data, verbose=0)
                pot.save(pdir, export=False)
            groups[f"{k}_{g}"] = {**summarise(x_eval, potential_errors(pot, x_eval), ranges),
                                  "members": list(range(g * k, (g + 1) * k)),
                                  "seconds": round(time.perf_counter() - t0)}
            ks.append(k)
            rms2.append(groups[f"{k}_{g}"]["acc_rms_0.4-20"] ** 2)
            print(f"[{name}] potential of members {g * k}..{(g + 1) * k - 1}: acc rms(0.4-20) "
                  f"{np.sqrt(rms2[-1]):.3%}", flush=True)
    design = np.stack([np.ones(len(ks)), 1.0 / np.asarray(ks, float)], axis=1)
    (a2, b2), *_ = np.linalg.lstsq(design, np.asarray(rms2), rcond=None)
    shared, independent = float(np.sqrt(max(a2, 0.0))), float(np.sqrt(max(b2, 0.0)))
    # the optimistic reading: a power law rms = c K^-alpha, which never levels off
    slope, log_c = np.polyfit(np.log(ks), 0.5 * np.log(rms2), 1)
    power = (float(-slope), float(np.exp(log_c)))
    members_figure(out / f"members_{name}.png", ks, np.sqrt(rms2), shared, independent, power)
    return {"groups": groups, "shared_A": shared, "independent_B": independent,
            "power_law_alpha": power[0],
            "power_law_members_for_1pct": float((power[1] / 0.01) ** (1.0 / power[0]))
            if power[0] > 0 else None}


def members_figure(path: Path, ks: list, rms: np.ndarray, shared: float, independent: float,
                   power: tuple[float, float]) -> None:
    """Acceleration rms over 0.4a-20a against the ensemble size K, the fits sqrt(A^2 + B^2/K)
    and c K^-alpha (``power`` = (alpha, c)), and the issue's 1 % target."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot(ks, 100 * rms, "o", label="potential network, K members")
    k = np.geomspace(1, 64, 100)
    ax.plot(k, 100 * np.sqrt(shared**2 + independent**2 / k), "-",
            label=f"fit: A = {100 * shared:.2f} %, B = {100 * independent:.2f} %")
    ax.axhline(100 * shared, ls=":", color="C1")
    ax.plot(k, 100 * power[1] * k ** -power[0], "-", color="C2",
            label=f"power law: alpha = {power[0]:.2f}")
    ax.axhline(1.0, ls="--", color="k", label="target (1 %)")
    ax.set(xscale="log", xlabel="members K", ylabel="acceleration rms, 0.4a-20a (%)",
           ylim=(0, None))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure(out: Path, name: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), sharex=True)
    for which, style in (("exact", "C0"), ("learned", "C1")):
        z = np.load(out / "results" / f"{name}_{which}.npz")
        r = np.linalg.norm(z["x"], axis=1)
        for ax, key in zip(axes, ("acc", "phi", "rho")):
            ax.plot(r, z[key], ".", ms=2, color=style, alpha=0.4,
                    label=f"potential network, {which} DF")
    for which, style in (("lsq", "C2"), ("lsq_rotavg", "C3")):
        f = out / "results" / f"{name}_{which}.npz"
        if f.exists():
            z = np.load(f)
            axes[0].plot(
                np.linalg.norm(z["x"], axis=1),
                z["acc"],
                "x",
                ms=4,
                color=style,
                label={"lsq": "per-position LSQ", "lsq_rotavg": "LSQ + rotation avg"}[which],
            )
    for ax, title in zip(
        axes,
        ("|a - a_true| / |a_true|", "|ΔΦ - ΔΦ_true| / |Φ_true| (best offset)", "|ρ / ρ_true - 1|"),
    ):
        ax.set(xscale="log", yscale="log", xlabel="r / a", title=title)
        ax.axvspan(0.2, 20, color="0.95", zorder=-1)
    axes[0].legend(fontsize=7, markerscale=3)
    fig.suptitle(f"Hernquist {name}: potential network vs exact (many random directions)")
    fig.tight_layout()
    fig.savefig(out / f"errors_{name}.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
