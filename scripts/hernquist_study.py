"""The Hernquist acceleration study (An, Naik, Evans & Burrage 2021, Sec. 5) at full size.

    python scripts/hernquist_study.py --out studies/hernquist   # 4 mocks x 10^6 stars, 4 members
    python scripts/hernquist_study.py --out studies/quick --n 100000 --members 1 --epochs 60 \\
        --mocks iso aniso
    python -c "from tfgalflow.plots import render; render('studies/quick/accelerations.npz')"

Writes per mock a run directory (runs/<mock>/), figure data (*.npz) and figures (*.png), and
summary.json with the median vector fractional error |a - a_true| / |a_true| over 0.2a <= r <= 5a
for the learned DF, for the learned DF averaged over rotations (--rotations, tfgalflow.symmetry)
and for the exact DF. An --out that already holds runs/ continues them (finished members are
loaded, so re-running only re-evaluates). The options override the config through
StudyConfig.with_overrides, as ``tfgalflow demo`` does.
"""
import argparse
import json

from tfgalflow.study import MOCKS, StudyConfig, format_table, run_study


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--config", help="a StudyConfig JSON (e.g. a previous run's study_config.json)")
    p.add_argument("--mocks", nargs="+", choices=sorted(MOCKS))
    p.add_argument("--n", type=int, help="stars per mock")
    p.add_argument("--members", type=int, help="ensemble members per mock")
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--rotations", type=int,
                   help="also solve with the learned DF averaged over this many rotations "
                        "(0: off; default 64)")
    args = p.parse_args()
    base = StudyConfig()
    if args.config:
        with open(args.config) as fh:
            base = StudyConfig.from_dict(json.load(fh))
    config = base.with_overrides(mocks=args.mocks, n_stars=args.n, members=args.members,
                                 epochs=args.epochs, seed=args.seed, rotations=args.rotations)
    print(format_table(run_study(config, args.out)))


if __name__ == "__main__":
    main()
