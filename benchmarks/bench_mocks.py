"""Time the exact Hernquist sampler against emcee (the reference study's sampler) at equal n, same
run.

The reference mocks (An, Naik, Evans & Burrage 2021; HernquistFlows ``data/sample_hq_iso.py``) were
drawn with emcee: 100 walkers, 1000 burn-in steps, thinning by 100, truncated at r = 200 a. Here
emcee runs the same target (``Hernquist.log_df``, vectorised over walkers, r < r_max) with
``--emcee-thin`` (default 10, ten times fewer steps than the reference, i.e. favourable to emcee)
and the exact sampler draws the same number of stars. Printed: wall time, stars per second, emcee's
acceptance fraction and integrated autocorrelation time tau, and emcee's effective number of
independent stars ~ n * thin / tau.

    .venv/bin/python benchmarks/bench_mocks.py                       # n = 10^6 (emcee ~1 min)
    .venv/bin/python benchmarks/bench_mocks.py --n 100000 --emcee-thin 100
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from tfgalflow.hernquist import Hernquist  # noqa: E402
from tfgalflow.mocks import sample_emcee, sample_hernquist  # noqa: E402


def timed(fn, repeats: int = 1):
    """(best wall time over ``repeats`` calls, last result)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--n", type=int, default=1_000_000, help="stars per sampler (default: 10^6)"
    )
    parser.add_argument("--r-max", type=float, default=200.0,
                        help="truncation radius in units of a (default: 200, as the reference)")
    parser.add_argument(
        "--emcee-walkers",
        type=int,
        default=100,
        help="emcee walkers (default: 100, as the reference)",
    )
    parser.add_argument(
        "--emcee-burn", type=int, default=1000, help="emcee burn-in steps (default: 1000)"
    )
    parser.add_argument("--emcee-thin", type=int, default=10,
                        help="emcee thinning (default: 10; the reference used 100)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="repeats of the exact sampler, best kept (default: 3)",
    )
    args = parser.parse_args()
    model = Hernquist()

    print(
        f"n = {args.n} stars, r < {args.r_max} a, model units (G = M = a = 1); {os.cpu_count()} "
        "CPU(s)"
    )
    rows = []
    for kind in ("iso", "aniso"):
        t, cat = timed(
            lambda: sample_hernquist(args.n, kind=kind, seed=1, r_max=args.r_max), args.repeats
        )
        rows.append((f"exact {kind}", t, len(cat), ""))

    t, mc = timed(
        lambda: sample_emcee(
            lambda x, v: model.log_df(x, v, "iso"),
            args.n,
            nwalkers=args.emcee_walkers,
            burn=args.emcee_burn,
            thin=args.emcee_thin,
            seed=1,
            r_max=args.r_max,
        )
    )
    tau = mc.meta["autocorr_steps"]
    effective = args.n * min(1.0, args.emcee_thin / tau) if tau else float("nan")
    rows.append(
        (
            "emcee iso (baseline)",
            t,
            len(mc),
            f"{mc.meta['steps']} steps x {args.emcee_walkers} walkers, acceptance "
            f"{mc.meta['acceptance_fraction']:.3f}, tau {tau:.0f} steps -> ~{effective:.3g} "
            "independent stars",
        )
    )

    print(f"{'sampler':<22} {'time [s]':>9} {'stars/s':>10}  notes")
    for name, t, n, note in rows:
        print(f"{name:<22} {t:9.2f} {n / t:10.3g}  {note}")
    baseline = rows[-1][1]
    for name, t, _, _ in rows[:-1]:
        per_independent = (
            baseline / t * args.n / effective if np.isfinite(effective) else float("nan")
        )
        print(
            f"{name}: {baseline / t:.0f}x faster than emcee at equal n, {per_independent:.0f}x "
            "per independent star"
        )


if __name__ == "__main__":
    main()
