"""Time Flow training steps, log_prob, grad_log_prob and sampling, with and without XLA (jit_compile).

Each figure is printed beside its baseline measured in the same run (graph mode without XLA), so the
ratio is meaningful on any machine. Usage:

    .venv/bin/python benchmarks/bench_flows.py                       # 6D affine and spline, defaults
    .venv/bin/python benchmarks/bench_flows.py --kind affine --layers 4 --hidden 32 32 --repeats 5

Times are medians over ``--repeats`` calls after a first call (tracing, Grappler, XLA compilation;
reported separately as "first call"); the no-XLA and XLA versions are timed in alternation, so load
from other processes affects both alike. The speed-up is relative to the no-XLA median.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

from tfgalflow.flows import FlowConfig  # noqa: E402
from tfgalflow.model import Flow  # noqa: E402


def first_call(fn) -> float:
    """Seconds of the first call (tracing, Grappler, XLA compilation, then one run)."""
    t0 = time.perf_counter()
    np.asarray(fn())
    return time.perf_counter() - t0


def interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds per call of each warmed-up fn, timed in alternation so that load from other
    processes on the machine affects all of them alike."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            np.asarray(fn())
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def data(n: int, dim: int, label_dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """Correlated Gaussian data [n, dim] with a label-dependent mean; labels [n, label_dim] | None."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    x = rng.normal(size=(n, dim)) @ mix
    if not label_dim:
        return x, None
    c = rng.uniform(-1, 1, size=(n, label_dim))
    return x + c.sum(1, keepdims=True), c


def bench_kind(args, kind: str) -> None:
    cfg = FlowConfig(dim=args.dim, label_dim=args.label_dim, layers=args.layers, hidden=tuple(args.hidden),
                     kind=kind, bins=args.bins)
    x, c = data(args.n, args.dim, args.label_dim)
    xb = tf.constant(x[:args.batch], tf.float32)
    cb = tf.constant(c[:args.batch], tf.float32) if c is not None else None
    print(f"\n== {kind}: dim={cfg.dim} label_dim={cfg.label_dim} layers={cfg.layers} hidden={cfg.hidden} "
          f"batch={args.batch} n_eval={args.n}")
    rows = []   # (operation, xla, first-call s, median s)

    def compare(name: str, plain, xla) -> None:
        firsts = {False: first_call(plain), True: first_call(xla) if xla is not None else None}
        fns = {False: plain} if xla is None else {False: plain, True: xla}
        medians = interleaved(fns, args.repeats)
        for jit in fns:
            rows.append((name, jit, firsts[jit], medians[jit]))

    # training steps: Keras train_function (graph) without and with XLA (compile(jit_compile=...))
    trainers = {}
    for jit in (False, True):
        flow = Flow(cfg)
        flow.adapt(x, c)
        flow.compile(keras.optimizers.Adam(1e-3), jit_compile=jit)
        it = iter(tf.data.Dataset.from_tensors((xb, cb) if cb is not None else xb).repeat())
        flow.make_train_function()

        def steps(flow=flow, it=it):
            for _ in range(args.steps):
                out = flow.train_function(it)
            return out["loss"]

        trainers[jit] = steps
    compare(f"train {args.steps} steps", trainers[False], trainers[True])

    # evaluation: log_prob / grad_log_prob on n points (Flow(jit_compile=...)), sampling n/10 points
    xe = x[:args.n]
    ce = c[:args.n] if c is not None else None
    plain, xla = Flow(cfg), Flow(cfg, jit_compile=True)
    for flow in (plain, xla):
        flow.adapt(x, c)
    compare("log_prob", lambda: plain.log_prob(xe, ce), lambda: xla.log_prob(xe, ce))
    compare("grad_log_prob", lambda: plain.grad_log_prob(xe, ce), lambda: xla.grad_log_prob(xe, ce))
    n_s = args.n // 10
    compare(f"sample {n_s}", lambda: plain.sample(n_s, ce[:n_s] if ce is not None else None, seed=1), None)

    base = {name: median for name, jit, _, median in rows if not jit}
    print(f"{'operation':<22}{'XLA':>5}{'first call s':>14}{'median s':>11}{'speed-up':>10}")
    for name, jit, first, median in rows:
        print(f"{name:<22}{'yes' if jit else 'no':>5}{first:>14.3f}{median:>11.4f}{base[name] / median:>9.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", choices=["affine", "spline", "both"], default="both")
    p.add_argument("--dim", type=int, default=6)
    p.add_argument("--label-dim", type=int, default=0)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 64])
    p.add_argument("--bins", type=int, default=8)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=20, help="train steps per timed repeat")
    p.add_argument("--n", type=int, default=10000, help="points for log_prob / grad (n/10 for sampling)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    threads = tf.config.threading.get_intra_op_parallelism_threads()
    print(f"TensorFlow {tf.__version__}, intra-op threads {threads} (0 = all), cores {os.cpu_count()}")
    for kind in (["affine", "spline"] if args.kind == "both" else [args.kind]):
        bench_kind(args, kind)


if __name__ == "__main__":
    main()
