"""The Dehnen interpolation study (issue #12, item 4): one conditional flow f(x, v | γ, a/r_a)
trained on a sparse label grid, measured at the nodes and at held-out labels it never saw.

    python scripts/dehnen_interpolation_study.py --out studies/dehnen_interpolation
    python scripts/dehnen_interpolation_study.py --out /tmp/quick --n-per-node 5000 --epochs 5 \\
        --gammas 0.5,1.5 --ra-inverses 0,1 --held-out 1:0.5

Every field of tfgalflow.interpolation_study.InterpolationConfig is a flag (lists as 0.5,1,1.5;
label pairs γ:a/r_a as 0.75:0.25,1.25:0.75); --config reads a previous study_config.json.
Writes report.json (targets and measured numbers side by side), interpolation.npz (figure data)
and accelerations.png, beta.png, labels.png into --out; runs/ (the trained flow) and cache/
(per-label evaluations) are git-ignored. An --out that already holds the same study continues it
(finished training and evaluations are reused); another config there is refused.
"""
import argparse
import json
import sys

from tfgalflow.errors import TfgalflowError
from tfgalflow.interpolation_study import InterpolationConfig, run_interpolation_study


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--config", help="an InterpolationConfig JSON (e.g. study_config.json)")
    p.add_argument("--verbose", type=int, default=2, help="Keras verbosity of training")
    for name, (kind, text) in InterpolationConfig.field_help().items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, help=f"{text} ({kind})")
    args = p.parse_args()
    base = InterpolationConfig()
    try:
        if args.config:
            with open(args.config) as fh:
                base = InterpolationConfig.from_dict(json.load(fh))
        overrides = {name: getattr(args, name) for name in InterpolationConfig.field_help()
                     if getattr(args, name) is not None}
        report = run_interpolation_study(base.with_overrides(**overrides), args.out,
                                         verbose=args.verbose)
    except (TfgalflowError, OSError, json.JSONDecodeError) as exc:
        print(f"dehnen_interpolation_study.py: {exc}", file=sys.stderr)   # one line, no traceback
        sys.exit(2)
    print(json.dumps({k: report[k] for k in ("targets", "measured", "verdict")}, indent=1))


if __name__ == "__main__":
    main()
