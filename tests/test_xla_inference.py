"""Default XLA inference of Flow / Ensemble: row buckets, no recompilation, plain graphs to export.

Eager ``log_prob`` / ``grad_log_prob`` / ``sample`` run XLA-compiled on rows padded to
``tfgalflow.density.row_bucket``; these tests check that padding and chunking change no number,
that row counts inside a bucket reuse its compilation, that ``jit_compile=False`` restores the
plain graphs, and that symbolic calls (what export traces) contain no XLA.
"""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tfgalflow.density import XLA_CHUNK_ROWS, XLA_MIN_ROWS, XLA_OCTAVE_ROWS, row_bucket
from tfgalflow.errors import InputError
from tfgalflow.flows import FlowConfig
from tfgalflow.model import Ensemble, Flow


@pytest.fixture(scope="module")
def flows():
    """(XLA default, plain twin with the same weights): conditional, a log column."""
    rng = np.random.default_rng(0)
    cfg = FlowConfig(dim=3, label_dim=2, layers=2, hidden=(16, 16), log_columns=(0,), seed=3)
    x = np.abs(rng.normal(size=(400, 3))) + 0.2
    c = rng.normal(size=(400, 2))
    xla = Flow(cfg).adapt(x, c)
    plain = Flow(cfg, jit_compile=False)
    plain.set_weights(xla.get_weights())
    return xla, plain


def _points(n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """x [n, 3] in the support, labels [n, 2] inside the training range (no extrapolation)."""
    rng = np.random.default_rng(seed)
    return (np.abs(rng.normal(size=(n, 3))) + 0.2).astype(np.float32), \
        rng.uniform(-2.0, 2.0, size=(n, 2)).astype(np.float32)


def test_row_buckets_are_powers_of_two_then_quarter_octaves():
    assert [row_bucket(n) for n in (1, 255, 256, 257, 2048, 2049, 4096, 4097, 16385, 20480,
                                     XLA_CHUNK_ROWS)] == \
        [XLA_MIN_ROWS, 256, 256, 512, 2048, 4096, 4096, 5120, 20480, 20480, XLA_CHUNK_ROWS]
    n = np.arange(1, XLA_CHUNK_ROWS + 1)
    buckets = np.array([row_bucket(int(k)) for k in n])
    assert np.all(buckets >= n) and np.all(np.diff(buckets) >= 0)
    # the padding bound of the docstring: < 2x up to XLA_OCTAVE_ROWS, < 1.25x above it
    assert np.all(buckets[n > XLA_OCTAVE_ROWS] < 1.25 * n[n > XLA_OCTAVE_ROWS])
    assert np.all(buckets[n > XLA_MIN_ROWS] < 2 * n[n > XLA_MIN_ROWS])
    assert len(set(buckets.tolist())) == 21              # programs per method, at most
    for bad in (0, XLA_CHUNK_ROWS + 1):
        with pytest.raises(InputError, match="row_bucket"):
            row_bucket(bad)


def test_xla_is_the_default_and_jit_compile_false_turns_it_off(flows):
    xla, plain = flows
    assert xla.uses_xla and Flow(xla.config).uses_xla and Ensemble([xla]).uses_xla
    assert not plain.uses_xla and not Ensemble([xla], jit_compile=False).uses_xla


def test_padding_and_chunks_give_the_unpadded_numbers(flows):
    xla, plain = flows
    x, c = _points(300)
    # 5 rows are padded to the 256-row bucket; the first 5 rows of a full 256-row call run the
    # same compiled program on the same rows, and rows are independent: identical bits.
    for method in ("log_prob", "grad_log_prob"):
        few = getattr(xla, method)(x[:5], c[:5]).numpy()
        full = getattr(xla, method)(x[:256], c[:256]).numpy()[:5]
        np.testing.assert_array_equal(few, full)
    # against the plain graph (no padding at all): XLA fuses the same float32 ops in another
    # order, so values agree to round-off. A component is a sum of terms as large as the largest
    # ones of the array, so its round-off is relative to that scale: atol = 1e-5 x max|value|
    # (~100 float32 ulps of it); distinct points differ by O(1) of it, so a wrong row fails.
    def close(actual, desired):
        np.testing.assert_allclose(actual, desired, rtol=1e-5,
                                   atol=1e-5 * float(np.abs(desired).max()))

    close(xla.log_prob(x, c).numpy(), plain.log_prob(x, c).numpy())
    close(xla.grad_log_prob(x, c).numpy(), plain.grad_log_prob(x, c).numpy())
    # the same seed draws the same base noise outside XLA: samples agree with the plain graph to
    # round-off of the transform
    close(xla.sample(300, c, seed=4).numpy(), plain.sample(300, c, seed=4).numpy())


def test_chunks_beyond_the_chunk_size_are_stitched_in_order():
    # one row past a chunk: 65536 rows in the 65536 bucket + 1 row in the 256 bucket. Each
    # chunk's rows equal a direct call of the same bucket on the same rows (identical bits).
    flow = Flow(FlowConfig(dim=2, layers=1, hidden=(8,), seed=1))
    x = np.random.default_rng(2).normal(size=(XLA_CHUNK_ROWS + 1, 2)).astype(np.float32)
    lp = flow.log_prob(x).numpy()
    assert lp.shape == (XLA_CHUNK_ROWS + 1,)
    np.testing.assert_array_equal(lp[:XLA_CHUNK_ROWS], flow.log_prob(x[:XLA_CHUNK_ROWS]).numpy())
    np.testing.assert_array_equal(lp[-1:], flow.log_prob(x[-256:]).numpy()[-1:])
    assert flow.tracing_counts()["log_prob"] == 2           # two buckets: 65536 and 256


def test_row_counts_inside_a_bucket_do_not_recompile(flows):
    flow = Flow(flows[0].config)
    flow.set_weights(flows[0].get_weights())
    for n in (1, 7, 100, 256):
        x, c = _points(n, seed=n)
        flow.log_prob(x, c)
        flow.grad_log_prob(x, c)
        flow.sample(n, c, seed=n)
    assert flow.tracing_counts() == {"log_prob": 1, "grad": 1, "sample": 1}
    x, c = _points(257)
    flow.log_prob(x, c)                                      # the next bucket: one compilation
    assert flow.tracing_counts()["log_prob"] == 2


def test_outer_tape_sees_through_the_padding(flows):
    xla, plain = flows
    x, c = _points(9)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        total = tf.reduce_sum(xla.log_prob(xt, c))
    # d Σ log p / dx_n = ∇ log p(x_n): the plain graph's gradient, to round-off (as above)
    reference = plain.grad_log_prob(x, c).numpy()
    np.testing.assert_allclose(tape.gradient(total, xt).numpy(), reference, rtol=1e-5,
                               atol=1e-5 * float(np.abs(reference).max()))


def test_symbolic_calls_trace_plain_graphs(flows):
    # what export traces: the public methods inside another tf.function (after eager XLA calls)
    xla, _ = flows
    x, c = _points(3)
    xla.log_prob(x, c)
    spec = [tf.TensorSpec([None, 3], tf.float32), tf.TensorSpec([None, 2], tf.float32)]
    for method in (xla.log_prob, xla.grad_log_prob):
        graph = tf.function(method, input_signature=spec).get_concrete_function().graph
        library = graph.as_graph_def().library.function
        assert library and not [f.signature.name for f in library
                                if f.attr["_XlaMustCompile"].b]
        assert not [n.name for f in library for n in f.node_def if n.attr["_XlaMustCompile"].b]
