"""Training time per epoch and peak memory of the deconvolved fit vs K (noise draws per star),
beside the plain fit, with the gradient over all K draws at once and in passes of a few draws.

    python benchmarks/bench_deconvolution.py [--n 20000] [--ks 1,2,4,8,16] [--per-pass 2[,4...]]
                                             [--epochs 3] [--batch-size 1024]
                                             [--coordinates cartesian|spherical]
                                             [--proposals kernel[,tilted]]
                                             [--selection-r-max R]

Same data (the 10 %-noise Hernquist mock, fractional errors), architecture (6 layers, 2x64), batch,
XLA and steps per call for every row; each row trains in a fresh process, whose epoch times (the
first, with XLA compilation, dropped; median of the others) and peak resident set (VmHWM, which
includes the ~1 GB of TensorFlow and the data) are reported: the peak of the later epochs (VmHWM
reset after the first: the memory of the training steps) and that of the first (with XLA's one-off
compilation). Each step evaluates the flow on K·B
rows, so the expected cost is ~K times the plain fit's at large K (less at small K, where per-call
overhead dominates):

    one pass     ``TrainConfig(noise_per_pass=0)``: all K·B candidates differentiated at once,
                 their activations kept for the gradient: memory grows ~K
    k per pass   ``TrainConfig(noise_per_pass=k)``: pass 1 evaluates the terms with no tape (8k
                 draws at a time), pass 2 re-evaluates them k at a time under a tape and
                 accumulates Σ c ∇a: memory ~k·B rows, flat in K, for one extra forward pass

With ``--proposals kernel,tilted`` each K also has rows with ``TrainConfig(noise_proposal=
"tilted")``: one extra gradient of the flow at each observed star per step (the shift of the
proposal), so ~1 more differentiated draw per star on top of the K.

With ``--selection-r-max R`` the catalogue is cut at observed radius R after the noise and every
deconvolved row fits with ``TrainConfig(selection_r_max=R)`` (one flow draw and its log f per star
and step for the selection's normaliser), as the 10^6-star study's ``deconvolved_selected`` fit;
with spherical coordinates every row, the plain fit too, also learns the bounded radius
(``support_r_max=R``, the study's ``--support``).

CPU seconds used by other processes during the run are printed (on a shared machine they inflate
the times).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from _timing import others_cpu_seconds

from tfgalflow.catalogue.core import NOISE_PROPOSALS

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import json, sys, tempfile, time
    import numpy as np
    import tfgalflow
    import tf_keras as keras
    from _timing import peak_rss_mib, reset_peak_rss
    from tfgalflow.mocks import add_noise, cut, sample_hernquist
    from tfgalflow.training import TrainConfig, train

    class EpochTimer(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.times = []

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter() - self.t0)
            if epoch == 0:                     # XLA has compiled: from here the steps' peak
                self.compile_peak = peak_rss_mib()
                reset_peak_rss()

    args = json.loads(sys.argv[1])
    cat = add_noise(sample_hernquist(args["n"], seed=0, r_max=100.0), 0.1, seed=1)
    if args["selection_r_max"]:
        cat = cut(cat, r_max=args["selection_r_max"])
    config = TrainConfig(layers=6, hidden=(64, 64), epochs=args["epochs"],
                         batch_size=args["batch_size"], validation_split=0.0, patience=0,
                         checkpoint_every=0, coordinates=args["coordinates"],
                         **args["overrides"])
    timer = EpochTimer()
    with tempfile.TemporaryDirectory() as run:
        train(cat, config, run, verbose=0, callbacks=[timer])
    print(json.dumps({"seconds": float(np.median(timer.times[1:])), "peak_mib": peak_rss_mib(),
                      "compile_peak_mib": timer.compile_peak}))
""")


def measure(args: argparse.Namespace, **overrides) -> tuple[float, float, float]:
    """(seconds per epoch, peak RSS of the epochs after the first, peak RSS of the first epoch
    (with XLA's compilation), both in MiB) of one training in a fresh process.
    """
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'benchmarks'}",
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    r_max = args.selection_r_max
    if r_max and args.coordinates == "spherical":
        overrides["support_r_max"] = r_max
    if r_max and overrides.get("deconvolve"):
        overrides["selection_r_max"] = r_max
    spec = {"n": args.n, "epochs": args.epochs, "batch_size": args.batch_size,
            "coordinates": args.coordinates, "selection_r_max": r_max, "overrides": overrides}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], env=env,
                         capture_output=True, text=True, check=True, timeout=7200)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["seconds"], result["peak_mib"], result["compile_peak_mib"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--ks", default="1,2,4,8,16")
    p.add_argument("--per-pass", default="2",
                   help="draws per pass of the flat-memory gradient, comma-separated (0: skip "
                        "those rows)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--coordinates", default="cartesian", choices=("cartesian", "spherical"),
                   help="what the flow learns (spherical: (r, v_r, v_t), errors on the 6 columns)")
    p.add_argument("--proposals", default="kernel",
                   help="TrainConfig.noise_proposal of the deconvolved rows, comma-separated "
                        "(kernel, tilted)")
    p.add_argument("--selection-r-max", type=float, default=None,
                   help="cut the noisy catalogue at this observed radius and fit the deconvolved "
                        "rows with selection_r_max (spherical: every row with support_r_max)")
    args = p.parse_args()
    if args.selection_r_max is not None and not args.selection_r_max > 0:
        p.error(f"--selection-r-max {args.selection_r_max}: must be positive")
    per_pass = [int(v) for v in args.per_pass.split(",")]
    proposals = [v.strip() for v in args.proposals.split(",") if v.strip()]
    if not proposals or not set(proposals) <= set(NOISE_PROPOSALS):
        p.error(f"--proposals {args.proposals!r}: expected names from "
                f"{', '.join(NOISE_PROPOSALS)}")
    others0 = others_cpu_seconds()     # the training processes have exited by each reading
    t0 = time.perf_counter()
    plain, plain_mib, plain_first = measure(args)
    print(f"N = {args.n}, batch {args.batch_size}, 6 x (2x64) affine MAF of {args.coordinates} "
          "coordinates, XLA, 16 steps per call; each row a fresh process"
          + (f"; cut and selection at r = {args.selection_r_max:g}" if args.selection_r_max
             else ""))
    print(f"{'fit':>22} {'s/epoch':>9} {'/ plain':>8} {'/ (K plain)':>12} {'peak MiB':>9} "
          f"{'- plain':>8} {'1st epoch':>10} {'- plain':>8}")
    print(f"{'plain':>22} {plain:9.3f} {1.0:8.2f} {'':>12} {plain_mib:9.0f} {0:8.0f} "
          f"{plain_first:10.0f} {0:8.0f}")
    for k in (int(v) for v in args.ks.split(",")):
        rows = [("one pass", 0)]
        rows += [(f"{per} per pass", per) for per in per_pass if 0 < per < k]
        for (name, per), proposal in ((row, q) for q in proposals for row in rows):
            t, mib, first = measure(args, deconvolve=True, noise_samples=k, noise_per_pass=per,
                                    noise_proposal=proposal)
            name = name if proposal == "kernel" else f"{name} tilt"
            print(f"{f'K={k} {name}':>22} {t:9.3f} {t / plain:8.2f} {t / (k * plain):12.2f} "
                  f"{mib:9.0f} {mib - plain_mib:8.0f} {first:10.0f} {first - plain_first:8.0f}",
                  flush=True)
    wall = time.perf_counter() - t0
    print(f"other processes used {others_cpu_seconds() - others0:.0f} CPU s during {wall:.0f} s "
          "of wall time (2 cores)")


if __name__ == "__main__":
    main()
