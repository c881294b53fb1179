"""Time to accuracy: wall clock from a 10^6-star isotropic Hernquist mock to CBE accelerations at
40 radii 0.2a-5a with a median error of at most 1 % (issue #20).

One run, two methods, the same mock, positions and training budget (members x epochs):

    spherical   the package's best method for a spherical system: ``TrainConfig(coordinates=
                "spherical")`` -- K flows of the stars' (r, v_r, v_t), an ensemble, rebuilt in 6-D
                as an exactly symmetric, v_r-even :class:`tfgalflow.spherical_df.SphericalDF`;
    cartesian   the baseline (the previous best): K 6-D flows of (x, v), an ensemble averaged
                over M joint rotations (:class:`tfgalflow.symmetry.SphericalAverage`).

Stages timed separately (wall clock, ``time.perf_counter``; imports and TensorFlow start-up not
counted): the mock (exact sampler, ``mocks.sample_hernquist``), training (``training.train``: XLA
steps, ``steps_per_call``, cosine schedule, no early stopping), and the CBE
(``cbe.accelerations``; 16384 velocities per position for the spherical method -- the least-squares
fit of a learned DF averages its errors over the velocity draw, so more draws cut the acceleration
error at a cost linear in the draws -- and the Hernquist study's 1024 x 64 rotations for the
baseline). Error: |a - a_true| / |a_true| at 40 log-spaced radii in random directions, median and
90th percentile, beside the exact-DF control (the same CBE on the closed-form DF). The verdict
compares the spherical row with the issue's target (median <= 1 % within 15 min).
``--no-baseline`` skips the cartesian row (most of the time).

    .venv/bin/python benchmarks/bench_time_to_accuracy.py                    # ~25 min, 2 cores
    .venv/bin/python benchmarks/bench_time_to_accuracy.py --no-baseline      # the target alone
    .venv/bin/python benchmarks/bench_time_to_accuracy.py --stars 100000 --epochs 5 --members 2 \
        --no-baseline                                                        # ~2 min smoke run

Each training writes its run directory under ``--work`` (deleted first: every run starts cold).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from tfgalflow.cbe import accelerations  # noqa: E402
from tfgalflow.hernquist import Hernquist  # noqa: E402
from tfgalflow.mocks import sample_hernquist  # noqa: E402
from tfgalflow.study import fractional_error  # noqa: E402
from tfgalflow.symmetry import SphericalAverage  # noqa: E402
from tfgalflow.training import TrainConfig, train  # noqa: E402

TARGET_MEDIAN = 0.01
TARGET_SECONDS = 15 * 60


def positions(n: int, r_min: float, r_max: float, seed: int) -> np.ndarray:
    """[n, 3]: log-spaced radii r_min..r_max, each in a uniformly random direction."""
    d = np.random.default_rng(seed).normal(size=(n, 3))
    return np.geomspace(r_min, r_max, n)[:, None] * d / np.linalg.norm(d, axis=1, keepdims=True)


def run_method(name: str, cat, config: TrainConfig, where: Path, x: np.ndarray,
               args: argparse.Namespace) -> dict:
    """Train ``config`` on ``cat``, solve the CBE at ``x``; seconds per stage and the errors."""
    shutil.rmtree(where, ignore_errors=True)
    t0 = time.perf_counter()
    model = train(cat, config, where, verbose=0)
    t_train = time.perf_counter() - t0
    if name == "cartesian" and args.rotations:
        model = SphericalAverage(model, args.rotations, seed=args.seed)
    t0 = time.perf_counter()
    velocities = args.velocities if name == "spherical" else args.baseline_velocities
    result = accelerations(model, x, n_velocities=velocities, seed=args.seed)
    t_cbe = time.perf_counter() - t0
    e = fractional_error(result.acceleration, Hernquist().acceleration(x))
    return {"method": name, "train_s": t_train, "cbe_s": t_cbe, "median": float(np.median(e)),
            "p90": float(np.percentile(e, 90)), "max": float(e.max()),
            "flagged": int(np.sum(result.flagged))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stars", type=int, default=1_000_000)
    p.add_argument("--members", type=int, default=4, help="ensemble size K (both methods)")
    p.add_argument("--epochs", type=int, default=20, help="epochs per member (both methods)")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", default="64,64")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--parallel", action="store_true",
                   help="train the members in parallel processes (TrainConfig.parallel)")
    p.add_argument("--rotations", type=int, default=64,
                   help="rotations M of the cartesian baseline's spherical average")
    p.add_argument("--velocities", type=int, default=16384,
                   help="velocities per position of the spherical method's CBE")
    p.add_argument("--baseline-velocities", type=int, default=1024,
                   help="velocities per position of the cartesian baseline (x its rotations)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-baseline", action="store_true", help="skip the cartesian method")
    p.add_argument("--work", default="/tmp/tfgalflow_time_to_accuracy")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()

    t_start = time.perf_counter()
    cat = sample_hernquist(args.stars, kind="iso", seed=args.seed, r_max=100.0)
    t_mock = time.perf_counter() - t_start
    x = positions(40, 0.2, 5.0, seed=args.seed + 1)
    model = Hernquist()
    exact = accelerations(model.exact_density("iso"), x, n_velocities=1024, seed=args.seed)
    control = float(np.median(fractional_error(exact.acceleration, model.acceleration(x))))
    base = dict(layers=args.layers, hidden=tuple(int(h) for h in args.hidden.split(",")),
                epochs=args.epochs, batch_size=args.batch_size, lr=1e-3, lr_schedule="cosine",
                patience=0, validation_split=0.1, members=args.members, seed=args.seed,
                parallel=args.parallel)
    methods = [("spherical", TrainConfig(coordinates="spherical", **base))]
    if not args.no_baseline:
        methods.append(("cartesian", TrainConfig(**base)))
    print(f"time to accuracy: {args.stars} stars (mock {t_mock:.1f} s), K = {args.members} x "
          f"{args.epochs} epochs, {args.layers} layers x {args.hidden}, batch {args.batch_size}"
          f"{', parallel members' if args.parallel else ''}; 40 radii 0.2a-5a, "
          f"exact-DF control median {control:.1e}", flush=True)
    rows = []
    for name, config in methods:
        row = run_method(name, cat, config, Path(args.work) / name, x, args)
        row["total_s"] = t_mock + row["train_s"] + row["cbe_s"]
        rows.append(row)
        print(f"  {name:<10} train {row['train_s']:7.1f} s  CBE {row['cbe_s']:6.1f} s  "
              f"total {row['total_s']:7.1f} s ({row['total_s'] / 60:4.1f} min)  median "
              f"{row['median']:.2%}  p90 {row['p90']:.2%}  max {row['max']:.2%}  flagged "
              f"{row['flagged']}"
              + (f"  ({args.baseline_velocities} velocities x {args.rotations} rotations)"
                 if name == "cartesian" else f"  ({args.velocities} velocities)"), flush=True)
    best = rows[0]
    met = best["median"] <= TARGET_MEDIAN and best["total_s"] <= TARGET_SECONDS
    print(f"target: median <= {TARGET_MEDIAN:.0%} within {TARGET_SECONDS / 60:.0f} min -> "
          f"{best['median']:.2%} in {best['total_s'] / 60:.1f} min: "
          f"{'met' if met else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "mock_s": t_mock,
                                               "exact_control": control, "rows": rows,
                                               "met": met}, indent=1))


if __name__ == "__main__":
    main()
