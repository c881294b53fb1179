"""Throughput of multi-worker training on loopback, and the memory of streamed log p.

Measures (writes studies/multiworker/report.json):

* training samples/s of one process and of W = 2 MultiWorkerMirroredStrategy workers on
  127.0.0.1 (TF_CONFIG), same model, global batch and data; the mean wall time of epochs after
  the first (tracing, collective set-up excluded). On a 2-core machine no speed-up is expected:
  the figure is the overhead of the all-reduce and of splitting each batch;
* the all-reduce volume per step (4 bytes per trainable weight) and the time per step;
* peak RSS (VmHWM) of ``tfgalflow.batch.log_prob_file`` over files of 5 and 20 chunks, against
  an in-memory ``log_prob`` of the same 20-chunk array.

Settings: 6-D Gaussian data, 2^16 training rows, flow of 4 layers x (64, 64), global batch 1024,
3 epochs, no XLA, one step per call (what multi-worker training uses); each worker limited to
2 / W threads. Run: ``python scripts/multiworker_study.py`` (about 2 minutes on 2 cores).
"""
from __future__ import annotations

import json
import os

import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

from tfgalflow.training.distributed import free_ports

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "studies" / "multiworker"
N, BATCH, EPOCHS, LAYERS, HIDDEN = 2**16, 1024, 3, 4, (64, 64)

WORKER = textwrap.dedent("""
    import json, os, sys, time
    run_dir, data, ports, index, threads = sys.argv[1:6]
    if ports:
        os.environ["TF_CONFIG"] = json.dumps({
            "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports.split(",")]},
            "task": {"type": "worker", "index": int(index)}})
    import numpy as np
    import tfgalflow  # noqa: F401  (first: sets up Keras 2 for TFP)
    import tensorflow as tf
    import tf_keras as keras
    tf.config.threading.set_intra_op_parallelism_threads(int(threads))
    tf.config.threading.set_inter_op_parallelism_threads(int(threads))
    from tfgalflow.training import TrainConfig, train

    class Clock(keras.callbacks.Callback):
        times = []
        def on_epoch_begin(self, epoch, logs=None):
            self.t = time.perf_counter()
        def on_epoch_end(self, epoch, logs=None):
            Clock.times.append(time.perf_counter() - self.t)

    cfg = TrainConfig(layers=%d, hidden=%r, epochs=%d, batch_size=%d, validation_split=0,
                      patience=0, checkpoint_every=0, jit_compile=False, steps_per_call=1,
                      multi_worker=bool(ports))
    flow = train(np.load(data), cfg, run_dir, verbose=0, callbacks=[Clock()])
    params = int(sum(np.prod(v.shape) for v in flow.trainable_variables))
    print("RESULT", json.dumps({"epoch_s": Clock.times, "params": params}))
""" % (LAYERS, HIDDEN, EPOCHS, BATCH))


def run_workers(tmp: Path, data: Path, workers: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    ports = ",".join(map(str, free_ports(workers))) if workers > 1 else ""
    threads = str(max(1, 2 // workers))
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp / f"run{workers}_{i}"),
                               str(data), ports, str(i), threads], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(workers)]
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=900)
            if p.returncode:
                raise RuntimeError(out[-3000:])
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    result = json.loads(outs[0].split("RESULT", 1)[1].strip().splitlines()[0])
    steady = float(np.mean(result["epoch_s"][1:]))
    steps = N // BATCH
    return {"workers": workers, "epoch_seconds": result["epoch_s"],
            "steady_epoch_seconds": steady, "samples_per_second": N / steady,
            "seconds_per_step": steady / steps, "trainable_weights": result["params"],
            "allreduce_bytes_per_step": 4 * result["params"] if workers > 1 else 0}


MEMORY = textwrap.dedent("""
    import sys, numpy as np
    from tfgalflow import batch
    from tfgalflow.flows import FlowConfig
    from tfgalflow.model import Flow
    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    path, out, chunk, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    f = Flow(FlowConfig(dim=6, layers=2, hidden=(16, 16), seed=0))
    f.adapt(np.random.default_rng(0).normal(size=(500, 6)))
    f.log_prob(np.zeros((chunk, 6)))
    before = hwm()
    if mode == "stream":
        batch.log_prob_file(f, path, out, chunk=chunk)
    else:
        from tfgalflow.catalogue import Catalogue
        f.log_prob(Catalogue.load(path).phase_space)
    print(before, hwm())
""")


def memory(tmp: Path, chunk: int = 50_000) -> dict:
    import h5py
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = {"chunk_rows": chunk}
    for chunks in (5, 20):
        rows = chunks * chunk
        path = tmp / f"big{chunks}.h5"
        with h5py.File(path, "w") as f:
            f.attrs["units"] = '{"length": "kpc", "velocity": "km/s"}'
            rng = np.random.default_rng(0)
            for name in ("pos", "vel"):
                ds = f.create_dataset(name, (rows, 3), "f8", chunks=(chunk, 3))
                for a in range(0, rows, chunk):
                    ds[a:a + chunk] = rng.normal(size=(chunk, 3))
        modes = ("stream", "memory") if chunks == 20 else ("stream",)
        for mode in modes:
            out = subprocess.run([sys.executable, "-c", MEMORY, str(path),
                                  str(tmp / f"lp{chunks}{mode}.h5"), str(chunk), mode],
                                 env=env, capture_output=True, text=True, check=True,
                                 timeout=600).stdout.split()
            before, after = float(out[-2]), float(out[-1])
            result[f"{mode}_{chunks}_chunks_MiB"] = {"before": before, "after": after,
                                                     "growth": after - before}
    return result


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "x.npy"
        np.save(data, np.random.default_rng(0).normal(size=(N, 6)).astype(np.float32))
        report = {"settings": {"rows": N, "global_batch": BATCH, "epochs": EPOCHS,
                               "layers": LAYERS, "hidden": list(HIDDEN), "cores": os.cpu_count(),
                               "xla": False, "steps_per_call": 1},
                  "training": [run_workers(tmp, data, w) for w in (1, 2)],
                  "streaming_memory": memory(tmp)}
    (OUT / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
