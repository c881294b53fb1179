"""Multi-worker training with tf.distribute.MultiWorkerMirroredStrategy on loopback.

Truth: a single-process run with the same global batch and data order. Two workers each compute
the gradient of their half of every global batch (loss = half-batch Σ -log p / global batch
size) and all-reduce the sum, which is the gradient of the global mean: the runs differ only by
float32 summation order (~1e-7 relative per step; measured 9e-8 absolute over 16 Adam steps), so
rtol 1e-5 / atol 1e-5 is loose for rounding yet fails for a wrong loss scale (factor 2 in the
step) or data order.
"""
from __future__ import annotations

import json
import os
import socket

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tfgalflow.errors import InputError
from tfgalflow.training import distributed

WORKER = textwrap.dedent("""
    import json, os, signal, sys
    run_dir, data, ports, index, out, epochs, mode, kill_at = sys.argv[1:9]
    if ports:
        os.environ["TF_CONFIG"] = json.dumps({
            "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports.split(",")]},
            "task": {"type": "worker", "index": int(index)}})
    import numpy as np
    import tf_keras as keras
    from tfgalflow.training import TrainConfig, resume, train

    class Kill(keras.callbacks.Callback):      # a hard kill (SIGKILL) after `kill_at` steps
        steps = 0

        def on_train_batch_end(self, batch, logs=None):
            Kill.steps += 1
            if Kill.steps == int(kill_at):
                os.kill(os.getpid(), signal.SIGKILL)

    callbacks = [Kill()] if int(kill_at) else []
    config = TrainConfig(layers=2, hidden=(8, 8), epochs=int(epochs), batch_size=128, lr=1e-2,
                         lr_schedule="constant", validation_split=0.2, patience=0,
                         checkpoint_every=1, jit_compile=False, steps_per_call=1,
                         multi_worker=bool(ports))
    if mode == "resume":
        flow = resume(run_dir, data=np.load(data), verbose=0, callbacks=callbacks)
    else:
        flow = train(np.load(data), config, run_dir, verbose=0, callbacks=callbacks)
    np.save(out, np.concatenate([w.ravel() for w in flow.get_weights()]))
""")


def start(tmp_path, name, data, ports="", index=0, epochs=2, mode="train", kill_at=0,
          run=None):
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("TF_CONFIG", None)
    args = [str(tmp_path / (run or name)), str(data), ports, str(index),
            str(tmp_path / f"{name}.npy"), str(epochs), mode, str(kill_at)]
    return subprocess.Popen([sys.executable, "-c", WORKER, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(procs, timeout=240):
    """Wait for every process (bounded); kill all of them on a timeout or a failure."""
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            assert p.returncode == 0, out[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.slow   # trains or spawns processes: make test-slow (default suite < 10 min)
def test_two_workers_on_loopback_match_a_single_process(tmp_path):
    (tmp_path / "tmp").mkdir()
    data = tmp_path / "x.npy"
    # 1280 rows: 1024 training rows = 8 global batches of 128 (64 per worker), 256 validation
    np.save(data, np.random.default_rng(0).normal(size=(1280, 2)).astype(np.float32))
    finish([start(tmp_path, "single", data)])
    ports = ",".join(map(str, distributed.free_ports(2)))
    finish([start(tmp_path, name, data, ports, i) for i, name in enumerate(["chief", "other"])])
    single, chief, other = (np.load(tmp_path / f"{n}.npy") for n in ("single", "chief", "other"))
    np.testing.assert_allclose(chief, single, rtol=1e-5, atol=1e-5)
    assert np.array_equal(chief, other)                   # the replicas stay identical
    # the chief wrote the run directory with the single run's history; the other worker wrote
    # only into a temporary directory, deleted at the end
    hist = [np.loadtxt(tmp_path / n / "member_000" / "history.csv", delimiter=",", skiprows=1)
            for n in ("single", "chief")]
    np.testing.assert_allclose(hist[1], hist[0], rtol=1e-5)
    assert json.loads((tmp_path / "chief" / "config.json").read_text())["train"]["multi_worker"]
    assert not (tmp_path / "other").exists() and list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.slow
def test_killed_worker_restarted_resumes_to_the_uninterrupted_history(tmp_path):
    """Worker 1 is SIGKILLed in the middle of epoch 2 (step 11 of 8 per epoch), the chief is
    killed too; both restart with ``resume``: the run repeats epoch 2 from the chief's ckpt-1 and
    ends with the history and weights of an uninterrupted single-process run of 3 epochs.
    """
    (tmp_path / "tmp").mkdir()
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(0).normal(size=(1280, 2)).astype(np.float32))
    finish([start(tmp_path, "single", data, epochs=3)])
    ports = ",".join(map(str, distributed.free_ports(2)))
    chief = start(tmp_path, "chief", data, ports, 0, epochs=3)
    other = start(tmp_path, "other", data, ports, 1, epochs=3, kill_at=11, run="other")
    try:
        other.communicate(timeout=240)
        assert other.returncode == -9                       # killed mid-epoch
    finally:
        chief.kill()                                        # hung or failed without its peer
        chief.communicate()
    hist = tmp_path / "chief" / "member_000" / "history.csv"
    assert len(hist.read_text().splitlines()) == 2          # header + epoch 1
    left = set((tmp_path / "tmp").glob("tfgalflow-*"))       # the killed worker's temp dir
    ports = ",".join(map(str, distributed.free_ports(2)))
    finish([start(tmp_path, "chief", data, ports, 0, epochs=3, mode="resume"),
            start(tmp_path, "other", data, ports, 1, epochs=3, mode="resume", run="chief")])
    want = np.loadtxt(tmp_path / "single" / "member_000" / "history.csv", delimiter=",",
                      skiprows=1)
    got = np.loadtxt(hist, delimiter=",", skiprows=1)
    assert got.shape == want.shape == (3, 3)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "chief.npy"), np.load(tmp_path / "single.npy"),
                               rtol=1e-5, atol=1e-5)
    assert set((tmp_path / "tmp").glob("tfgalflow-*")) == left   # the resumed copy is gone


HDF5_WORKER = textwrap.dedent("""
    import json, os, sys
    run_dir, data, ports, index, out = sys.argv[1:6]
    os.environ["TF_CONFIG"] = json.dumps({
        "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports.split(",")]},
        "task": {"type": "worker", "index": int(index)}})
    import h5py
    import numpy as np
    from tfgalflow.training import TrainConfig, train
    rows = set()
    original = h5py.Dataset.__getitem__

    def recording(self, key):             # the rows of unit-step reads of pos (not the strided
        if self.name == "/pos" and isinstance(key, slice) and key.step in (None, 1):
            rows.update(range(*key.indices(self.shape[0])))    # subsample of the rescaler)
        return original(self, key)

    h5py.Dataset.__getitem__ = recording
    config = TrainConfig(layers=2, hidden=(8, 8), epochs=2, batch_size=128, lr=1e-2,
                         lr_schedule="constant", validation_split=0.25, patience=0,
                         checkpoint_every=1, jit_compile=False, steps_per_call=1,
                         multi_worker=True, adapt_samples=100)    # a strided rescaler read
    flow = train(data, config, run_dir, verbose=0)
    np.save(out, np.concatenate([w.ravel() for w in flow.get_weights()]))
    json.dump(sorted(rows), open(out + ".rows.json", "w"))
""")


@pytest.mark.slow          # two worker processes (~10 s)
def test_two_workers_stream_their_own_shards_of_an_hdf5_file(tmp_path):
    """2001 rows, 500 validation rows (the last): worker i reads training rows [750 i, 750 (i+1))
    (the odd 1501st training row sits out) and the validation rows, nothing else.
    """
    from tfgalflow.catalogue import Catalogue
    (tmp_path / "tmp").mkdir()
    rng = np.random.default_rng(0)
    data = Catalogue(rng.normal(size=(2001, 3)), rng.normal(size=(2001, 3)),
                     units={"length": "kpc", "velocity": "km/s"}).save(tmp_path / "cat.h5")
    ports = ",".join(map(str, distributed.free_ports(2)))
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    finish([subprocess.Popen([sys.executable, "-c", HDF5_WORKER, str(tmp_path / f"run{i}"),
                              str(data), ports, str(i), str(tmp_path / f"w{i}.npy")], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(2)])
    for i in range(2):
        rows = set(json.loads((tmp_path / f"w{i}.npy.rows.json").read_text()))
        assert rows == set(range(750 * i, 750 * (i + 1))) | set(range(1501, 2001))
    assert np.array_equal(np.load(tmp_path / "w0.npy"), np.load(tmp_path / "w1.npy"))
    hist = np.loadtxt(tmp_path / "run0" / "member_000" / "history.csv", delimiter=",",
                      skiprows=1)
    assert hist.shape == (2, 3) and np.all(np.isfinite(hist))
    assert not (tmp_path / "run1").exists()


SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "4",
         "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}


@pytest.mark.parametrize("rank,chief", [(0, True), (3, False)])
def test_slurm_job_step_gives_one_worker_per_task(monkeypatch, rank, chief):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    for k, v in {**SLURM, "SLURM_PROCID": str(rank)}.items():
        monkeypatch.setenv(k, v)
    resolver = distributed.cluster_resolver()
    assert resolver.cluster_spec().as_dict() == {"worker": [
        "node01:8888", "node01:8889", "node02:8888", "node02:8889"]}
    assert (resolver.task_type, resolver.task_id) == ("worker", rank)

    class Strategy:
        cluster_resolver = resolver
    assert distributed.is_chief(Strategy()) is chief


def test_multi_worker_without_a_cluster_is_refused(monkeypatch):
    for k in ["TF_CONFIG", *SLURM, "SLURM_PROCID"]:
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(InputError, match="TF_CONFIG"):
        distributed.cluster_resolver()
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(InputError, match="TF_CONFIG: expected JSON"):
        distributed.cluster_resolver()


def test_the_chief_is_the_chief_task_or_worker_zero():
    class Resolver:
        def __init__(self, task_type, task_id, cluster):
            self.task_type, self.task_id, self.cluster = task_type, task_id, cluster

        def cluster_spec(self):
            import tensorflow as tf
            return tf.train.ClusterSpec(self.cluster)

    def chief(*args):
        class Strategy:
            cluster_resolver = Resolver(*args)
        return distributed.is_chief(Strategy())

    workers = {"worker": ["a:1", "b:1"]}
    assert chief("worker", 0, workers) and not chief("worker", 1, workers)
    with_chief = {"chief": ["c:1"], **workers}
    assert chief("chief", 0, with_chief) and not chief("worker", 0, with_chief)
    assert distributed.is_chief(object())                 # no cluster: a single process


PARQUET_WORKER = textwrap.dedent("""
    import json, os, sys
    table, run_dir, ports, index, out = sys.argv[1:6]
    os.environ["TF_CONFIG"] = json.dumps({
        "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports.split(",")]},
        "task": {"type": "worker", "index": int(index)}})
    import numpy as np
    from tfgalflow.cli import main
    from tfgalflow.training.data import ParquetPipelines
    rows = set()
    original = ParquetPipelines._stream

    def recording(self, batch, epoch, start, stop):     # the training rows this worker streams
        for b in original(self, batch, epoch, start, stop):
            rows.update(np.rint(b[0][:, 0]).astype(int).tolist())
            yield b

    ParquetPipelines._stream = recording
    code = main(["train", table, "--event-columns", "id,y", "--label-columns", "node",
                 "--multi-worker", "--out", run_dir, "--layers", "1", "--hidden", "8",
                 "--epochs", "2", "--batch-size", "128", "--validation-split", "0.25",
                 "--verbose", "0", "--no-jit-compile", "--steps-per-call", "1"])
    json.dump({"code": code, "rows": sorted(rows)}, open(out, "w"))
""")


@pytest.mark.slow          # two worker processes (~15 s)
def test_two_workers_stream_their_own_shards_of_a_parquet_table(tmp_path):
    """`tfgalflow train TABLE.parquet --multi-worker`: 2000 rows sorted by label, 500 validation
    rows spread over the file (every 4th), 1500 training rows: worker i streams training rows
    [750 i, 750 (i+1)) and no other, the chief writes the run.
    """
    pytest.importorskip("pyarrow")
    from tfgalflow.catalogue import write_parquet
    (tmp_path / "tmp").mkdir()
    ids = np.arange(2000, dtype=np.float64)
    table = tmp_path / "t.parquet"
    write_parquet(table, np.stack([ids, np.random.default_rng(0).normal(size=2000)], axis=1),
                  ids // 200, ("id", "y"), ("node",), row_group_size=100)
    ports = ",".join(map(str, distributed.free_ports(2)))
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    finish([subprocess.Popen([sys.executable, "-c", PARQUET_WORKER, str(table),
                              str(tmp_path / f"run{i}"), ports, str(i),
                              str(tmp_path / f"w{i}.json")], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(2)])
    training = ids[(ids + 1) * 500 // 2000 == ids * 500 // 2000].astype(int)   # 3 rows in 4
    assert len(training) == 1500
    for i in range(2):
        out = json.loads((tmp_path / f"w{i}.json").read_text())
        assert out["code"] == 0
        assert out["rows"] == sorted(training[750 * i:750 * (i + 1)].tolist())
    config = json.loads((tmp_path / "run0" / "config.json").read_text())
    assert config["data"]["source"] == "parquet" and config["train"]["multi_worker"]
    hist = np.loadtxt(tmp_path / "run0" / "member_000" / "history.csv", delimiter=",",
                      skiprows=1)
    assert hist.shape == (2, 3) and np.all(np.isfinite(hist))
    assert not (tmp_path / "run1").exists()


# ---- loss scaling for any split -----------------------------------------------------------------

UNEVEN_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]          # two logical CPUs, before TF starts
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import numpy as np
    import tf_keras as keras
    from tfgalflow.deconvolution import NoiseModel
    from tfgalflow.flows import FlowConfig
    from tfgalflow.model import Flow

    rng = np.random.default_rng(0)
    x = rng.multivariate_normal([1.0, 2.0], [[1.0, 0.8], [0.8, 1.0]], 1025)
    x = x[np.argsort(x[:, 0])].astype(np.float32)    # sorted: the two replicas' pieces differ
    w = np.where(np.arange(1024) < 512, 1.0, 4.0).astype(np.float32)   # unequal weight sums
    no_labels = np.zeros((1024, 0), np.float32)
    packed = np.concatenate([x, np.zeros_like(x)], axis=1)   # errors 0: p̂ = f exactly
    labels = rng.normal(size=(1025, 2)).astype(np.float32)
    cases = {   # data, draws per pass of the deconvolution gradient (None: no noise model), lasso
        "uneven_batch": (tf.data.Dataset.from_tensors(x), None, 0),                  # 513 + 512
        "short_last_batch": (tf.data.Dataset.from_tensor_slices(x).batch(1024), None, 0),  # 1 + 0
        "weighted": (tf.data.Dataset.from_tensors((x[:1024], no_labels, w)), None, 0),
        "noise_model": (tf.data.Dataset.from_tensors(packed), 0, 0),
        "noise_model_in_passes": (tf.data.Dataset.from_tensors(packed), 1, 0),
        "label_lasso": (tf.data.Dataset.from_tensors((x, labels)), None, 0.5),
    }


    def sgd_change(strategy, data, per_pass, lasso):
        with strategy.scope():
            flow = Flow(FlowConfig(dim=2, label_dim=2 if lasso else 0, layers=2,
                                   hidden=(16, 16), seed=5))
            flow.adapt(x, labels if lasso else None)
            flow.set_label_lasso(lasso)
            if per_pass is not None:
                flow.set_noise_model(NoiseModel("absolute", samples=2, seed=3, dim=2,
                                                per_pass=per_pass))
            flow.compile(keras.optimizers.SGD(0.1))
        before = [v.numpy() for v in flow.trainable_variables]
        flow.fit(data, epochs=1, verbose=0)
        return [v.numpy() - b for v, b in zip(flow.trainable_variables, before)]


    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    out = {"replicas": mirrored.num_replicas_in_sync}
    for name, (data, per_pass, lasso) in cases.items():
        got = sgd_change(mirrored, data, per_pass, lasso)
        want = sgd_change(tf.distribute.get_strategy(), data, per_pass, lasso)
        scale = max(float(np.max(np.abs(s))) for s in want if s.size)
        out[name] = max(float(np.max(np.abs(g - s))) for g, s in zip(got, want) if s.size) / scale
    print(json.dumps(out))
""")


@pytest.mark.slow   # trains or spawns processes: make test-slow (default suite < 10 min)
def test_an_sgd_step_under_two_replicas_equals_one_replica_for_any_split():
    """One SGD step (lr 0.1) under MirroredStrategy over 2 logical CPUs equals the step of a
    single replica on the same rows, for splits where a per-replica mean / R is wrong:
    a batch of 1025 rows sorted by x0 (513 + 512 rows with different gradients), an epoch of
    1025 rows in batches of 1024 (the last batch splits 1 + 0), equal halves with unequal weight
    sums (1 vs 4 per row), and the deconvolution loss (noise model, errors 0 so p̂ = f exactly),
    its gradient in one pass and in passes of one draw (a while loop inside each replica), and
    the label lasso on a conditional flow (each replica adds 1/R of the penalty's gradient; a
    whole one per replica would double it: off by 1.1e-2 of the largest update, measured).

    Truth: the single-replica step, the gradient of the global mean. The two differ only by the
    order of float32 sums over ~10^3 rows (measured <= 2.3e-6 of the largest update); 2e-5 fails
    for the per-replica mean / R, off by 3.4e-3 (uneven batch, noise model), 0.50 (the 1 + 0
    batch gets half a step) and 1.14 (weighted) of the largest update (measured by reverting
    Flow._loss to it).
    """
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", UNEVEN_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.pop("replicas") == 2
    assert set(out) == {"uneven_batch", "short_last_batch", "weighted", "noise_model",
                        "noise_model_in_passes", "label_lasso"}
    for case, relative_difference in out.items():
        assert relative_difference < 2e-5, case


def test_free_ports_are_distinct_and_bindable():
    ports = distributed.free_ports(3)
    assert len(set(ports)) == 3
    for port in ports:          # each can be bound right away (what a worker does with it)
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
