"""FEDHEX study (issue #13): interpolate a 10 x 10 grid of 2-D event distributions, measure at
held-out labels.

Runs the ``gaussian_field`` task (:mod:`tfgalflow.tasks.gaussian_field`) with its default settings:
1000 events at each of the 92 training nodes (8 interior nodes held out, plus 24 random off-grid
labels), an affine MAF (6 layers of 2 x 128 ReLU, Adam 1e-3 cosine, batch 1024, 100 epochs), then
writes studies/gaussian_field/report.json and figures and prints the targets. Rerunning resumes an
interrupted training run or reuses the finished one. The same as

    tfgalflow task run gaussian_field --out studies/gaussian_field

Usage: python scripts/fedhex_study.py [--out DIR] [--epochs E] [--seed S]
"""

from __future__ import annotations

import argparse
import time

from tfgalflow.tasks import run_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="studies/gaussian_field")
    parser.add_argument("--epochs", type=int, default=None, help="override the task's epochs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train = {} if args.epochs is None else {"epochs": args.epochs}
    start = time.perf_counter()
    report = run_task(
        "gaussian_field", args.out, overrides={"seed": args.seed}, train_overrides=train, verbose=2
    )
    print(f"task run took {time.perf_counter() - start:.0f} s")
    for name, t in report["targets"].items():
        print(
            f"{name:12s} measured {t['measured']:.4g} {t['relation']} {t['threshold']:g}: "
            f"{'met' if t['met'] else 'NOT met'}  ({t['description']})"
        )
    for group, s in report["metrics"]["summary"].items():
        print(group, {k: v for k, v in s.items() if not isinstance(v, (dict, list))})


if __name__ == "__main__":
    main()
