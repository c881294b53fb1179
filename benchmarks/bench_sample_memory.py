"""Peak memory of streaming N stars of one galaxy to HDF5 (``tfgalflow sample ... --out x.h5``)
against drawing them in memory, N = 10^5 ... 10^7.

The model is the galaxy_population task's (tfgalflow.tasks.galaxy_population): an
:class:`~tfgalflow.axisymmetric_df.AxisymmetricDF` over a conditional affine MAF of the 7 reduced
columns (8 layers, MADE 2 x 128 tanh, 5 labels), untrained (the cost does not depend on the
weights). Each measurement runs in a fresh process and reports the growth of its peak resident set
(VmHWM) over the state after a warm-up chunk through the same path, and the wall time:

    streamed    tfgalflow.batch.sample_file (the CLI's path): chunks of 65536 rows written as
                they are drawn; memory should not grow with N
    in memory   model.sample(N) as one array (the baseline: grows ~ N x (8 float32 + work))

    python benchmarks/bench_sample_memory.py            # N = 1e5, 1e6, 1e7 (~3 min on 2 cores)
    python benchmarks/bench_sample_memory.py --quick    # N = 1e4, 1e5
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import sys, time, numpy as np
    from _timing import peak_rss_mib
    from tfgalflow import batch
    from tfgalflow.axisymmetric_df import AxisymmetricDF
    from tfgalflow.flows import FlowConfig
    from tfgalflow.model import Flow

    n, mode, out = int(float(sys.argv[1])), sys.argv[2], sys.argv[3]
    rng = np.random.default_rng(0)
    flow = Flow(FlowConfig(dim=7, label_dim=5, layers=8, hidden=(128, 128), activation="tanh",
                           log_columns=(0, 6), seed=0))
    u = np.abs(rng.normal(size=(2000, 7))) + 0.1
    flow.adapt(u.astype(np.float32), rng.normal(size=(2000, 5)).astype(np.float32))
    model = AxisymmetricDF(flow)
    labels = np.zeros(5)
    # warm-up: one full chunk through the same path, so the traces and XLA programs of a chunk
    # (a one-off ~0.5 GB while XLA compiles the sampler) are in the baseline
    batch.sample_file(model, 65536, out + ".warm.h5", labels=labels, seed=0)
    before = peak_rss_mib()
    t = time.perf_counter()
    if mode == "stream":
        batch.sample_file(model, n, out, labels=labels, seed=1)
    else:
        x = np.asarray(model.sample(n, labels=labels, seed=1))
    print(before, peak_rss_mib(), time.perf_counter() - t)
""")


def measure(n: float, mode: str, tmp: Path) -> tuple[float, float, float]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'benchmarks'}",
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(n), mode, str(tmp / f"s{n}.h5")],
                         env=env, capture_output=True, text=True, check=True,
                         timeout=3600).stdout.split()
    before, after, seconds = (float(v) for v in out[-3:])
    return before, after - before, seconds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="N = 1e4, 1e5 only (~1 min)")
    args = p.parse_args(argv)
    sizes = (1e4, 1e5) if args.quick else (1e5, 1e6, 1e7)
    print(f"{'N':>10} {'mode':>10} {'base MiB':>9} {'growth MiB':>11} {'seconds':>8} "
          f"{'stars/s':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            modes = ("stream", "memory") if n <= sizes[-2] else ("stream",)
            for mode in modes:
                start = time.perf_counter()
                base, growth, seconds = measure(n, mode, Path(tmp))
                print(f"{n:>10.0e} {mode:>10} {base:9.0f} {growth:11.1f} {seconds:8.1f} "
                      f"{n / seconds:9.3g}   ({time.perf_counter() - start:.0f} s with start-up)",
                      flush=True)


if __name__ == "__main__":
    main()
