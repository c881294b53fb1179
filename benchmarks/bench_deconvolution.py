"""Training time per epoch of the deconvolved fit vs K (noise draws per star), beside the plain
fit.

    python benchmarks/bench_deconvolution.py [--n 20000] [--ks 1,2,4,8,16] [--epochs 3]

Same data (the 10 %-noise Hernquist mock, fractional errors), architecture (6 layers, 2x64), batch
(1024), XLA and steps per call for every row; the first epoch (XLA compilation) is dropped and the
median of the others reported. Each step evaluates the flow on K·B rows, so the expected cost is
~K times the plain fit's at large K (less at small K, where per-call overhead dominates). Memory
per step also grows ~K (K·B rows in flight) but not with N. CPU seconds used by other processes
during the run are printed (on a shared machine they inflate the times).
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

import tfgalflow  # noqa: F401  (sets TF_USE_LEGACY_KERAS before tf_keras is imported)
import tf_keras as keras
from _timing import others_cpu_seconds
from tfgalflow.mocks import add_noise, sample_hernquist
from tfgalflow.training import TrainConfig, train


class EpochTimer(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self.t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self.t0)


def epoch_seconds(cat, config: TrainConfig) -> float:
    timer = EpochTimer()
    with tempfile.TemporaryDirectory() as run:
        train(cat, config, run, verbose=0, callbacks=[timer])
    return float(np.median(timer.times[1:]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--ks", default="1,2,4,8,16")
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    cat = add_noise(sample_hernquist(args.n, seed=0, r_max=100.0), 0.1, seed=1)
    base = TrainConfig(layers=6, hidden=(64, 64), epochs=args.epochs, batch_size=1024,
                       validation_split=0.0, patience=0, checkpoint_every=0)
    others0 = others_cpu_seconds()
    t0 = time.perf_counter()
    plain = epoch_seconds(cat, base)
    print(f"N = {len(cat)}, batch 1024, 6 x (2x64) affine MAF, XLA, 16 steps per call")
    print(f"{'fit':>14} {'s/epoch':>9} {'/ plain':>8} {'/ (K plain)':>12}")
    print(f"{'plain':>14} {plain:9.3f} {1.0:8.2f} {'':>12}")
    for k in (int(v) for v in args.ks.split(",")):
        t = epoch_seconds(cat, base.with_overrides(deconvolve=True, noise_samples=k))
        print(f"{'deconv K=' + str(k):>14} {t:9.3f} {t / plain:8.2f} {t / (k * plain):12.2f}")
    wall = time.perf_counter() - t0
    print(f"other processes used {others_cpu_seconds() - others0:.0f} CPU s during {wall:.0f} s "
          "of wall time (2 cores)")


if __name__ == "__main__":
    main()
