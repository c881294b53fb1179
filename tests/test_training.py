"""Training runs: reproducibility, checkpoints, crash + resume, early stopping, reload, ensembles,
tf.distribute, parallel members, HDF5 streaming, configuration files and the train/sample/logprob
CLI.

All flows are tiny (2 MAF layers of 16x16) on a few thousand points of a correlated 2D Gaussian
(or a 6D one for the catalogue/CLI paths), so each fit takes about a second.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tfgalflow.errors import FileError, InputError
from tfgalflow.training import (
    RUN_FORMAT_VERSION,
    TrainConfig,
    load_run,
    read_history,
    read_run_config,
    resume,
    split_indices,
    train,
)

keras = pytest.importorskip("tf_keras")

MEAN = np.array([1.0, 2.0])
COV = np.array([[1.0, 0.8], [0.8, 1.0]])
# Tiny but real: 2 layers, 16x16 MADEs, 8 steps per epoch; checkpoints every 2 epochs. These tests
# are about runs, not XLA, so they skip its compilation (jit_compile=False; test_multistep trains
# with XLA); the default steps_per_call = 16 runs each epoch's 7 full batches in one call, then the
# partial one.
SMALL = TrainConfig(
    layers=2,
    hidden=(16, 16),
    epochs=6,
    batch_size=256,
    lr=1e-2,
    checkpoint_every=2,
    seed=3,
    patience=0,
    jit_compile=False,
)


@pytest.fixture(scope="module")
def gauss() -> np.ndarray:
    """2000 points of N(MEAN, COV), fixed seed."""
    return np.random.default_rng(0).multivariate_normal(MEAN, COV, 2000)


@pytest.fixture(scope="module")
def reference(gauss, tmp_path_factory):
    """One uninterrupted SMALL run, shared by the reproducibility, checkpoint, resume and reload
    tests."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    flow = train(gauss, SMALL, run_dir, verbose=0)
    return flow, run_dir


class CrashAfter(keras.callbacks.Callback):
    """Simulates a crash: raises at the end of the given 0-based epoch (after the run's own
    callbacks)."""

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError(f"simulated crash after epoch {epoch}")


def raw_history_epochs(run_dir: Path, member: int = 0) -> list[int]:
    """The epoch column of history.csv exactly as written (no de-duplication, unlike
    read_history)."""
    lines = (Path(run_dir) / f"member_{member:03d}" / "history.csv").read_text().splitlines()
    assert lines[0].split(",") == ["epoch", "loss", "val_loss"]
    return [int(line.split(",")[0]) for line in lines[1:]]


def checkpoint_numbers(directory: Path) -> set[int]:
    """Checkpoint numbers E of the ckpt-E.index files in ``directory``; each must have its data
    file."""
    numbers = {int(p.name[len("ckpt-"):-len(".index")]) for p in directory.glob("ckpt-*.index")}
    for e in numbers:
        assert (directory / f"ckpt-{e}.data-00000-of-00001").is_file()
    return numbers


# ---- reproducibility -------------------------------------------------------------------------

def test_same_seed_identical_history_and_other_seed_differs(gauss, reference, tmp_path):
    _, ref_dir = reference
    ref = read_history(ref_dir)
    again = read_history(_train_quiet(gauss, SMALL, tmp_path / "again"))
    # Same seed: initial weights, split and every epoch's order are stateless functions of the seed
    # and the CPU kernels see identical shapes, so the histories agree bit for bit (float32 values
    # via repr in CSV).
    assert set(again) == {"epoch", "loss", "val_loss"}
    for key in ref:
        np.testing.assert_array_equal(again[key], ref[key])
    other = read_history(_train_quiet(gauss, SMALL.with_overrides(seed=4), tmp_path / "other"))
    # Another seed changes initialisation, split and order: the losses differ by O(1e-2) nats, far
    # above float32 round-off (~1e-7), in every epoch.
    assert np.all(np.abs(other["loss"] - ref["loss"]) > 1e-5)
    assert np.all(np.isfinite(ref["loss"])) and ref["loss"][-1] < ref["loss"][0]


def test_clip_norm_bounds_every_gradient_step(gauss, tmp_path):
    # With SGD-like clipping the update of one step is at most lr x clip_norm in global norm; Adam
    # normalises steps anyway, so the check is on what Keras applies: the clipped gradient. A run
    # records the setting, and its optimizer clips to it.
    model = train(gauss, SMALL.with_overrides(clip_norm=0.5, epochs=1), tmp_path / "clip",
                  verbose=0)
    assert model.optimizer.global_clipnorm == 0.5
    grads = [tf.constant(np.full((3,), 10.0, np.float32))]
    clipped = model.optimizer._clip_gradients(grads)
    assert float(tf.linalg.global_norm(clipped)) == pytest.approx(0.5, rel=1e-6)
    unclipped = SMALL.with_overrides(clip_norm="none")
    assert TrainConfig.from_dict(unclipped.to_dict()).clip_norm is None


def test_weight_decay_is_decoupled_from_the_adam_step(gauss, tmp_path):
    # AdamW (Loshchilov & Hutter 2019): one step from the same initial weights w0 (a function of
    # the seed) differs from the plain Adam step by exactly -η λ w0 in every weight, whatever the
    # gradient. Here η λ = 1e-2 x 5 = 0.05, so the difference is ~0.02 against float32 round-off
    # of ~1e-7 on weights of order 1 (atol 1e-6). An L2 penalty in the loss instead would change
    # Adam's normalised first step (|Δ| = η for every weight), not add -η λ w0.
    from tfgalflow.model import Flow
    one_step = SMALL.with_overrides(epochs=1, batch_size=2048, lr_schedule="constant",
                                    validation_split=0)
    plain = train(gauss, one_step, tmp_path / "plain", verbose=0)
    decayed = train(gauss, one_step.with_overrides(weight_decay=5.0), tmp_path / "decayed",
                    verbose=0)
    initial = Flow(plain.config)
    initial.log_prob(tf.constant(gauss[:4], tf.float32))          # builds w0
    eta_lambda = 1e-2 * 5.0
    for w, w_decayed, w0 in zip(plain.trainable_variables, decayed.trainable_variables,
                                initial.trainable_variables):
        np.testing.assert_allclose(w_decayed.numpy() - w.numpy(), -eta_lambda * w0.numpy(),
                                   atol=1e-6)
    assert read_run_config(tmp_path / "decayed")["train"]["weight_decay"] == 5.0
    with pytest.raises(InputError, match="weight_decay"):
        TrainConfig(weight_decay=-1.0)


def _train_quiet(data, config, run_dir, **kw) -> Path:
    train(data, config, run_dir, verbose=0, **kw)
    return Path(run_dir)


# ---- checkpoints -------------------------------------------------------------------------------

def test_checkpoints_exist_exactly_at_requested_epochs(reference):
    _, run_dir = reference
    ckpt = run_dir / "member_000" / "checkpoints"
    h = read_history(run_dir)
    assert list(h["epoch"]) == list(range(1, SMALL.epochs + 1))      # counted from 1, like ckpt-E
    k = SMALL.checkpoint_every
    assert checkpoint_numbers(ckpt) == set(range(k, SMALL.epochs + 1, k))  # {2, 4, 6}
    assert {p.name for p in ckpt.iterdir()} == (
        {f"ckpt-{e}.index" for e in (2, 4, 6)}
        | {f"ckpt-{e}.data-00000-of-00001" for e in (2, 4, 6)}
        | {"checkpoint", "best"}
    )
    # best/ keeps one checkpoint: after the epoch with the lowest validation loss, named by that
    # epoch's number in history.csv (E epochs done).
    assert checkpoint_numbers(ckpt / "best") == {int(h["epoch"][np.argmin(h["val_loss"])])}
    summary = json.loads((run_dir / "member_000" / "final" / "summary.json").read_text())
    assert summary["best_epoch"] == int(np.argmin(h["val_loss"]))
    assert summary["best"] == pytest.approx(h["val_loss"].min(), rel=1e-12)


# ---- crash + resume ---------------------------------------------------------------------------

def test_crash_then_resume_reproduces_uninterrupted_history(gauss, reference, tmp_path):
    ref_flow, ref_dir = reference
    ref = read_history(ref_dir)
    k = SMALL.checkpoint_every
    # Crash after an epoch c that is neither a periodic checkpoint nor a new best, when the
    # reference has one: the run must then go back to an earlier checkpoint and drop history rows
    # written after it.
    candidates = [c for c in range(1, SMALL.epochs - 1)
                  if (c + 1) % k and ref["val_loss"][c] >= ref["val_loss"][:c].min()]
    crash = candidates[0] if candidates else 2
    run_dir = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(gauss, SMALL, run_dir, verbose=0, callbacks=[CrashAfter(crash)])
    assert raw_history_epochs(run_dir) == list(range(1, crash + 2))      # Keras' epoch index + 1
    # nothing final from a crashed run
    assert not (run_dir / "member_000" / "final").exists()
    with pytest.raises(FileError, match="did not finish"):
        load_run(run_dir)
    ckpt = run_dir / "member_000" / "checkpoints"
    latest = max(checkpoint_numbers(ckpt) | checkpoint_numbers(ckpt / "best"))
    if candidates:
        # rows latest..crash must be dropped and those epochs redone
        assert latest < crash + 1

    flow = resume(run_dir, data=gauss, verbose=0)
    got = read_history(run_dir)
    # each epoch once, in order
    assert raw_history_epochs(run_dir) == list(range(1, SMALL.epochs + 1))
    # The checkpoint restores weights, Adam moments and step count bit for bit and epoch e's order
    # depends only on (seed, e), so the resumed epochs run the same float32 operations on the same
    # inputs; the 1e-6 relative tolerance (~8 ulp) only allows for summation order in multithreaded
    # CPU kernels and is ~1e4 times smaller than the epoch-to-epoch change of the loss (>= 1e-3
    # relative here).
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-6, atol=0)
    x = gauss[:200]
    np.testing.assert_allclose(
        flow.log_prob(x).numpy(), ref_flow.log_prob(x).numpy(), rtol=1e-6, atol=1e-6
    )


def test_history_without_validation_survives_a_resume(gauss, tmp_path):
    # validation_split = 0: Keras' CSVLogger still writes a val_loss column, filled with "NA".
    # read_history gives those as NaN (not torn rows), and a resume keeps the epochs done before
    # the crash instead of discarding the whole file.
    config = SMALL.with_overrides(validation_split=0.0)
    run_dir = tmp_path / "noval"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(gauss, config, run_dir, verbose=0, callbacks=[CrashAfter(2)])
    before = read_history(run_dir)
    assert list(before["epoch"]) == [1, 2, 3] and np.isnan(before["val_loss"]).all()
    resume(run_dir, data=gauss, verbose=0)
    after = read_history(run_dir)
    assert raw_history_epochs(run_dir) == list(range(1, config.epochs + 1))
    # epochs 1-2 (before the last checkpoint, at epoch 2) are kept as written, not retrained
    np.testing.assert_array_equal(after["loss"][:2], before["loss"][:2])
    assert np.isfinite(after["loss"]).all() and np.isnan(after["val_loss"]).all()


def test_resume_renumbers_a_history_written_from_epoch_0(gauss, reference, tmp_path):
    # Runs written before history.csv counted from 1 have rows 0..E-1: read_history gives them as
    # 1..E, and a resume rewrites the file 1-based before appending, so no epoch number repeats.
    _, ref_dir = reference
    ref = read_history(ref_dir)
    run_dir = tmp_path / "old"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(gauss, SMALL, run_dir, verbose=0, callbacks=[CrashAfter(2)])
    history = run_dir / "member_000" / "history.csv"
    lines = history.read_text().splitlines()
    old = [lines[0]] + [
        f"{int(line.split(',')[0]) - 1},{line.split(',', 1)[1]}" for line in lines[1:]
    ]
    history.write_text("\n".join(old) + "\n")                   # as the old CSVLogger wrote it
    assert raw_history_epochs(run_dir) == [0, 1, 2]
    assert list(read_history(run_dir)["epoch"]) == [1, 2, 3]
    resume(run_dir, data=gauss, verbose=0)
    assert raw_history_epochs(run_dir) == list(range(1, SMALL.epochs + 1))
    for key in ("loss", "val_loss"):    # same tolerance argument as in the crash test above
        np.testing.assert_allclose(read_history(run_dir)[key], ref[key], rtol=1e-6, atol=0)


def test_keep_checkpoints_keeps_the_last_k_and_resumes_exactly(gauss, reference, tmp_path):
    # A checkpoint every epoch, the last 2 kept: after a crash at the end of epoch 4 only ckpt-3
    # and ckpt-4 remain; the resumed process (a new CheckpointManager over the same directory)
    # continues from ckpt-4 and keeps deleting the oldest, so ckpt-5 and ckpt-6 remain at the end.
    # Which checkpoints are kept changes no update: the history equals the uninterrupted reference.
    _, ref_dir = reference
    ref = read_history(ref_dir)
    cfg = SMALL.with_overrides(checkpoint_every=1, keep_checkpoints=2)
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(gauss, cfg, run_dir, verbose=0, callbacks=[CrashAfter(3)])
    ckpt = run_dir / "member_000" / "checkpoints"
    assert checkpoint_numbers(ckpt) == {3, 4}
    resume(run_dir, data=gauss, verbose=0)
    assert checkpoint_numbers(ckpt) == {5, 6}
    h = read_history(run_dir)
    assert checkpoint_numbers(ckpt / "best") == {int(h["epoch"][np.argmin(h["val_loss"])])}
    for key in ("loss", "val_loss"):    # same tolerance argument as in the crash test above
        np.testing.assert_allclose(h[key], ref[key], rtol=1e-6, atol=0)


def test_resume_requires_matching_data(gauss, reference, tmp_path):
    _, ref_dir = reference
    run_dir = tmp_path / "copy"
    shutil.copytree(ref_dir, run_dir)
    with pytest.raises(InputError, match="in-memory data"):
        resume(run_dir, verbose=0)
    with pytest.raises(InputError, match="differ"):
        resume(run_dir, data=gauss + 1.0, verbose=0)


# ---- early stopping ----------------------------------------------------------------------------

# 120 points, half held out, a wide flow and a large constant step: the 60 training points are
# overfitted after a few epochs, so the validation loss turns up (measured: minimum at epoch 6,
# stop after epoch 9) and patience = 3 stops the run early. A checkpoint every epoch lets the
# resume test below restart in the middle of a patience window; all of them are kept
# (keep_checkpoints = 0).
OVERFIT = TrainConfig(
    layers=3,
    hidden=(64, 64),
    epochs=60,
    batch_size=30,
    lr=1e-2,
    lr_schedule="constant",
    validation_split=0.5,
    patience=3,
    checkpoint_every=1,
    keep_checkpoints=0,
    seed=7,
    jit_compile=False,
)


@pytest.fixture(scope="module")
def overfit(tmp_path_factory):
    x = np.random.default_rng(1).multivariate_normal(MEAN, COV, 120)
    run_dir = tmp_path_factory.mktemp("overfit") / "run"
    return x, train(x, OVERFIT, run_dir, verbose=0), run_dir


def test_early_stopping_restores_best_weights(overfit):
    x, flow, run_dir = overfit
    h = read_history(run_dir)
    best = int(np.argmin(h["val_loss"]))
    assert len(h["epoch"]) < OVERFIT.epochs                       # it stopped early ...
    # ... patience epochs after the best one
    assert len(h["epoch"]) == best + OVERFIT.patience + 1
    # the best is neither first nor last
    assert 0 < best and h["val_loss"][-1] > h["val_loss"][best]
    _, val = split_indices(len(x), OVERFIT.validation_split, OVERFIT.seed)
    restored = -float(np.mean(flow.log_prob(x[val]).numpy().astype(np.float64)))
    # Keras' val_loss is the batch-size-weighted mean of float32 batch sums; recomputing it in one
    # float64 mean changes only the summation order: ~1e-7 relative. The last epoch differs from
    # the best by > 1e-3.
    assert restored == pytest.approx(h["val_loss"][best], rel=1e-5)
    assert abs(restored - h["val_loss"][-1]) > 100 * 1e-5 * abs(restored)
    reloaded = load_run(run_dir)
    np.testing.assert_array_equal(reloaded.log_prob(x[val]).numpy(), flow.log_prob(x[val]).numpy())
    ckpt = run_dir / "member_000" / "checkpoints"            # keep_checkpoints = 0 keeps every one
    assert checkpoint_numbers(ckpt) == set(range(1, len(h["epoch"]) + 1))
    assert checkpoint_numbers(ckpt / "best") == {best + 1}


def test_resume_inside_patience_window_stops_at_the_same_epoch(overfit, tmp_path):
    # Crash one epoch after the best: the early-stopping counters (best loss, its epoch, epochs
    # waited) and the best weights must come back from the checkpoints, or the resumed run stops at
    # another epoch (wait reset) or takes a worse epoch for the best (best reset) and ends with
    # other weights.
    x, flow, ref_dir = overfit
    ref = read_history(ref_dir)
    crash = int(np.argmin(ref["val_loss"])) + 1
    run_dir = tmp_path / "run"
    # keeping only the last periodic checkpoint changes nothing but the files left behind
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(x, OVERFIT.with_overrides(keep_checkpoints=1), run_dir, verbose=0,
              callbacks=[CrashAfter(crash)])
    resumed = resume(run_dir, data=x, verbose=0)
    assert raw_history_epochs(run_dir) == list(range(1, len(ref["epoch"]) + 1))
    # the last periodic checkpoint, and the best one (epoch crash, 3 epochs before the last) as
    # well
    ckpt = run_dir / "member_000" / "checkpoints"
    assert checkpoint_numbers(ckpt) == {len(ref["epoch"])}
    assert checkpoint_numbers(ckpt / "best") == {crash} and crash < len(ref["epoch"])
    got = read_history(run_dir)
    for key in ("loss", "val_loss"):     # same argument as in the crash test above
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-6, atol=0)
    np.testing.assert_allclose(
        resumed.log_prob(x).numpy(), flow.log_prob(x).numpy(), rtol=1e-6, atol=1e-6
    )


# ---- progress output ----------------------------------------------------------------------------

@pytest.mark.parametrize("verbose", [1, 2])
def test_progress_bar_counts_optimizer_steps(verbose, gauss, tmp_path, capsys):
    # SMALL: 1800 training rows in batches of 256 = 7 full batches + one of 8 rows = 8 optimizer
    # steps per epoch, run in 2 calls (steps_per_call = 16 stacks the 7 full batches, then the
    # partial one). The bar counts the 8 steps: 7/8 after the first call (verbose 1), 8/8 at the
    # end of each epoch.
    train(
        gauss,
        SMALL.with_overrides(epochs=2, checkpoint_every=0),
        tmp_path / "run",
        verbose=verbose,
    )
    out = capsys.readouterr().out
    counts = re.findall(r"(?:^|\r)(\d+)/(\d+) ", out, re.M)
    finals = [c for c in counts if c[0] == c[1]]
    assert finals == [("8", "8")] * 2
    assert {c[1] for c in counts} == {"8"} and {c[0] for c in counts} <= {"7", "8"}


def test_resume_keeps_the_run_verbosity_unless_overridden(gauss, tmp_path, capsys):
    # config.json records verbose = 0: a resume without `verbose` prints nothing; verbose = 2
    # prints one line per epoch of what is left (epoch 3 of 3 after crashes after epochs 1 and 2).
    run_dir = tmp_path / "run"
    cfg = SMALL.with_overrides(epochs=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(gauss, cfg, run_dir, verbose=0, callbacks=[CrashAfter(0)])
    assert read_run_config(run_dir)["verbose"] == 0
    capsys.readouterr()
    with pytest.raises(RuntimeError, match="simulated crash"):
        resume(run_dir, data=gauss, callbacks=[CrashAfter(1)])
    assert capsys.readouterr().out == ""
    resume(run_dir, data=gauss, verbose=2)
    out = capsys.readouterr().out
    assert "Epoch 3/3" in out and "Epoch 2/3" not in out and re.search(r"^8/8 - ", out, re.M)
    assert raw_history_epochs(run_dir) == [1, 2, 3]


# ---- reload -------------------------------------------------------------------------------------

def test_load_run_round_trip_and_file_errors(gauss, reference, tmp_path):
    ref_flow, ref_dir = reference
    x = gauss[:500]
    loaded = load_run(ref_dir)
    assert loaded.config == ref_flow.config
    # Same float32 weights and the same traced graph: identical numbers.
    np.testing.assert_array_equal(loaded.log_prob(x).numpy(), ref_flow.log_prob(x).numpy())

    corrupt = tmp_path / "corrupt"
    shutil.copytree(ref_dir, corrupt)
    data_file = corrupt / "member_000" / "final" / "weights.data-00000-of-00001"
    data_file.write_bytes(np.random.default_rng(0).bytes(data_file.stat().st_size))
    with pytest.raises(FileError, match="weights"):
        load_run(corrupt)

    missing = tmp_path / "missing"
    shutil.copytree(ref_dir, missing)
    (missing / "member_000" / "final" / "weights.index").unlink()
    with pytest.raises(FileError, match="weights.index"):
        load_run(missing)

    old = tmp_path / "old_format"
    shutil.copytree(ref_dir, old)
    cfg = json.loads((old / "config.json").read_text())
    cfg["format_version"] = RUN_FORMAT_VERSION + 1
    (old / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileError, match=r"config\.json.*version"):
        load_run(old)

    broken = tmp_path / "broken"
    shutil.copytree(ref_dir, broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(FileError, match=r"config\.json"):
        load_run(broken)
    with pytest.raises(FileError, match="not empty"):
        # never trains over an existing run
        train(gauss, SMALL, ref_dir, verbose=0)


def test_corrupt_checkpoint_on_resume_is_a_file_error(gauss, reference, tmp_path):
    _, ref_dir = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    # unfinished: resume must read checkpoints
    shutil.rmtree(run_dir / "member_000" / "final")
    ckpt = run_dir / "member_000" / "checkpoints" / "ckpt-6.data-00000-of-00001"
    ckpt.write_bytes(b"\0" * ckpt.stat().st_size)
    with pytest.raises(FileError, match="ckpt-6"):
        resume(run_dir, data=gauss, verbose=0)


# ---- ensembles ----------------------------------------------------------------------------------

ENSEMBLE = SMALL.with_overrides(epochs=3, members=2, checkpoint_every=0)


@pytest.fixture(scope="module")
def ensemble_run(gauss, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ensemble") / "run"
    return train(gauss, ENSEMBLE, run_dir, verbose=0), run_dir


def test_ensemble_members_distinct_seeds_and_mixture_density(gauss, ensemble_run):
    ensemble, run_dir = ensemble_run
    run = read_run_config(run_dir)
    assert [m["seed"] for m in run["members"]] == [ENSEMBLE.seed, ENSEMBLE.seed + 1]
    assert [m.config.seed for m in ensemble.members] == [ENSEMBLE.seed, ENSEMBLE.seed + 1]
    h0, h1 = read_history(run_dir, 0), read_history(run_dir, 1)
    # different members, not copies
    assert np.all(np.abs(h0["loss"] - h1["loss"]) > 1e-5)
    x = gauss[:300]
    member_lp = np.stack([m.log_prob(x).numpy().astype(np.float64) for m in ensemble.members])
    # Mixture density p = (p_0 + p_1)/2, evaluated independently in float64 with plain exp/log.
    expected = np.log(np.mean(np.exp(member_lp), axis=0))
    # float32 logsumexp vs float64: |error| <~ 1e-6 nats for log p ~ -3.
    np.testing.assert_allclose(ensemble.log_prob(x).numpy(), expected, rtol=0, atol=1e-5)
    reloaded = load_run(run_dir)
    np.testing.assert_array_equal(reloaded.log_prob(x).numpy(), ensemble.log_prob(x).numpy())


def test_a_grown_run_equals_one_trained_whole(gauss, ensemble_run, tmp_path, capsys):
    # A one-member run grown to two: member 1 trains with seed + 1 on the same split and epoch
    # order as in the two-member ENSEMBLE run, so its history and the mixture density equal that
    # run's to float32 round-off (measured: identical); member 0 is not retrained.
    from tfgalflow.cli import main

    whole, whole_dir = ensemble_run
    run_dir = tmp_path / "run"
    train(gauss, ENSEMBLE.with_overrides(members=1), run_dir, verbose=0)
    first = read_history(run_dir, 0)["loss"]
    weights = run_dir / "member_000" / "final"
    stamp = {p.name: p.stat().st_mtime_ns for p in weights.iterdir()}
    grown = resume(run_dir, data=gauss, verbose=0, members=2)
    assert {p.name: p.stat().st_mtime_ns for p in weights.iterdir()} == stamp
    np.testing.assert_array_equal(read_history(run_dir, 0)["loss"], first)
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose(read_history(run_dir, 1)[key], read_history(whole_dir, 1)[key],
                                   rtol=1e-6)
    x = gauss[:300]
    np.testing.assert_allclose(grown.log_prob(x).numpy(), whole.log_prob(x).numpy(), atol=1e-5)
    run = read_run_config(run_dir)
    assert run["train"]["members"] == 2
    assert [m["seed"] for m in run["members"]] == [ENSEMBLE.seed, ENSEMBLE.seed + 1]
    assert [(g["from"], g["to"]) for g in run["grown"]] == [(1, 2)]
    assert run["grown"][0]["time"] >= run["created"]
    assert len(load_run(run_dir)) == 2
    with pytest.raises(InputError, match="already has 2 members; a run can grow, not shrink"):
        resume(run_dir, data=gauss, verbose=0, members=1)
    with pytest.raises(InputError, match="members"):
        resume(run_dir, data=gauss, verbose=0, members=0)
    # the command line: --members is the one flag --resume takes (growing by CLI: below)
    assert main(["train", "--resume", str(run_dir), "--epochs", "5"]) == 2
    assert "only --members may grow it" in capsys.readouterr().err


def test_a_member_far_above_the_others_is_reported_and_warned(gauss, tmp_path, caplog):
    import logging
    from tfgalflow.training import OUTLIER_MARGIN, outlying_members

    run_dir = tmp_path / "run"
    x = np.random.default_rng(1).multivariate_normal(MEAN, COV, 20_000)
    train(x, ENSEMBLE.with_overrides(members=3, epochs=4), run_dir, verbose=0)
    best = [json.loads((run_dir / f"member_{k:03d}/final/summary.json").read_text())["best"]
            for k in range(3)]
    # three seeds of the same small flow end near the Gaussian's entropy, 1 + ln 2π + ln det/2
    # = 2.327 nats, each measured on its own 2000 validation points: log p of a 2-D Gaussian has
    # a standard deviation of 1 nat, so each best carries ±0.022 of sampling noise, and the
    # members agree to a few hundredths (the spread the margin is set above); none is reported
    entropy = 1 + np.log(2 * np.pi) + 0.5 * np.log(np.linalg.det(COV))
    np.testing.assert_allclose(best, entropy, atol=0.1)
    assert max(best) - min(best) < OUTLIER_MARGIN
    assert outlying_members(run_dir) == []
    # a member that diverged: its best loss 2 nats above the others' (as photo-z seed 5 was)
    path = run_dir / "member_002/final/summary.json"
    summary = json.loads(path.read_text())
    path.write_text(json.dumps({**summary, "best": best[2] + 2.0}))
    median = float(np.median([best[0], best[1], best[2] + 2.0]))
    assert outlying_members(run_dir) == [{"member": "member_002", "best": best[2] + 2.0,
                                          "median": median, "excess": best[2] + 2.0 - median}]
    assert outlying_members(run_dir, margin=3.0) == []
    with caplog.at_level(logging.WARNING, logger="tfgalflow.training.fit"):
        resume(run_dir, data=x, verbose=0)           # finished: reloads the members, then checks
    assert any("member_002" in r.getMessage() and "median" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(InputError, match="margin"):
        outlying_members(run_dir, margin=0)


@pytest.mark.slow          # spawns member processes, each loading TensorFlow (~15 s)
def test_parallel_members_equal_sequential_members(gauss, ensemble_run, tmp_path):
    # Each member runs in its own spawned process with the same seeds, data, split and epoch
    # orders; the histories agree with the sequential run to float32 round-off (measured:
    # identical). The tolerance allows for the different TensorFlow thread count in the worker
    # processes.
    _, seq_dir = ensemble_run
    par = train(gauss, ENSEMBLE.with_overrides(parallel=True), tmp_path / "par", verbose=0)
    assert len(par) == 2
    for k in range(2):
        for key in ("loss", "val_loss"):
            np.testing.assert_allclose(
                read_history(tmp_path / "par", k)[key], read_history(seq_dir, k)[key], rtol=1e-5
            )


# ---- tf.distribute ------------------------------------------------------------------------------

MIRRORED_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import tensorflow as tf
    # two logical CPUs, before TF initialises
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import numpy as np
    import tf_keras as keras
    from tfgalflow.flows import FlowConfig
    from tfgalflow.model import Flow
    from tfgalflow.training import TrainConfig, read_history, train
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    x = np.random.default_rng(0).multivariate_normal([1.0, 2.0], [[1.0, 0.8], [0.8, 1.0]], 2000)
    cfg = TrainConfig(layers=2, hidden=(16, 16), epochs=4, batch_size=256, lr=1e-2, seed=1,
                      steps_per_call=4)
    flow = train(x, cfg, sys.argv[1], strategy=strategy, verbose=0)
    h = read_history(sys.argv[1])

    def sgd_update(strat, data):
        # one plain SGD step (lr 0.1) on 512 points; returns the weight change
        with strat.scope():
            f = Flow(FlowConfig(dim=2, layers=2, hidden=(16, 16), seed=5))
            f.adapt(x)
            f.compile(keras.optimizers.SGD(0.1))
        before = f.get_weights()
        f.fit(data, epochs=1, verbose=0)
        return [a - b for a, b in zip(f.get_weights(), before)], f

    batch = tf.data.Dataset.from_tensors(x[:512].astype(np.float32))
    mirrored, f = sgd_update(strategy, batch)
    single, _ = sgd_update(tf.distribute.get_strategy(), batch)
    diff = max(float(np.max(np.abs(m - s))) for m, s in zip(mirrored, single) if s.size)
    scale = max(float(np.max(np.abs(s))) for s in single if s.size)
    try:                                                 # a stack [K, B, D] under two replicas
        f.fit(tf.data.Dataset.from_tensors(x[:512].reshape(2, 256, 2).astype(np.float32)),
              epochs=1, verbose=0)
        stack_error = ""
    except Exception as exc:       # InputError, wrapped by autograph while Keras traces train_step
        stack_error = f"{type(exc).__name__}: {exc}"
    print(json.dumps({"replicas": strategy.num_replicas_in_sync, "loss": h["loss"].tolist(),
                      "val_loss": h["val_loss"].tolist(),
                      "lp": flow.log_prob(x[:5]).numpy().tolist(), "sgd_diff": diff,
                      "sgd_scale": scale, "stack_error": stack_error}))
""")


@pytest.mark.slow          # a subprocess with two logical CPUs trains twice (~15 s)
def test_mirrored_strategy_two_cpus(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT, str(tmp_path / "run")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2
    loss = np.array(out["loss"])
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(out["val_loss"]))
    assert np.all(np.diff(loss) < 0)                                 # decreasing every epoch
    # It learns the right density: the expected loss of the true density is its entropy,
    # 1 + log 2π + ½ log det COV = 2.327 nats; on 1800 training points the mean NLL scatters by
    # sqrt(D/2 / N) = 0.024, and a 4-epoch fit comes within a few hundredths (measured 2.343).
    entropy = 1.0 + np.log(2 * np.pi) + 0.5 * np.log(np.linalg.det(COV))
    assert abs(loss[-1] - entropy) < 0.1
    reloaded = load_run(tmp_path / "run")                            # reloads without the strategy
    x = np.random.default_rng(0).multivariate_normal(MEAN, COV, 2000)[:5]
    np.testing.assert_allclose(reloaded.log_prob(x).numpy(), out["lp"], rtol=1e-6, atol=1e-6)
    # steps_per_call = 4 cannot stack under two replicas: the run fell back to one step per call,
    # said so
    assert "steps_per_call = 4 needs a single replica" in proc.stderr
    # jit_compile (default True) falls back on CPU replicas
    assert "training without XLA" in proc.stderr
    assert (
        "single replica" in out["stack_error"] and "split the stack along K" in out["stack_error"]
    )
    # SGD on one batch of 512: each replica's mean loss over its 256 points is scaled by 1/2, so
    # the summed gradients equal the one-device gradient of the mean over 512 (summation order
    # only: ~1e-6 relative of the update); without the scaling the update would be twice as large
    # (difference = 100% of it).
    assert out["sgd_scale"] > 1e-3 and out["sgd_diff"] < 1e-4 * out["sgd_scale"]


# ---- HDF5 streaming -----------------------------------------------------------------------------

UNITS = {"length": "kpc", "velocity": "km/s"}


def gauss6(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n points of a correlated 6D Gaussian (means 0..5) and one uniform label column."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(6, 6)) * 0.3 + np.eye(6)
    return rng.normal(size=(n, 6)) @ a.T + np.arange(6.0), rng.uniform(size=(n, 1))


@pytest.fixture(scope="module")
def h5_file(tmp_path_factory):
    from tfgalflow.catalogue import Catalogue
    w, labels = gauss6(3000, seed=2)
    path = tmp_path_factory.mktemp("h5") / "mock.h5"
    Catalogue(w[:, :3], w[:, 3:], labels=labels, label_names=("q",), units=UNITS).save(path)
    return path, w, labels


H5 = TrainConfig(
    layers=2,
    hidden=(16, 16),
    epochs=4,
    batch_size=256,
    lr=1e-2,
    seed=1,
    checkpoint_every=1,
    patience=0,
    adapt_samples=1000,
    jit_compile=False,
)


def test_hdf5_streaming_split_rescaler_and_resume(h5_file, tmp_path):
    path, w, labels = h5_file
    # conditional on the file's label
    flow = train(path, H5, tmp_path / "run", verbose=0)
    assert flow.label_dim == 1
    h = read_history(tmp_path / "run")
    assert np.all(np.isfinite(h["loss"])) and np.all(np.diff(h["loss"]) < 0)
    data = read_run_config(tmp_path / "run")["data"]
    assert (data["source"], data["n"], data["dim"], data["label_dim"]) == ("hdf5", 3000, 6, 1)
    # rows [2700, 3000) validate
    n_train = 3000 - round(3000 * H5.validation_split)
    # Rescaler: mean of every 3rd training row (ceil(2700 / 1000) = 3) -- float32 rounding ~1e-7 of
    # |x| ~ 5.
    np.testing.assert_allclose(
        flow.x_shift.numpy(), w[0:n_train:3].mean(axis=0), rtol=0, atol=1e-5
    )
    np.testing.assert_allclose(
        flow.label_shift.numpy(), labels[0:n_train:3].mean(axis=0), rtol=0, atol=1e-6
    )
    # The validation loss is the NLL of exactly the held-out index range: recomputed in float64
    # from the final (best-epoch) weights it equals the minimum in the history up to summation
    # order (~1e-7).
    nll = -np.mean(flow.log_prob(w[n_train:], labels[n_train:]).numpy().astype(np.float64))
    assert nll == pytest.approx(h["val_loss"].min(), rel=1e-5)
    # Resume re-reads the file and regenerates epoch e's shuffle from (seed, e): identical history
    # (same tolerance argument as for in-memory data).
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(path, H5, tmp_path / "crashed", verbose=0, callbacks=[CrashAfter(1)])
    resume(tmp_path / "crashed", verbose=0)
    assert raw_history_epochs(tmp_path / "crashed") == list(range(1, H5.epochs + 1))
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose(
            read_history(tmp_path / "crashed")[key], h[key], rtol=1e-6, atol=0
        )


@pytest.mark.parametrize("file_labels", [False, True])
def test_hdf5_unconditional_from_files_with_and_without_labels(file_labels, h5_file, tmp_path):
    from tfgalflow.catalogue import Catalogue
    path, w, labels = h5_file
    if not file_labels:
        path = tmp_path / "plain.h5"
        Catalogue(w[:, :3], w[:, 3:], units=UNITS).save(path)
    flow = train(path, H5.with_overrides(epochs=1, label_dim=0), tmp_path / "run", verbose=0)
    assert flow.label_dim == 0
    n_train = 2700
    nll = -np.mean(flow.log_prob(w[n_train:]).numpy().astype(np.float64))
    # as above
    assert nll == pytest.approx(read_history(tmp_path / "run")["val_loss"][0], rel=1e-5)


def test_hdf5_bad_row_found_while_streaming_is_an_input_error(h5_file, tmp_path):
    import h5py
    path, _, _ = h5_file
    bad = tmp_path / "bad.h5"
    shutil.copy(path, bad)
    with h5py.File(bad, "r+") as f:
        # row 1 is not in the every-3rd-row rescaler sample: found mid-stream
        f["vel"][1, 2] = np.nan
    with pytest.raises(InputError, match=r"bad\.h5.*non-finite.*row 1"):
        train(bad, H5.with_overrides(label_dim=0), tmp_path / "run", verbose=0)
    with pytest.raises(FileError, match="no such data file"):
        train(tmp_path / "absent.h5", H5, tmp_path / "run2", verbose=0)


# ---- bad input and configuration ----------------------------------------------------------------

@pytest.mark.parametrize("case", [
    "empty", "nan", "inf", "label_rows", "labels_missing", "label_width", "one_row", "not_2d",
    "label_names",
])
def test_bad_input_is_an_input_error(case, gauss, tmp_path):
    x = gauss[:100].copy()
    kw: dict = {}
    cfg = SMALL
    if case == "empty":
        x = np.zeros((0, 2))
    elif case == "nan":
        x[17, 1] = np.nan
    elif case == "inf":
        x[3, 0] = np.inf
    elif case == "label_rows":
        kw["labels"] = np.zeros((99, 1))
    elif case == "labels_missing":
        cfg = SMALL.with_overrides(label_dim=2)
    elif case == "label_width":
        cfg, kw["labels"] = SMALL.with_overrides(label_dim=2), np.zeros((100, 3))
    elif case == "one_row":
        x = x[:1]
    elif case == "not_2d":
        x = x[:, 0]
    elif case == "label_names":
        kw["labels"], kw["label_names"] = np.zeros((100, 2)), ["mass"]
    expected = {"empty": "empty", "nan": r"NaN or inf.*\[17\]", "inf": r"NaN or inf.*\[3\]",
                "label_rows": "99 rows", "labels_missing": r"no labels.*\[N, 2\]",
                "label_width": r"3 column.*\[N, 2\]", "one_row": "N >= 2", "not_2d": r"\[N, D\]",
                "label_names": "label_names"}[case]
    with pytest.raises(InputError, match=expected):
        train(x, cfg, tmp_path / "run", verbose=0, **kw)
    # bad input never leaves a run directory behind
    assert not (tmp_path / "run").exists()


def test_train_config_files_overrides_and_errors(tmp_path, reference):
    cfg = TrainConfig(layers=3, hidden=(32, 16), lr=3e-4, lr_schedule="exponential", members=2)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    assert TrainConfig.from_file(tmp_path / "c.json") == cfg
    # YAML as people write it: PyYAML reads 1e-3 as the string "1e-3"; it must still be a float.
    (tmp_path / "c.yaml").write_text("layers: 3\nhidden: [32, 16]\nlr: 1e-3\nparallel: yes\n")
    y = TrainConfig.from_file(tmp_path / "c.yaml")
    assert (y.layers, y.hidden, y.lr, y.parallel) == (3, (32, 16), 1e-3, True)
    # A run's config.json restarts that run's configuration (resolved label_dim included).
    _, run_dir = reference
    assert TrainConfig.from_file(run_dir / "config.json") == SMALL.with_overrides(label_dim=0)
    assert cfg.with_overrides(hidden="8,8", epochs="5") == TrainConfig(
        **{**cfg.__dict__, "hidden": (8, 8), "epochs": 5}
    )
    with pytest.raises(InputError, match=r"unknown key\(s\) \['hiden', 'lr_decay'\]"):
        TrainConfig.from_dict({"hiden": [8], "lr_decay": 0.1, "layers": 2})
    (tmp_path / "bad.yaml").write_text("epochs: 3\nbatchsize: 64\n")
    with pytest.raises(InputError, match=r"bad\.yaml.*\['batchsize'\]"):
        TrainConfig.from_file(tmp_path / "bad.yaml")
    with pytest.raises(InputError, match="unknown"):
        cfg.with_overrides(learning_rate=1.0)
    with pytest.raises(InputError, match=r"TrainConfig\.lr_schedule"):
        TrainConfig(lr_schedule="linear")
    with pytest.raises(InputError, match=r"TrainConfig\.validation_split"):
        TrainConfig(validation_split=1.0)
    with pytest.raises(
        InputError, match=r"TrainConfig\.keep_checkpoints = -1: expected an integer >= 0"
    ):
        TrainConfig(keep_checkpoints=-1)
    with pytest.raises(InputError, match=r"TrainConfig\.epochs"):
        TrainConfig(epochs="many")
    with pytest.raises(FileError, match="no such config file"):
        TrainConfig.from_file(tmp_path / "absent.json")
    (tmp_path / "torn.json").write_text('{"layers": ')
    with pytest.raises(FileError, match=r"torn\.json"):
        TrainConfig.from_file(tmp_path / "torn.json")


def test_train_config_and_the_training_package_import_without_tensorflow():
    # TrainConfig (and the CLI parser built from its fields) must load fast: neither the config
    # module nor the package's __init__ may import TensorFlow (only training.callbacks does).
    for module in ("tfgalflow.training.config", "tfgalflow.training"):
        code = f"import sys, {module}; assert 'tensorflow' not in sys.modules, '{module}'"
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr[-2000:]


def test_train_config_defaults_match_flow_config():
    from tfgalflow.flows import FlowConfig
    flow, cfg = FlowConfig(dim=6), TrainConfig()
    for name in ("layers", "hidden", "activation", "kind", "bins", "log_columns"):
        assert getattr(cfg, name) == getattr(flow, name), name


@pytest.mark.parametrize("schedule", ["constant", "cosine", "exponential"])
def test_learning_rate_schedules_follow_their_formulas(schedule):
    from tfgalflow.training import learning_rate
    cfg = TrainConfig(epochs=10, lr=2e-3, lr_schedule=schedule)
    steps = 7
    total = cfg.epochs * steps
    t = np.array([0, 1, 17, total // 2, total - 1, total])
    closed_form = {"constant": cfg.lr + 0 * t,
                   "cosine": cfg.lr * 0.5 * (1 + np.cos(np.pi * t / total)),
                   "exponential": cfg.lr * 0.01 ** (t / total)}[schedule]
    lr = learning_rate(cfg, steps)
    got = np.array([float(lr(s)) if callable(lr) else lr for s in t])
    # float32 evaluation of cos/pow: relative error ~1e-7; near t = T, 1 + cos(πt/T) cancels,
    # leaving an absolute error ~η0 · 2^-23 = 2.4e-10 (atol = η0 · 1e-6). A wrong factor 2 or sign
    # fails by ~η0.
    np.testing.assert_allclose(got, closed_form, rtol=1e-5, atol=cfg.lr * 1e-6)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_learning_rate_warm_up_is_linear_then_the_schedule(schedule):
    from tfgalflow.training import learning_rate
    cfg = TrainConfig(epochs=10, lr=2e-3, lr_schedule=schedule, lr_warmup=2)
    steps = 7
    total, warm = cfg.epochs * steps, 2 * steps
    t = np.array([0, 1, 5, warm - 1, warm, warm + 3, (total + warm) // 2, total - 1, total])
    rest = np.clip((t - warm) / (total - warm), 0.0, 1.0)
    after = cfg.lr * (1.0 if schedule == "constant" else 0.5 * (1 + np.cos(np.pi * rest)))
    closed_form = np.where(t < warm, cfg.lr * t / warm, after)
    lr = learning_rate(cfg, steps)
    got = np.array([float(lr(s)) for s in t])
    # float32 as above (rtol 1e-5, atol η0 · 1e-6); a warm-up of the wrong length or a decay
    # over T instead of T - W fails by ≥ η0 / 14
    np.testing.assert_allclose(got, closed_form, rtol=1e-5, atol=cfg.lr * 1e-6)


@pytest.mark.parametrize("fields, message", [
    (dict(lr_warmup=-1), "lr_warmup"),
    (dict(lr_warmup=1, lr_schedule="exponential"), "exponential"),
])
def test_lr_warmup_is_validated(fields, message):
    with pytest.raises(InputError, match=message):
        TrainConfig(**fields)


def test_a_warm_up_longer_than_the_run_ends_one_step_before_it():
    from tfgalflow.training import learning_rate
    cfg = TrainConfig(epochs=2, lr=1e-3, lr_warmup=3)
    lr = learning_rate(cfg, 5)
    # W = T - 1 = 9: η rises as η0 t / 9 and reaches η0 at the last step (float32: rtol 1e-6)
    np.testing.assert_allclose([float(lr(t)) for t in (0, 3, 9)], [0.0, cfg.lr / 3, cfg.lr],
                               rtol=1e-6)


# ---- command line -------------------------------------------------------------------------------

def test_cli_train_flags_mirror_train_config():
    from tfgalflow.cli import build_parser
    parser = build_parser()
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    flags = {s for action in train_parser._actions for s in action.option_strings}
    for name in TrainConfig.field_help():
        assert "--" + name.replace("_", "-") in flags, name
    args = parser.parse_args(
        ["train", "cat.npz", "--out", "r", "--hidden", "8,8", "--no-parallel", "--lr", "3e-4"]
    )
    got = (args.config_hidden, args.config_parallel, args.config_lr, args.config_epochs)
    assert got == ("8,8", False, "3e-4", None)
    args = parser.parse_args(["train", "cat.npz", "--out", "r", "--keep-checkpoints", "0"])
    assert (
        TrainConfig()
        .with_overrides(keep_checkpoints=args.config_keep_checkpoints)
        .keep_checkpoints
        == 0
    )


def test_cli_sample_and_logprob(reference, gauss, tmp_path, capsys):
    from tfgalflow.cli import main
    flow, run_dir = reference
    out = tmp_path / "s.npy"
    assert main(["sample", str(run_dir), "--n", "400", "--seed", "5", "--out", str(out)]) == 0
    s = np.load(out)
    assert s.shape == (400, 2) and np.all(np.isfinite(s))
    # The same seed through the Python API gives the same draws.
    np.testing.assert_array_equal(s, flow.sample(400, seed=5).numpy().astype(np.float64))
    # Samples of a flow fitted to N(MEAN, COV) have that mean to within a few standard errors (0.05
    # each).
    assert np.all(np.abs(s.mean(axis=0) - MEAN) < 0.25)

    np.save(tmp_path / "pts.npy", gauss[:50])
    np.savetxt(tmp_path / "pts.txt", gauss[:50])
    expected = flow.log_prob(gauss[:50]).numpy()
    assert (
        main(
            ["logprob", str(run_dir), str(tmp_path / "pts.npy"), "--out", str(tmp_path / "lp.npy")]
        )
        == 0
    )
    np.testing.assert_array_equal(np.load(tmp_path / "lp.npy"), expected)
    capsys.readouterr()
    assert main(["logprob", str(run_dir), str(tmp_path / "pts.txt")]) == 0
    printed = np.array([float(v) for v in capsys.readouterr().out.split()])
    # savetxt writes %.18e, so the points read back identical; the printed values have 9
    # significant digits, which round-trip float32 (24-bit mantissa): relative differences <=
    # 5e-10.
    np.testing.assert_allclose(printed, expected, rtol=1e-8)


def test_cli_errors_exit_2_with_a_message(reference, tmp_path, capsys):
    from tfgalflow.cli import main
    _, run_dir = reference
    np.save(tmp_path / "wide.npy", np.zeros((10, 5)))
    assert main(["logprob", str(run_dir), str(tmp_path / "wide.npy")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tfgalflow logprob: error:") and "[N, 2]" in err and "(10, 5)" in err
    assert (
        main(
            [
                "sample",
                str(run_dir),
                "--n",
                "5",
                "--labels",
                "0.5",
                "--out",
                str(tmp_path / "s.npy"),
            ]
        )
        == 2
    )
    assert "unconditional" in capsys.readouterr().err
    assert main(["train", "--resume", str(run_dir), "--epochs", "3"]) == 2
    assert "drop --epochs" in capsys.readouterr().err
    assert (
        main(["sample", str(tmp_path / "nowhere"), "--n", "5", "--out", str(tmp_path / "s.npy")])
        == 2
    )
    assert "config.json" in capsys.readouterr().err


def test_cli_resume_keeps_the_run_verbosity(tmp_path, capsys):
    from tfgalflow.catalogue import Catalogue
    from tfgalflow.cli import main
    w, _ = gauss6(1000, seed=4)
    cat_path = tmp_path / "cat.npz"
    Catalogue(w[:, :3], w[:, 3:], units=UNITS).save(cat_path)
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(
            cat_path, SMALL.with_overrides(epochs=2), run_dir, verbose=0, callbacks=[CrashAfter(0)]
        )
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir)]) == 0      # no --verbose: the run's 0
    lines = capsys.readouterr().out.splitlines()       # only the summary, no progress bar
    assert len(lines) == 1 and "member_000: seed 3, 2 epochs" in lines[0]
    # --members grows the finished run: member_001 (seed 4) trains its 2 epochs
    assert main(["train", "--resume", str(run_dir), "--members", "2"]) == 0
    assert [m["seed"] for m in read_run_config(run_dir)["members"]] == [3, 4]
    assert list(read_history(run_dir, 1)["epoch"]) == [1, 2]


def test_cli_train_restart_sample_logprob_with_a_conditional_catalogue(tmp_path, capsys):
    from tfgalflow.catalogue import Catalogue
    from tfgalflow.cli import main
    w, labels = gauss6(2000, seed=4)
    cat_path = tmp_path / "cat.npz"
    Catalogue(w[:, :3], w[:, 3:], labels=labels, label_names=("q",), units=UNITS).save(cat_path)
    (tmp_path / "cfg.yaml").write_text(
        "layers: 2\nhidden: [16, 16]\nepochs: 1\nbatch_size: 256\nlr: 1e-2\njit_compile: false\n"
    )
    run1, run2 = tmp_path / "run1", tmp_path / "run2"
    # Flags override the config file: epochs 3 (flag) beats epochs 1 (file); layers 2 comes from
    # the file.
    assert (
        main(
            [
                "train",
                str(cat_path),
                "--out",
                str(run1),
                "--config",
                str(tmp_path / "cfg.yaml"),
                "--epochs",
                "3",
                "--seed",
                "5",
                "--verbose",
                "0",
            ]
        )
        == 0
    )
    assert "member_000: seed 5, 3 epochs" in capsys.readouterr().out
    run = read_run_config(run1)
    assert (run["train"]["epochs"], run["train"]["layers"], run["train"]["label_dim"]) == (3, 2, 1)
    assert run["data"]["source"] == "file" and run["data"]["label_names"] == ["q"]
    # Restarting from the run's config.json reproduces the run (same seed, same data): identical
    # history.
    assert main(["train", str(cat_path), "--config", str(run1 / "config.json"), "--out", str(run2),
                 "--verbose", "0"]) == 0
    for key in ("loss", "val_loss"):
        np.testing.assert_array_equal(read_history(run2)[key], read_history(run1)[key])
    # --resume of a finished run trains nothing and keeps the history.
    assert main(["train", "--resume", str(run1), "--verbose", "0"]) == 0
    assert raw_history_epochs(run1) == [1, 2, 3]

    out = tmp_path / "samples.npz"
    assert (
        main(
            [
                "sample",
                str(run1),
                "--n",
                "300",
                "--labels",
                "0.5",
                "--seed",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    s = Catalogue.load(out)
    assert len(s) == 300 and s.units == UNITS and s.label_names == ("q",)
    assert np.all(s.labels == 0.5)
    model = load_run(run1)
    np.testing.assert_allclose(
        s.phase_space, model.sample(300, labels=np.array([0.5]), seed=2).numpy(), rtol=1e-6
    )

    assert main(["logprob", str(run1), str(cat_path), "--out", str(tmp_path / "lp.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "lp.npy"), model.log_prob(w, labels).numpy())
    capsys.readouterr()
    assert main(["sample", str(run1), "--n", "5", "--out", str(tmp_path / "x.npy")]) == 2
    err = capsys.readouterr().err
    assert "conditional" in err and "1 value(s) (q)" in err
