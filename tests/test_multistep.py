"""K optimizer steps per train call: ``Flow.train_step`` on stacks [K, B, D] and
``TrainConfig.steps_per_call``.

The reference is always the same training with one batch per call (K = 1): same seed, same data,
same batches in the same order, XLA on both sides (the plain graph on both sides where XLA is not
the point). A stack runs K steps in one ``tf.while_loop`` whose body is the one-batch step, so the
float32 operations are the same ones on the same inputs; the weights and histories must agree to
round-off (measured: bit for bit).
"""
from __future__ import annotations

import numpy as np
import pytest

from tfgalflow.errors import InputError
from tfgalflow.training import TrainConfig, read_history, resume, train

keras = pytest.importorskip("tf_keras")
import tensorflow as tf  # noqa: E402  (after tfgalflow: TF_USE_LEGACY_KERAS)

from tfgalflow.flows import FlowConfig  # noqa: E402
from tfgalflow.model import Flow  # noqa: E402
from test_training import CrashAfter  # noqa: E402  (the same simulated crash)

# 7 full batches + one of 104 rows: stacks of 3, 3, 1, then [1, 104]
N, B, K = 1000, 128, 3


def data(label_dim: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """x [N, 2] correlated Gaussian, labels [N, label_dim] (x's mean shifts with them) or None,
    weights [N]."""
    rng = np.random.default_rng(0)
    c = rng.uniform(-1, 1, size=(N, label_dim)).astype(np.float32) if label_dim else None
    x = rng.normal(size=(N, 2)) @ np.array([[1.0, 0.8], [0.0, 0.5]])
    if c is not None:
        x += c.sum(axis=1, keepdims=True)
    w = rng.uniform(0.2, 1.0, size=N).astype(np.float32)
    return x.astype(np.float32), c, w


def fitted(x, c, w, dataset, steps_per_epoch: int | None, jit: bool = True) -> Flow:
    """A fresh flow (seed 1), Adam under a cosine schedule (so the step count matters), fit 2
    epochs."""
    flow = Flow(
        FlowConfig(
            dim=2, label_dim=0 if c is None else c.shape[1], layers=2, hidden=(16, 16), seed=1
        )
    )
    flow.adapt(x, c)
    flow.compile(
        keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(1e-2, 40)), jit_compile=jit
    )
    flow.fit(dataset, epochs=2, steps_per_epoch=steps_per_epoch, verbose=0)
    return flow


def stacks(arrays: list[np.ndarray]):
    """Two epochs of the batches of ``arrays`` in file order, as stacks of K full batches, then the
    partial batch as a stack [1, r, ...]."""
    full = N // B
    for _ in range(2):
        for i in range(0, full, K):
            j = min(i + K, full)
            yield tuple(a[i * B:j * B].reshape((j - i, B) + a.shape[1:]) for a in arrays)
        yield tuple(a[full * B:][None] for a in arrays)


@pytest.mark.slow   # trains or spawns processes: make test-slow (default suite < 10 min)
@pytest.mark.parametrize("case", ["labels+weights", "zero-width labels+weights"])
def test_stacked_steps_equal_separate_steps(case):
    x, c, w = data(1 if case == "labels+weights" else 0)
    if case == "zero-width labels+weights":
        c_in = np.zeros((N, 0), np.float32)      # how unconditional flows take sample weights
        arrays = [x, c_in, w]
    else:
        arrays = [x, c, w]
    reference = fitted(x, c, w, tf.data.Dataset.from_tensor_slices(tuple(arrays)).batch(B), None)
    spec = tuple(tf.TensorSpec((None, None) + a.shape[1:], tf.float32) for a in arrays)
    stacked_ds = tf.data.Dataset.from_generator(lambda: stacks(arrays), output_signature=spec)
    calls = -(-(N // B) // K) + 1
    stacked = fitted(x, c, w, stacked_ds, calls)

    assert int(stacked.optimizer.iterations) == int(reference.optimizer.iterations) == 2 * 8
    # one trace, K and B free
    assert stacked.train_function.experimental_get_tracing_count() == 1
    initial = Flow(reference.config).get_weights()
    for got, want, start in zip(stacked.get_weights(), reference.get_weights(), initial):
        # Same float32 operations on the same batches in the same order (measured: identical). 1e-6
        # allows for a different XLA fusion inside the loop body (a few ulp per step); 16 Adam
        # steps of ~1e-2 move the weights by ~0.1, 1e5 times more, so one step skipped, repeated or
        # reordered fails.
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    moved = max(np.max(np.abs(r - s)) for r, s in zip(reference.get_weights(), initial) if r.size)
    assert moved > 1e-2
    probe = x[:50], (None if c is None else c[:50])
    np.testing.assert_allclose(
        stacked.log_prob(*probe).numpy(), reference.log_prob(*probe).numpy(), rtol=0, atol=1e-5
    )


def test_stacked_steps_without_xla_equal_separate_steps():
    # The plain-graph path (jit off): the loop body must see the variables written by the previous
    # step.
    x, c, w = data(1)
    reference = fitted(
        x, c, w, tf.data.Dataset.from_tensor_slices((x, c, w)).batch(B), None, jit=False
    )
    spec = tuple(tf.TensorSpec((None, None) + a.shape[1:], tf.float32) for a in (x, c, w))
    ds = tf.data.Dataset.from_generator(lambda: stacks([x, c, w]), output_signature=spec)
    stacked = fitted(x, c, w, ds, -(-(N // B) // K) + 1, jit=False)
    for got, want in zip(stacked.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)      # same argument as above


def test_bad_stacks_are_input_errors():
    # Called eagerly: inside fit the same InputError surfaces wrapped by autograph (as for rank-2
    # data).
    x, c, _ = data(1)
    flow = Flow(FlowConfig(dim=2, label_dim=1, layers=1, hidden=(4,)))
    flow.compile(keras.optimizers.Adam(1e-3))
    xs, cs = x[:64].reshape(2, 32, 2), c[:64].reshape(2, 32, 1)
    cases = [(xs, "conditional"),
             ((xs, c[:64].reshape(4, 16, 1)), r"\[K, B, 1\]"),
             ((xs, np.zeros((2, 32, 3), np.float32)), r"\[K, B, 1\]"),
             ((x[:64].reshape(2, 16, 4), cs), r"\[K, B, 2\]")]
    for stack, pattern in cases:
        with pytest.raises(InputError, match=pattern):
            flow.train_step(tf.nest.map_structure(tf.constant, stack))
    assert int(flow.optimizer.iterations) == 0          # rejected before any step
    uncond = Flow(FlowConfig(dim=2, layers=1, hidden=(4,)))
    uncond.compile(keras.optimizers.Adam(1e-3))
    with pytest.raises(InputError, match="unconditional"):
        uncond.train_step((tf.constant(xs), tf.constant(cs)))


# ---- training runs ------------------------------------------------------------------------------

# 1800 training rows of a 2D Gaussian in batches of 256: 7 full batches and one of 8 rows; K = 3
# gives stacks of 3, 3 and 1 full batches plus [1, 8] -- every kind of stack, 3 XLA compilations.
RUN = TrainConfig(
    layers=2,
    hidden=(16, 16),
    epochs=4,
    batch_size=256,
    lr=1e-2,
    checkpoint_every=1,
    seed=3,
    patience=0,
    jit_compile=True,
    steps_per_call=1,
)


@pytest.fixture(scope="module")
def gauss() -> np.ndarray:
    return np.random.default_rng(0).multivariate_normal([1.0, 2.0], [[1.0, 0.8], [0.8, 1.0]], 2000)


@pytest.mark.slow   # trains or spawns processes: make test-slow (default suite < 10 min)
def test_steps_per_call_leaves_history_unchanged_and_resumes_exactly(gauss, tmp_path):
    one = read_history(_train(gauss, RUN, tmp_path / "k1"))
    stacked_cfg = RUN.with_overrides(steps_per_call=3)
    flow = train(gauss, stacked_cfg, tmp_path / "k3", verbose=0)
    three = read_history(tmp_path / "k3")
    # Stacks change the number of calls per epoch (4 instead of 8), not the schedule's unit: after
    # the run optimizer.iterations = T = 4 x 8 steps and the last step used the cosine rate at
    # t = T - 1, η0 (1 + cos(π 31/32)) / 2 = 2.4e-3 η0 (a schedule counting calls, T = 16, would
    # have reached 0).
    total = RUN.epochs * 8
    assert int(flow.optimizer.iterations) == total
    expected = RUN.lr * 0.5 * (1 + np.cos(np.pi * (total - 1) / total))
    # float32 cos near π: absolute error ~η0 · 2^-23 ~ 1e-9, i.e. ~1e-4 of the value
    assert float(flow.optimizer.learning_rate) == pytest.approx(expected, rel=1e-3)
    # Same steps on the same batches (see the module docstring): histories agree to float32
    # round-off of the epoch means (~1e-7 relative; measured identical), far below the
    # epoch-to-epoch change (> 1e-3).
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose(three[key], one[key], rtol=1e-6, atol=0)
    # Crash after epoch 1 (checkpoint after epoch 2 = 1-based count 2): the resumed run regenerates
    # the stacks of epochs 2 and 3 from (seed, epoch) and the checkpointed step counter drives the
    # schedule.
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(gauss, stacked_cfg, tmp_path / "crashed", verbose=0, callbacks=[CrashAfter(1)])
    resume(tmp_path / "crashed", data=gauss, verbose=0)
    again = read_history(tmp_path / "crashed")
    assert list(again["epoch"]) == list(range(1, RUN.epochs + 1))
    for key in ("loss", "val_loss"):      # the tolerance of test_training's resume test
        np.testing.assert_allclose(again[key], three[key], rtol=1e-6, atol=0)


def _train(data, config, run_dir, **kw):
    train(data, config, run_dir, verbose=0, **kw)
    return run_dir


# ---- pipelines ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "n, batch, k", [(1800, 256, 3), (1792, 256, 7), (100, 256, 4), (1800, 256, 1)]
)
def test_array_pipeline_stacks_the_same_batches(n, batch, k):
    from tfgalflow.training.data import ArrayPipelines
    x = np.arange(2 * n, dtype=np.float32).reshape(n, 2)
    one = ArrayPipelines(x, None, x[:0], None, batch, seed=5, steps_per_call=1)
    many = ArrayPipelines(x, None, x[:0], None, batch, seed=5, steps_per_call=k)
    epochs = (2, 4)
    batches = [b.numpy() for b in one.train_dataset(*epochs)]
    elements = [s.numpy() for s in many.train_dataset(*epochs)]
    assert len(batches) == 2 * one.steps_per_epoch and len(elements) == 2 * many.calls_per_epoch
    assert many.steps_per_epoch == one.steps_per_epoch
    # steps_after_calls (what the progress bar shows) is the number of batches the calls delivered
    per_call = [len(s) if k > 1 else 1 for s in elements[:many.calls_per_epoch]]
    assert [many.steps_after_calls(c + 1) for c in range(many.calls_per_epoch)] == \
        np.cumsum(per_call).tolist()
    if k == 1:
        for got, want in zip(elements, batches):
            np.testing.assert_array_equal(got, want)
        return
    # unstacked, the stacks are the K = 1 batches in order, and no stack spans two epochs
    flat = [s[i] for s in elements for i in range(len(s))]
    assert len(flat) == len(batches)
    for got, want in zip(flat, batches):
        np.testing.assert_array_equal(got, want)
    per_epoch = many.calls_per_epoch
    for e in range(2):
        epoch_rows = np.concatenate(
            [s.reshape(-1, 2) for s in elements[e * per_epoch : (e + 1) * per_epoch]]
        )
        # every row once per epoch
        assert sorted(epoch_rows[:, 0].tolist()) == x[:, 0].tolist()
    shapes = {s.shape for s in elements}
    assert all(len(s) == 3 and (s[0] <= k) and (s[0] == 1 or s[1] == batch) for s in shapes)
    # full stacks, a short last stack, the partial batch
    assert len(shapes) <= 3


def test_streamed_batches_are_stacked_within_an_epoch():
    from tfgalflow.training.data import stacked_batches
    rng = np.random.default_rng(0)
    sizes = [4, 4, 4, 4, 4, 3]  # one epoch as HDF5Catalogue.batches yields it
    epoch = [
        (rng.normal(size=(s, 6)).astype(np.float32), rng.normal(size=(s, 1)).astype(np.float32))
        for s in sizes
    ]
    out = list(stacked_batches(iter(epoch), 4, 2))
    assert [o[0].shape for o in out] == [(2, 4, 6), (2, 4, 6), (1, 4, 6), (1, 3, 6)]
    assert [o[1].shape for o in out] == [(2, 4, 1), (2, 4, 1), (1, 4, 1), (1, 3, 1)]
    np.testing.assert_array_equal(np.concatenate([o[0].reshape(-1, 6) for o in out]),
                                  np.concatenate([b[0] for b in epoch]))
    # x only, fewer than K
    plain = list(stacked_batches(iter([b[0] for b in epoch[:3]]), 4, 5))
    assert len(plain) == 1 and plain[0].shape == (3, 4, 6)


def test_hdf5_streaming_with_stacks_equals_batches(tmp_path):
    from tfgalflow.catalogue import Catalogue
    rng = np.random.default_rng(2)
    w = rng.normal(size=(1500, 6)) + np.arange(6.0)
    path = tmp_path / "mock.h5"
    Catalogue(w[:, :3], w[:, 3:], labels=rng.uniform(size=(1500, 1)), label_names=("q",),
              units={"length": "kpc", "velocity": "km/s"}).save(path)
    # 1350 training rows in batches of 128: 10 full + 70 rows; K = 4 -> stacks 4, 4, 2 and [1, 70].
    # Plain graph: the stacking of streamed batches is under test here, XLA in the tests above.
    cfg = RUN.with_overrides(
        epochs=2, batch_size=128, checkpoint_every=0, adapt_samples=500, jit_compile=False
    )
    one = read_history(_train(path, cfg, tmp_path / "k1"))
    four = read_history(_train(path, cfg.with_overrides(steps_per_call=4), tmp_path / "k4"))
    for key in ("loss", "val_loss"):      # same argument as for in-memory data
        np.testing.assert_allclose(four[key], one[key], rtol=1e-6, atol=0)


@pytest.mark.parametrize("value", [0, -3, 1.5, "many", True])
def test_bad_steps_per_call_is_an_input_error(value):
    with pytest.raises(InputError, match=r"TrainConfig\.steps_per_call"):
        TrainConfig(steps_per_call=value)
