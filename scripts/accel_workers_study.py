"""Accelerations split across local worker processes: positions/s for W = 1 and 2, and equality.

Measures (writes studies/multiworker/accel_workers.json): wall time of
``tfgalflow.batch.accel_file(MODEL, positions, out, workers=W)`` for W = 1 (in this process) and
W = 2 (spawned processes, each loading the model itself; their start-up, TensorFlow import and
model load included), the positions per second, and the largest difference between the two
outputs (expected 0: every chunk has its own seed, whichever process solves it, and the workers
run with this process's TensorFlow thread settings). Also the time to the first finished chunk
(start-up: process spawn, TensorFlow import, model load, first trace; with W > 1 other chunks are
already under way by then, so no rate is derived from the time after it).

Settings: the shipped Hernquist SavedModel (saved_models/hernquist_iso/2, rebuilt as its Flow),
1024 positions at radii 0.3-10 (isotropic directions, seed 0), K = 64 velocities per position,
chunks of 64 positions (16 chunks). On 2 cores shared with other work the figure shows the start-up
overhead and at most a modest speed-up. Run: ``python scripts/accel_workers_study.py`` (about
3-4 minutes).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "studies" / "multiworker"
MODEL = ROOT / "saved_models" / "hernquist_iso" / "2"
B, K, CHUNK = 1024, 64, 64


def main() -> None:
    from tfgalflow import batch
    from tfgalflow.validation import unit_vectors

    rng = np.random.default_rng(0)
    positions = np.geomspace(0.3, 10.0, B)[:, None] * unit_vectors(B, rng)
    report = {"settings": {"model": str(MODEL.relative_to(ROOT)), "positions": B,
                           "n_velocities": K, "chunk": CHUNK, "cores": os.cpu_count()},
              "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "pos.npy", positions)
        outputs = {}
        for workers in (1, 2):
            out = Path(tmp) / f"a{workers}.h5"
            stamps: list[tuple[float, int]] = []
            t0 = time.perf_counter()
            batch.accel_file(MODEL, Path(tmp) / "pos.npy", out, seed=0, chunk=CHUNK,
                             n_velocities=K, workers=workers,
                             callback=lambda done, total, rows: stamps.append(
                                 (time.perf_counter() - t0, rows)))
            seconds = time.perf_counter() - t0
            with h5py.File(out, "r") as f:
                outputs[workers] = f["acceleration"][:]
            t_first = stamps[1][0]
            report["runs"].append({"workers": workers, "seconds": seconds,
                                   "positions_per_second": B / seconds,
                                   "first_chunk_seconds": t_first})
            print(f"workers {workers}: {seconds:.1f} s, {B / seconds:.1f} positions/s; first "
                  f"chunk after {t_first:.1f} s")
    report["max_abs_difference_w2_vs_w1"] = float(np.nanmax(np.abs(outputs[2] - outputs[1])))
    report["identical"] = bool(np.array_equal(outputs[2], outputs[1], equal_nan=True))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "accel_workers.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
