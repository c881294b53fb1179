"""Label-noise regularisation (Flow.set_label_noise, TrainConfig.label_noise)."""
import numpy as np
import tensorflow as tf
import tf_keras as keras

from tfgalflow.flows import FlowConfig
from tfgalflow.model import Flow

SIGMA = 0.3


def conditional_flow(seed: int = 0) -> Flow:
    """A small 2-D flow with two labels, the second a label log column, adapted to its data."""
    rng = np.random.default_rng(seed)
    c = np.stack([rng.normal(1.0, 2.0, 4096), np.exp(rng.normal(0.5, 0.7, 4096))], 1)
    x = rng.normal(size=(4096, 2)) + c[:, :1]
    flow = Flow(FlowConfig(dim=2, label_dim=2, layers=2, hidden=(16,), label_log_columns=(1,),
                           seed=seed))
    flow.adapt(x.astype(np.float32), c.astype(np.float32))
    return flow


def standardised(flow: Flow, c) -> np.ndarray:
    return flow._standardised_labels(tf.constant(c, tf.float32)).numpy().astype(np.float64)


def test_jitter_is_gaussian_with_sigma_in_standardised_labels():
    flow = conditional_flow().set_label_noise(SIGMA, seed=5)
    n = 40_000
    c = np.tile([[2.0, 3.0]], (n, 1)).astype(np.float32)
    d = standardised(flow, flow._jittered_labels(tf.constant(c), 1)) - standardised(flow, c)
    # the jitter of each standardised label is N(0, σ²), the log column's included: mean within
    # 4 standard errors σ/√n of 0, standard deviation within 4 of its standard errors σ/√(2n)
    # of σ, the two columns independent (|r| < 4/√n)
    assert np.all(np.abs(d.mean(0)) < 4 * SIGMA / np.sqrt(n))
    assert np.all(np.abs(d.std(0) - SIGMA) < 4 * SIGMA / np.sqrt(2 * n))
    assert abs(np.corrcoef(d.T)[0, 1]) < 4 / np.sqrt(n)
    # fresh draws each step, the same draws for the same (seed, step)
    again = flow._jittered_labels(tf.constant(c[:8]), 1).numpy()
    np.testing.assert_array_equal(again, flow._jittered_labels(tf.constant(c[:8]), 1).numpy())
    assert not np.allclose(again, flow._jittered_labels(tf.constant(c[:8]), 2).numpy())


def test_a_training_step_is_the_step_on_jittered_labels():
    # One Adam step of a noisy flow equals one step of an identical noise-free flow on the labels
    # jittered by hand with the same draws (step 1 of seed 5), and differs from the clean step.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 2)).astype(np.float32)
    c = np.stack([rng.normal(1, 2, 64), np.exp(rng.normal(0.5, 0.7, 64))], 1).astype(np.float32)
    flows = []
    for noise in (SIGMA, 0.0):
        flow = conditional_flow()
        flow.set_label_noise(noise, seed=5)
        flow.compile(keras.optimizers.Adam(1e-2))
        flows.append(flow)
    noisy, clean = flows
    eps = tf.random.stateless_normal(c.shape, tf.constant([5, 1], tf.int64)).numpy()
    scale = SIGMA * clean.label_scale.numpy()
    jittered = np.stack([c[:, 0] + scale[0] * eps[:, 0], c[:, 1] * np.exp(scale[1] * eps[:, 1])],
                        1).astype(np.float32)
    noisy.train_on_batch(x, c)
    clean.train_on_batch(x, jittered)
    for a, b in zip(noisy.trainable_variables, clean.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    reference = conditional_flow()
    reference.compile(keras.optimizers.Adam(1e-2))
    reference.train_on_batch(x, c)
    assert any(not np.allclose(a.numpy(), b.numpy(), atol=1e-6)
               for a, b in zip(noisy.trainable_variables, reference.trainable_variables))
