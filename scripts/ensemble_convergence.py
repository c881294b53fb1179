r"""How the CBE acceleration error of a learned Hernquist DF falls with the ensemble size.

For a finished study (``scripts/hernquist_study.py``) or any run directory trained on a Hernquist
mock, this evaluates the ensembles made of the first K members (K = 1, 2, 4, ... up to the run's
size) with the same positions, velocities seed and CBE settings as the study, and prints per K:

* the median and 90th-percentile fractional error |a - a_true| / |a_true| over 0.2a <= r <= 5a;
* the held-out density error of the learned DF, Δ = log f_exact - log f_learned on fresh exact
  draws: KL(exact || learned) = <Δ> (up to the constant log M(<r_max) of the truncated mock) and
  its spread std(Δ), which sets the scale of the gradient errors that limit the CBE fit.

An ensemble averages densities (mean of p, ``tfgalflow.model.Ensemble``), so member-to-member
fluctuations of ∇ log f shrink roughly as 1/sqrt(K) while errors shared by all members
(architecture, data) do not. A run trained in spherical coordinates
(``TrainConfig(coordinates="spherical")``) is evaluated as the
:class:`~tfgalflow.spherical_df.SphericalDF` of each ensemble (exactly symmetric: rotations change
nothing). With ``--rotations M`` each ensemble is also averaged over M joint
rotations of (x, v) (``tfgalflow.symmetry.SphericalAverage``; the mock is spherical) and its CBE
error printed beside.

    python scripts/ensemble_convergence.py studies/hernquist/runs/iso --kind iso
    python scripts/ensemble_convergence.py RUN --kind aniso --n-radii 40 --n-velocities 1024 \
        --out conv.json
    python scripts/ensemble_convergence.py RUN --kind iso --rotations 64
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from tfgalflow.atomic import write_json
from tfgalflow.cbe import accelerations
from tfgalflow.hernquist import Hernquist
from tfgalflow.mocks import sample_hernquist
from tfgalflow.model import Ensemble
from tfgalflow.spherical_df import SphericalDF
from tfgalflow.study import StudyConfig, evaluation_positions, fractional_error
from tfgalflow.symmetry import SphericalAverage
from tfgalflow.training import load_member, member_finished, read_run_config


def member_counts(n: int) -> list[int]:
    """1, 2, 4, ... < n, then n."""
    counts = [1]
    while counts[-1] * 2 < n:
        counts.append(counts[-1] * 2)
    return counts + ([n] if counts[-1] != n else [])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="run directory (e.g. STUDY/runs/iso)")
    p.add_argument(
        "--kind",
        choices=["iso", "aniso"],
        default="iso",
        help="the exact DF the mock was drawn from",
    )
    p.add_argument("--n-radii", type=int, default=40)
    p.add_argument("--n-velocities", type=int, default=1024)
    p.add_argument(
        "--n-check", type=int, default=50_000, help="fresh exact draws for the density error"
    )
    p.add_argument(
        "--r-max", type=float, default=100.0, help="radial cut of the training mock (a)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--rotations",
        type=int,
        default=0,
        help="also evaluate each ensemble averaged over this many rotations (default: 0, off)",
    )
    p.add_argument("--out", help="write the table as JSON here")
    args = p.parse_args()

    run = read_run_config(args.run)
    # members whose training finished (a study still training its ensemble can be evaluated
    # as it grows)
    members = [load_member(Path(args.run), run, k) for k in range(len(run["members"]))
               if member_finished(Path(args.run), run, k)]
    if not members:
        raise SystemExit(f"{args.run}: no member has finished training yet")
    hernquist = Hernquist()
    config = StudyConfig(
        mocks=("iso",), n_radii=args.n_radii, n_velocities=args.n_velocities, seed=args.seed
    )
    positions = evaluation_positions(config)
    radii = np.linalg.norm(positions, axis=1)
    in_range = (radii >= config.summary_range[0]) & (radii <= config.summary_range[1])
    a_true = hernquist.acceleration(positions)
    check = sample_hernquist(
        args.n_check, kind=args.kind, seed=args.seed + 777, r_max=args.r_max
    ).phase_space
    log_f_exact = hernquist.log_df(check[:, :3], check[:, 3:], args.kind)

    rows = []
    print(
        f"{args.run}: {len(members)} of {len(run['members'])} member(s) finished; "
        f"{in_range.sum()} positions in {config.summary_range} a, "
        f"{args.n_velocities} velocities each; density error on {args.n_check} fresh exact draws"
    )
    sym = f" {'M = ' + str(args.rotations) + ' median':>16} {'90%':>8}" if args.rotations else ""
    print(
        f"{'K':>3} {'median |Δa|/|a|':>16} {'90%':>8} {'<Δ log f>':>10} {'std Δ log f':>12}{sym}"
    )
    error = lambda df: fractional_error(
        accelerations(df, positions, n_velocities=args.n_velocities, seed=args.seed).acceleration,
        a_true,
    )[in_range]
    # a run in spherical coordinates: its members are flows of (r, v_r, v_t), the DF their
    # SphericalDF (load_run's model)
    spherical = run.get("train", {}).get("coordinates") == "spherical"
    for k in member_counts(len(members)):
        df = members[0] if k == 1 else Ensemble(members[:k])
        df = SphericalDF(df) if spherical else df
        err = error(df)
        delta = log_f_exact - np.asarray(df.log_prob(check.astype(np.float32)), np.float64)
        rows.append(
            {
                "members": k,
                "median_fractional_error": float(np.median(err)),
                "p90_fractional_error": float(np.quantile(err, 0.9)),
                "mean_delta_log_f": float(delta.mean()),
                "std_delta_log_f": float(delta.std()),
            }
        )
        r = rows[-1]
        line = (f"{k:>3} {r['median_fractional_error']:>16.2%} {r['p90_fractional_error']:>8.2%} "
                f"{r['mean_delta_log_f']:>10.4f} {r['std_delta_log_f']:>12.3f}")
        if args.rotations:
            err = error(SphericalAverage(df, args.rotations, seed=args.seed))
            r.update(
                {
                    "rotations": args.rotations,
                    "median_fractional_error_symmetrised": float(np.median(err)),
                    "p90_fractional_error_symmetrised": float(np.quantile(err, 0.9)),
                }
            )
            line += (
                f" {r['median_fractional_error_symmetrised']:>16.2%}"
                f" {r['p90_fractional_error_symmetrised']:>8.2%}"
            )
        print(line, flush=True)
    if args.out:
        write_json(args.out, {"run": str(args.run), "kind": args.kind, "rows": rows})


if __name__ == "__main__":
    main()
