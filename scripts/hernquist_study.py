"""The Hernquist acceleration study (An, Naik, Evans & Burrage 2021, Sec. 5) at full size.

    python scripts/hernquist_study.py --out studies/hernquist            # 4 mocks x 10^6 stars, ensembles of 4
    python scripts/hernquist_study.py --out studies/quick --n 100000 --members 1 --epochs 60 --mocks iso aniso
    python -c "from tfgalflow.plots import render; render('studies/quick/accelerations.npz')"   # re-render

Writes per mock a run directory (runs/<mock>/), figure data (*.npz) and figures (*.png), and summary.json
with the median fractional acceleration error over 0.2a <= r <= 5a for the learned DF, for the learned DF
averaged over rotations (--rotations, tfgalflow.symmetry) and for the exact DF. An --out that already holds
runs/ continues them (finished members are loaded, so re-running only re-evaluates).
"""
import argparse
import dataclasses
import json

from tfgalflow.study import MOCKS, StudyConfig, format_table, run_study


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--config", help="a StudyConfig JSON (e.g. a previous run's study_config.json)")
    p.add_argument("--mocks", nargs="+", choices=sorted(MOCKS))
    p.add_argument("--n", type=int, help="stars per mock")
    p.add_argument("--members", type=int, help="ensemble members per mock")
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--rotations", type=int,
                   help="also solve with the learned DF averaged over this many rotations (0: off; default 64)")
    args = p.parse_args()
    config = StudyConfig.from_dict(json.load(open(args.config))) if args.config else StudyConfig()
    train = dict(config.train)
    if args.members is not None:
        train["members"] = args.members
    if args.epochs is not None:
        train["epochs"] = args.epochs
    changes = {"train": train}
    if args.mocks:
        changes["mocks"] = tuple(args.mocks)
    if args.n is not None:
        changes["n_stars"] = args.n
    if args.seed is not None:
        changes["seed"] = args.seed
    if args.rotations is not None:
        changes["rotations"] = args.rotations
    summary = run_study(dataclasses.replace(config, **changes), args.out)
    print(format_table(summary))


if __name__ == "__main__":
    main()
