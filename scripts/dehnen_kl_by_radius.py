"""Where a Dehnen interpolation study's KL comes from: its KL estimate at every node and held-out
label split over radial shells (chain rule: shell masses + KL within each shell), with β per shell.

    python scripts/dehnen_kl_by_radius.py --study studies/dehnen_interpolation_4x4 \
        --labels 0.66667:0.5,0.66667:0.83333,1:0.16667,1:0.5,1:0.83333,1.33333:0.16667,1.33333:0.5

Needs the study's trained flow (runs/flow; scripts/dehnen_interpolation_study.py with the same
--out retrains it if it is gone). Writes kl_by_radius.json and kl_by_radius.png into the study.
"""
import argparse
import sys

from tfgalflow.config_fields import coerce
from tfgalflow.errors import InputError
from tfgalflow.interpolation_study import KL_SHELL_EDGES, radial_kl_report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", required=True, help="a study directory with runs/flow")
    p.add_argument("--edges", default=",".join(f"{e:g}" for e in KL_SHELL_EDGES),
                   help="inner shell edges in units of a (the study's star_r_max closes the last)")
    p.add_argument("--n-flow", type=int, default=40_000, help="flow samples per label")
    p.add_argument("--labels", default="",
                   help="more labels never trained on, γ:a/r_a pairs, e.g. 0.66667:0.5,1:0.5")
    args = p.parse_args()
    try:        # the config fields' parsers: the same text as the study's own flags
        edges = coerce("radial_kl_report", "edges", "floats", args.edges)
        extra = coerce("radial_kl_report", "extra_labels", "pairs", args.labels) if args.labels \
            else ()
        radial_kl_report(args.study, edges=edges, n_flow=args.n_flow, extra_labels=extra)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
