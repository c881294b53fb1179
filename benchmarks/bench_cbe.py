"""Time CBE accelerations: the batched layer against a loop over positions, same model, same run.

The reference implementations solve the collisionless Boltzmann equation one position at a time: for each
x, evaluate ∇ log f at the K velocities of that x, then one small least-squares solve. tfgalflow does all
B positions at once (chunked GradientTape passes + one batched 3x3 eigen-solve, CBELayer). Two stages:

  solve      velocities given (one batched SIR draw, shared): gradients + least squares
             batched: cbe.solve_cbe (one traced GradientTape pass + CBELayer per chunk of positions)
             loop:    per position, cbe.df_gradients on its K rows + numpy.linalg.lstsq
  end-to-end batched: cbe.accelerations (sampling included)
             loop:    per position, cbe.sample_velocities + df_gradients + numpy.linalg.lstsq

The loop is timed on ``--loop-subset`` positions and extrapolated linearly to all B (it is a fixed cost
per position); the printout says so. Both paths are checked to give the same accelerations.

    .venv/bin/python benchmarks/bench_cbe.py                                    # 10^4 positions x 256
    .venv/bin/python benchmarks/bench_cbe.py --positions 2000 --loop-subset 100 --model exact
"""
from __future__ import annotations

import argparse
import os
import time

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfgalflow import cbe  # noqa: E402
from tfgalflow.hernquist import Hernquist  # noqa: E402


def hernquist_mock(n: int, seed: int) -> np.ndarray:
    """Exact isotropic Hernquist draws [n, 6] (r < 20 a), to adapt and briefly train the flow."""
    h = Hernquist()
    rng = np.random.default_rng(seed)
    s = np.sqrt(rng.uniform(0.0, (20 / 21) ** 2, n))
    r = s / (1 - s)
    psi = h.relative_potential(r)
    q, todo = np.empty(n), np.arange(n)
    while todo.size:
        trial = rng.uniform(size=todo.size) ** (1 / 3)
        accept = rng.uniform(size=todo.size) * h.f_iso(psi[todo]) < h.f_iso(psi[todo] * (1 - trial**2))
        q[todo[accept]] = trial[accept]
        todo = todo[~accept]
    d = rng.normal(size=(2, n, 3))
    d /= np.linalg.norm(d, axis=2, keepdims=True)
    return np.concatenate([r[:, None] * d[0], (q * np.sqrt(2 * psi))[:, None] * d[1]], axis=1)


def build_model(args):
    if args.model == "exact":
        return Hernquist().exact_density("iso"), "exact isotropic Hernquist DF"
    import tf_keras as keras
    from tfgalflow.flows import FlowConfig
    from tfgalflow.model import Flow
    w = hernquist_mock(20_000, seed=0)
    flow = Flow(FlowConfig(dim=6, layers=args.layers, hidden=tuple(args.hidden), seed=0)).adapt(w)
    flow.compile(keras.optimizers.Adam(2e-3))
    flow.fit(w.astype(np.float32), epochs=args.epochs, batch_size=512, verbose=0)
    return flow, f"Flow(layers={args.layers}, hidden={tuple(args.hidden)}) trained {args.epochs} epochs on 2e4 stars"


def batched_solve(df, x: np.ndarray, v: tf.Tensor) -> np.ndarray:
    """cbe.solve_cbe: traced gradients + CBELayer on chunks of 2^16 / K positions: [B, 3]."""
    return cbe.solve_cbe(df, x, v)[0].numpy()


def loop_solve(df, x: np.ndarray, v: np.ndarray) -> np.ndarray:
    """One position at a time: gradients at its K velocities, one least-squares solve (the reference shape)."""
    out = np.empty((len(x), 3))
    for i in range(len(x)):
        g_x, g_v = cbe.df_gradients(df, np.repeat(x[i:i + 1], len(v[i]), axis=0), v[i])
        g_x, g_v = g_x.numpy().astype(np.float64), g_v.numpy().astype(np.float64)
        b = np.sum(v[i] * g_x, axis=1)
        out[i] = np.linalg.lstsq(g_v, -b, rcond=None)[0]
    return out


def loop_end_to_end(df, x: np.ndarray, k: int, seed: int) -> np.ndarray:
    out = np.empty((len(x), 3))
    for i in range(len(x)):
        v = cbe.sample_velocities(df, x[i:i + 1], k, seed=[seed, i])[0].numpy()
        out[i] = loop_solve(df, x[i:i + 1], v[None])[0]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--positions", type=int, default=10_000)
    p.add_argument("--velocities", type=int, default=256)
    p.add_argument("--loop-subset", type=int, default=200, help="positions timed in the loop (extrapolated)")
    p.add_argument("--model", choices=("flow", "exact"), default="flow")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, nargs="+", default=[32, 32])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    df, description = build_model(args)
    h = Hernquist()
    rng = np.random.default_rng(args.seed)
    d = rng.normal(size=(args.positions, 3))
    x = (np.geomspace(0.1, 10.0, args.positions)[:, None] * d / np.linalg.norm(d, axis=1, keepdims=True))
    x = x.astype(np.float32)
    k, n_loop = args.velocities, min(args.loop_subset, args.positions)
    print(f"model: {description}; {args.positions} positions x {k} velocities; "
          f"{os.cpu_count()} CPUs, TF {tf.__version__}")

    # Warm-ups (tracing) outside the timings.
    cbe.accelerations(df, x[:3], k, seed=args.seed)
    v_all = cbe.sample_velocities(df, x, k, seed=args.seed)
    chunk = max(1, cbe.GRADIENT_ROWS_PER_CHUNK // k)
    batched_solve(df, x[:chunk], v_all[:chunk])
    loop_solve(df, x[:2], v_all[:2].numpy())
    loop_end_to_end(df, x[:2], k, args.seed)

    t0 = time.perf_counter()
    a_batched = batched_solve(df, x, v_all)
    t_batched = time.perf_counter() - t0
    v_np = v_all.numpy()
    t0 = time.perf_counter()
    a_loop = loop_solve(df, x[:n_loop], v_np[:n_loop])
    t_loop = (time.perf_counter() - t0) * args.positions / n_loop
    agree = np.max(np.linalg.norm(a_loop - a_batched[:n_loop], axis=1) / np.linalg.norm(a_loop, axis=1))

    t0 = time.perf_counter()
    res = cbe.accelerations(df, x, k, seed=args.seed)
    t_e2e = time.perf_counter() - t0
    t0 = time.perf_counter()
    loop_end_to_end(df, x[:n_loop], k, args.seed)
    t_e2e_loop = (time.perf_counter() - t0) * args.positions / n_loop

    extrap = f" (timed on {n_loop} positions, x{args.positions / n_loop:g} extrapolated)" if n_loop < args.positions else ""
    print(f"\nsolve stage (same velocities): gradients + least squares for {args.positions} positions")
    print(f"  batched (cbe.solve_cbe, chunks of {chunk} positions): {t_batched:9.2f} s")
    print(f"  loop (one position at a time, numpy lstsq){extrap}: {t_loop:9.2f} s")
    print(f"  speed-up: {t_loop / t_batched:.1f}x   (max relative difference of the two answers: {agree:.1e})")
    print(f"\nend to end (velocity sampling included)")
    print(f"  batched cbe.accelerations: {t_e2e:9.2f} s")
    print(f"  loop (sample_velocities + gradients + lstsq per position){extrap}: {t_e2e_loop:9.2f} s")
    print(f"  speed-up: {t_e2e_loop / t_e2e:.1f}x")
    err = np.linalg.norm(res.acceleration - h.acceleration(x), axis=1) / np.linalg.norm(h.acceleration(x), axis=1)
    note = "" if args.model == "exact" else f" (a {args.epochs}-epoch timing model: not an accuracy figure)"
    print(f"\naccuracy vs the analytic Hernquist acceleration{note}: median {np.median(err):.2e}, "
          f"90th percentile {np.percentile(err, 90):.2e}; flagged {int(res.flagged.sum())} of {args.positions}")


if __name__ == "__main__":
    main()
