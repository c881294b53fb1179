"""Batch inference streamed to HDF5 (tfgalflow.batch): equal to the in-memory answer, resumable
after an interruption without recomputing finished chunks, and flat in memory.

Truths: the in-memory evaluation of the same model (row-wise float32 computations: a chunked call
can differ from a whole call only by the order of float32 sums inside a matmul, so 1e-5 relative
is ample and a wrong row, sign or chunk offset fails it by orders of magnitude); an uninterrupted
run of the same job (bit-identical: the same chunks through the same graph).
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from tfgalflow import batch
from tfgalflow.catalogue import Catalogue, open_hdf5
from tfgalflow.errors import InputError
from tfgalflow.flows import FlowConfig
from tfgalflow.model import Ensemble, Flow

UNITS = {"length": "kpc", "velocity": "km/s"}


def flow(label_dim=0, seed=0):
    rng = np.random.default_rng(seed)
    f = Flow(FlowConfig(dim=6, label_dim=label_dim, layers=2, hidden=(16, 16), seed=seed))
    x = rng.normal(size=(500, 6)) * [1, 1, 1, 100, 100, 100]
    f.adapt(x, rng.uniform(1, 2, size=(500, label_dim)) if label_dim else None)
    return f


def catalogue(n, seed=1, labels=False):
    rng = np.random.default_rng(seed)
    return Catalogue(rng.normal(size=(n, 3)), 100 * rng.normal(size=(n, 3)),
                     labels=rng.uniform(1.1, 1.9, size=(n, 1)) if labels else None,
                     label_names=("z",) if labels else (), units=UNITS)


class Interrupt(Exception):
    pass


def stop_after(k):
    """A callback that interrupts the job once k chunks are done in this call (a kill)."""
    seen = []

    def callback(done, total, rows):
        seen.append(done)
        if len(seen) > k:
            raise Interrupt
    return callback


def read(path, name):
    with h5py.File(path, "r") as f:
        return f[name][:]


@pytest.mark.parametrize("label_dim", [0, 1])
def test_log_prob_file_equals_the_in_memory_answer(tmp_path, label_dim):
    cat = catalogue(1003, labels=bool(label_dim))
    path = cat.save(tmp_path / "in.h5")
    model = flow(label_dim)
    out = batch.log_prob_file(model, path, tmp_path / "lp.h5", chunk=128)   # 8 chunks, short last
    want = np.asarray(model.log_prob(cat.phase_space, cat.labels if label_dim else None))
    got = read(out, "log_prob")
    assert got.shape == (1003,)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not batch.partial_path(out).exists()
    # a plain .npy input (memory-mapped) gives the same numbers
    np.save(tmp_path / "x.npy", cat.phase_space)
    if label_dim:
        np.save(tmp_path / "c.npy", cat.labels[:, 0])                     # [N] read as [N, 1]
    out2 = batch.log_prob_file(model, tmp_path / "x.npy", tmp_path / "lp2.h5", chunk=300,
                               labels=tmp_path / "c.npy" if label_dim else None)
    np.testing.assert_allclose(read(out2, "log_prob"), want, rtol=1e-5, atol=1e-5)


def test_interrupted_log_prob_resumes_without_recomputing(tmp_path):
    path = catalogue(1000).save(tmp_path / "in.h5")
    model = flow()
    whole = read(batch.log_prob_file(model, path, tmp_path / "whole.h5", chunk=100), "log_prob")
    out = tmp_path / "lp.h5"
    with pytest.raises(Interrupt):
        batch.log_prob_file(model, path, out, chunk=100, callback=stop_after(3))
    assert not out.exists()                              # never half-written under its name
    assert batch.read_done(out).tolist() == [True] * 3 + [False] * 7
    calls = []
    original = model.log_prob
    model.log_prob = lambda x, c=None: calls.append(len(x)) or original(x, c)
    batch.log_prob_file(model, path, out, chunk=100)
    assert calls == [100] * 7                            # only the 7 unfinished chunks
    assert np.array_equal(read(out, "log_prob"), whole)
    # a partial file of another job (other chunk size) is started over, not mixed in
    with pytest.raises(Interrupt):
        batch.log_prob_file(model, path, tmp_path / "b.h5", chunk=100, callback=stop_after(2))
    calls.clear()
    batch.log_prob_file(model, path, tmp_path / "b.h5", chunk=250)
    assert calls == [250] * 4
    np.testing.assert_allclose(read(tmp_path / "b.h5", "log_prob"), whole, rtol=1e-5, atol=1e-5)


def test_sample_file_is_the_chunked_draws_and_resumes(tmp_path):
    model = flow(label_dim=1)
    c = np.array([1.5])
    out = batch.sample_file(model, 250, tmp_path / "s.h5", labels=c, seed=3, chunk=100,
                            units=UNITS, label_names=("z",))
    want = np.concatenate([np.asarray(model.sample(m, labels=c, seed=batch.chunk_seed(3, i)))
                           for i, m in enumerate([100, 100, 50])])
    cat = open_hdf5(out).read()                          # a tfgalflow catalogue with labels
    np.testing.assert_allclose(cat.phase_space, want, rtol=1e-6, atol=0)   # float32 -> float64
    assert cat.units == UNITS and cat.label_names == ("z",)
    assert np.array_equal(cat.labels, np.full((250, 1), 1.5))
    # one chunk of N rows is model.sample(N, seed) itself
    one = batch.sample_file(model, 80, tmp_path / "one.h5", labels=c, seed=3, chunk=100)
    np.testing.assert_array_equal(read(one, "pos"),
                                  np.asarray(model.sample(80, labels=c, seed=3))[:, :3])
    # killed after one chunk, with a seed drawn by the job: the resumed file equals a whole run
    with pytest.raises(Interrupt):
        batch.sample_file(model, 250, tmp_path / "r.h5", labels=c, chunk=100,
                          callback=stop_after(1))
    batch.sample_file(model, 250, tmp_path / "r.h5", labels=c, chunk=100)
    seed = open_hdf5(tmp_path / "r.h5").meta["seed"]
    again = batch.sample_file(model, 250, tmp_path / "again.h5", labels=c, seed=seed, chunk=100)
    assert np.array_equal(read(tmp_path / "r.h5", "vel"), read(again, "vel"))


def test_sample_file_draws_from_the_model(tmp_path):
    """The streamed draws follow the model: mean log p of draws = -entropy estimate from the
    same model's draws in memory (both are Monte Carlo estimates of E_p[log p] with 4000 draws;
    their difference has standard error sqrt(2 Var/4000) ~ 0.05 nats for this 6-D flow, so a 0.25
    tolerance is 5 sigma, while draws from the wrong chunk seeds' labels or a swapped pos/vel
    shift it by many nats).
    """
    model = flow()
    out = batch.sample_file(model, 4000, tmp_path / "s.h5", seed=1, chunk=1000)
    x = np.concatenate([read(out, "pos"), read(out, "vel")], axis=1)
    streamed = float(np.mean(model.log_prob(x)))
    direct = float(np.mean(model.log_prob(model.sample(4000, seed=99))))
    assert abs(streamed - direct) < 0.25


def test_sample_file_with_a_label_table_draws_n_per_row(tmp_path):
    """A table of G label rows gives n draws per row, in row order, across chunk boundaries:
    chunk i = model.sample(rows, labels=the rows' labels, seed=chunk_seed(seed, i)) exactly, and
    ``label_row`` names each draw's table row."""
    model = flow(label_dim=1)
    table = np.array([[1.1], [1.5], [1.9]])
    out = batch.sample_file(model, 70, tmp_path / "t.h5", labels=table, seed=2, chunk=50)
    rows = np.repeat(table, 70, axis=0)                    # 210 rows, chunks 50/50/50/50/10
    want = np.concatenate([np.asarray(model.sample(b - a, labels=rows[a:b],
                                                   seed=batch.chunk_seed(2, i)))
                           for i, (a, b) in enumerate(zip(range(0, 210, 50),
                                                          [50, 100, 150, 200, 210]))])
    cat = open_hdf5(out).read()
    np.testing.assert_allclose(cat.phase_space, want, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(cat.labels, rows)
    np.testing.assert_array_equal(read(out, "label_row"), np.repeat(np.arange(3), 70))
    with pytest.raises(InputError, match=r"\[G, 1\]"):
        batch.sample_file(model, 5, tmp_path / "bad.h5", labels=np.ones((3, 2)))


def test_cli_sample_labels_file_picks_the_label_columns_by_name(tmp_path, capsys):
    from tfgalflow.cli import main
    from tfgalflow.training import TrainConfig, train
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 2)).astype(np.float32)
    c = rng.uniform(0, 1, size=(600, 1)).astype(np.float32)
    train(x + 3 * c, TrainConfig(layers=1, hidden=(8,), epochs=1, batch_size=200,
                                 validation_split=0.0, checkpoint_every=0),
          tmp_path / "run", labels=c, label_names=["mass"], verbose=0)
    table = tmp_path / "galaxies.csv"
    table.write_text("id,file,mass\n0,a.npy,0.2\n1,b.npy,0.8\n")
    out = tmp_path / "stars.h5"
    assert main(["sample", str(tmp_path / "run"), "--labels-file", str(table), "--n", "1e3",
                 "--seed", "1", "--out", str(out)]) == 0
    labels, which = read(out, "labels"), read(out, "label_row")
    assert labels.shape == (2000, 1) and np.array_equal(which, np.repeat([0, 1], 1000))
    np.testing.assert_array_equal(labels[:, 0], np.repeat([0.2, 0.8], 1000).astype(np.float64))
    assert "wrote 2000 samples" in capsys.readouterr().out
    table.write_text("id,size\n0,1.0\n")
    assert main(["sample", str(tmp_path / "run"), "--labels-file", str(table), "--n", "10",
                 "--out", str(out)]) == 2
    assert "missing: ['mass']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["sample", str(tmp_path / "run"), "--labels", "0.5", "--n", "1.5",
              "--out", str(out)])
    assert exit_.value.code == 2


def test_accel_file_resumes_to_the_uninterrupted_answer(tmp_path):
    from tfgalflow import cbe
    members = Ensemble([flow(seed=0), flow(seed=1)])
    rng = np.random.default_rng(2)
    pos = rng.normal(size=(10, 3))
    np.save(tmp_path / "pos.npy", pos)
    kw = dict(chunk=4, seed=5, n_velocities=16)
    whole = batch.accel_file(members, tmp_path / "pos.npy", tmp_path / "whole.h5", **kw)
    with pytest.raises(Interrupt):
        batch.accel_file(members, tmp_path / "pos.npy", tmp_path / "a.h5",
                         callback=stop_after(1), **kw)
    out = batch.accel_file(members, tmp_path / "pos.npy", tmp_path / "a.h5", **kw)
    for name in ("acceleration", "spread", "residual", "flagged", "reasons"):
        assert np.array_equal(read(out, name), read(whole, name), equal_nan=name != "reasons")
    # chunk i is cbe.accelerations(positions of chunk i, seed=chunk_seed(seed, i))
    res = cbe.accelerations(members, pos[4:8], n_velocities=16, seed=batch.chunk_seed(5, 1))
    np.testing.assert_allclose(read(out, "acceleration")[4:8], res.acceleration, rtol=1e-12)
    # positions are stored as the solver saw them: float32-rounded (cbe.check_positions)
    np.testing.assert_allclose(read(out, "positions"), pos, rtol=2**-23)
    np.testing.assert_allclose(read(out, "a_radial"), cbe.radial_component(
        read(out, "positions"), read(out, "acceleration")), rtol=1e-12)


def test_bad_inputs_are_refused(tmp_path):
    path = catalogue(10).save(tmp_path / "in.h5")
    with pytest.raises(InputError, match="extension"):
        batch.log_prob_file(flow(), path, tmp_path / "lp.npy")
    with pytest.raises(InputError, match="conditional"):
        batch.log_prob_file(flow(label_dim=1), path, tmp_path / "lp.h5")
    np.save(tmp_path / "x3.npy", np.zeros((5, 3)))
    with pytest.raises(InputError, match="expects"):
        batch.log_prob_file(flow(), tmp_path / "x3.npy", tmp_path / "lp.h5")


MEMORY_SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    from tfgalflow import batch
    from tfgalflow.flows import FlowConfig
    from tfgalflow.model import Flow

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024          # MiB
    path, out, chunk = sys.argv[1], sys.argv[2], int(sys.argv[3])
    f = Flow(FlowConfig(dim=6, layers=2, hidden=(16, 16), seed=0))
    f.adapt(np.random.default_rng(0).normal(size=(500, 6)))
    f.log_prob(np.zeros((chunk, 6)))                       # warm up: one chunk in memory
    before = hwm()
    batch.log_prob_file(f, path, out, chunk=chunk)
    print(before, hwm())
""")


def peak_rss(tmp_path, rows, chunk):
    """(VmHWM after warm-up, VmHWM after streaming log p over ``rows`` rows) in MiB."""
    path = tmp_path / f"big{rows}.h5"
    with h5py.File(path, "w") as f:                        # written in pieces, tfgalflow layout
        f.attrs["units"] = '{"length": "kpc", "velocity": "km/s"}'
        pos = f.create_dataset("pos", (rows, 3), "f8", chunks=(chunk, 3))
        vel = f.create_dataset("vel", (rows, 3), "f8", chunks=(chunk, 3))
        rng = np.random.default_rng(0)
        for a in range(0, rows, chunk):
            pos[a:a + chunk] = rng.normal(size=(min(chunk, rows - a), 3))
            vel[a:a + chunk] = rng.normal(size=(min(chunk, rows - a), 3))
    done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(path),
                           str(tmp_path / f"lp{rows}.h5"), str(chunk)], capture_output=True,
                          text=True, timeout=300, check=True)
    before, after = map(float, done.stdout.split()[-2:])
    return before, after


@pytest.mark.slow
def test_streaming_memory_is_flat_in_the_file_size(tmp_path):
    """Peak RSS while streaming log p over 20 chunks barely exceeds that of one chunk, and does
    not grow from 5 to 20 chunks. One chunk of 50 000 rows: input 2.4 MB float64, activations
    ~3 MB per layer; reading the 20-chunk file whole would add >= 48 MB (pos + vel float64) and
    its activations ~60 MB per layer, so a 24 MiB bound fails by a wide margin if anything is
    held whole, and leaves room for allocator noise.
    """
    chunk = 50_000
    b5, a5 = peak_rss(tmp_path, 5 * chunk, chunk)
    b20, a20 = peak_rss(tmp_path, 20 * chunk, chunk)
    print(f"VmHWM MiB: 5 chunks {b5:.0f} -> {a5:.0f}; 20 chunks {b20:.0f} -> {a20:.0f}")
    assert a20 - b20 < 24
    assert a20 - b20 < (a5 - b5) + 12


# ---- command line -------------------------------------------------------------------------------

SHIPPED = Path(__file__).resolve().parents[1] / "saved_models" / "hernquist_iso" / "1"


def test_cli_streams_logprob_and_sample_to_hdf5(tmp_path, capsys):
    from tfgalflow.cli import main
    from tfgalflow.export import load
    model = load(SHIPPED)
    s = tmp_path / "s.h5"
    assert main(["sample", str(SHIPPED), "--n", "500", "--seed", "3", "--chunk", "200",
                 "--out", str(s)]) == 0
    cat = open_hdf5(s).read()
    assert len(cat) == 500 and cat.meta["seed"] == 3
    np.testing.assert_allclose(cat.phase_space[:200], np.asarray(model.sample(200, seed=3)),
                               rtol=1e-6)                 # chunk 0 = sample(200, seed=3)
    lp = tmp_path / "lp.h5"
    assert main(["logprob", str(SHIPPED), str(s), "--chunk", "128", "--out", str(lp)]) == 0
    np.testing.assert_allclose(read(lp, "log_prob"), np.asarray(model.log_prob(cat.phase_space)),
                               rtol=1e-5, atol=1e-5)
    err = capsys.readouterr().err
    assert "4/4 chunks" in err and "rows/s" in err           # the progress bar
    assert main(["accel", str(SHIPPED), "--radii", "1", "--out", str(tmp_path / "a.h5")]) == 2
    assert "run directory" in capsys.readouterr().err


@pytest.mark.slow          # two spawned processes each load TensorFlow and the model (~1-2 min)
def test_accel_workers_give_the_one_process_answer_and_resume(tmp_path):
    """accel_file(workers=2): chunks solved in two spawned processes, each loading the shipped
    SavedModel itself, equal the in-process answer (every chunk has its own seed, whichever
    process solves it); a job interrupted after one chunk resumes without solving it again.
    """
    rng = np.random.default_rng(3)
    pos = rng.normal(size=(9, 3)) * 5.0
    np.save(tmp_path / "pos.npy", pos)
    kw = dict(chunk=3, seed=4, n_velocities=16)
    whole = batch.accel_file(SHIPPED, tmp_path / "pos.npy", tmp_path / "whole.h5", **kw)
    with pytest.raises(Interrupt):
        batch.accel_file(SHIPPED, tmp_path / "pos.npy", tmp_path / "a.h5", workers=2,
                         callback=stop_after(1), **kw)
    kept = batch.read_done(tmp_path / "a.h5")
    assert kept.sum() >= 1                                  # chunks written before the kill
    calls = []
    out = batch.accel_file(SHIPPED, tmp_path / "pos.npy", tmp_path / "a.h5", workers=2,
                           callback=lambda done, total, rows: calls.append(done), **kw)
    assert calls[0] == kept.sum() and len(calls) == 1 + 3 - kept.sum()   # no chunk redone
    for name in ("positions", "acceleration", "residual", "condition", "ess", "log_density",
                 "flagged", "reasons"):
        # the same float64 numbers: a chunk's result does not depend on the process solving it
        assert np.array_equal(read(out, name), read(whole, name), equal_nan=name != "reasons"), \
            name
    with pytest.raises(InputError, match="path of its run directory"):
        batch.accel_file(flow(), tmp_path / "pos.npy", tmp_path / "b.h5", workers=2)


def test_accel_file_rotations_average_the_model(tmp_path):
    """rotations=M solves with SphericalAverage(model, M, seed=seed), chunk by chunk."""
    from tfgalflow import cbe
    from tfgalflow.symmetry import SphericalAverage
    model = flow()
    pos = np.random.default_rng(5).normal(size=(6, 3))
    out = batch.accel_file(model, pos, tmp_path / "r.h5", chunk=3, seed=2, rotations=2,
                           n_velocities=16)
    averaged = SphericalAverage(model, 2, seed=2)
    for i in range(2):
        res = cbe.accelerations(averaged, pos[3 * i:3 * i + 3], n_velocities=16,
                                seed=batch.chunk_seed(2, i))
        # the same computation on the same chunk: equal to float64 round-off of the file copy
        np.testing.assert_allclose(read(out, "acceleration")[3 * i:3 * i + 3], res.acceleration,
                                   rtol=1e-12)
    plain = batch.accel_file(model, pos, tmp_path / "p.h5", chunk=3, seed=2, n_velocities=16)
    assert np.abs(read(out, "acceleration") - read(plain, "acceleration")).max() > 1e-6
