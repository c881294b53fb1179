"""FlowConfig.label_asinh: a label that reaches 0 enters the networks as asinh(c / s)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tfgalflow.errors import InputError
from tfgalflow.flows import FlowConfig
from tfgalflow.model import Flow

SCALE = 0.01


def _pair():
    """A flow with label_asinh ((1, SCALE),) and a plain flow of the same seed fed
    (c_0, asinh(c_1 / SCALE)) as its labels."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 2)).astype(np.float32)
    # column 1 like a/r_a: exactly 0 for a third of the rows, up to 1 otherwise
    c = np.stack([rng.uniform(0.5, 1.5, 300),
                  rng.choice([0.0, 1 / 3, 2 / 3, 1.0], 300)], 1).astype(np.float32)
    cfg = dict(dim=2, layers=2, hidden=(8,), seed=3)
    softened = Flow(FlowConfig(**cfg, label_dim=2, label_asinh=((1, SCALE),))).adapt(x, c)
    fed = np.stack([c[:, 0], np.arcsinh(c[:, 1] / SCALE)], axis=1)
    plain = Flow(FlowConfig(**cfg, label_dim=2)).adapt(x, fed)
    return x, c, fed, softened, plain


def test_asinh_column_equals_a_flow_fed_the_asinh_of_the_label():
    x, c, fed, softened, plain = _pair()
    # same seed -> same weights; the label_asinh flow at c must equal the plain flow at
    # (c_0, asinh(c_1 / s)): float32 round-off only (a missing asinh, a wrong scale or column, or
    # moments of the raw label move log p by O(1) nats)
    np.testing.assert_allclose(softened.log_prob(x, c), plain.log_prob(x, fed),
                               rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(softened.label_shift.numpy(), fed.mean(axis=0), rtol=1e-5)
    # the training range stays in label units, two columns
    low, high = softened.label_range()
    np.testing.assert_allclose(low, c.min(axis=0), rtol=1e-6)
    np.testing.assert_allclose(high, c.max(axis=0), rtol=1e-6)
    assert FlowConfig.from_dict(softened.config.to_dict()) == softened.config
    assert not softened.extrapolated(c).any()


def test_label_noise_jitters_the_asinh_of_the_label():
    _, c, fed, softened, _ = _pair()
    softened.set_label_noise(0.5, seed=1)
    jittered = softened._jittered_labels(tf.constant(c), tf.constant(3, tf.int64)).numpy()
    # each column moves by 0.5 of its standardisation scale, in asinh(c_1 / s) for column 1:
    # 300 draws give the spread to ~4 % (1/sqrt(2 * 300) relative), so 20 % is far outside
    # noise (jitter of the raw a/r_a would be ~10x smaller in asinh units)
    moved = np.stack([jittered[:, 0], np.arcsinh(jittered[:, 1] / SCALE)], axis=1) - fed
    np.testing.assert_allclose(moved.std(axis=0) / fed.std(axis=0), 0.5, rtol=0.2)


def test_bad_label_asinh_is_refused_naming_the_field():
    with pytest.raises(InputError, match="label_asinh"):
        FlowConfig(dim=2, label_dim=2, label_asinh=((2, 0.1),))           # no label column 2
    with pytest.raises(InputError, match="label_asinh"):
        FlowConfig(dim=2, label_dim=2, label_asinh=((1, 0.0),))           # scale must be > 0
    with pytest.raises(InputError, match="label_asinh"):
        FlowConfig(dim=2, label_dim=2, label_log_columns=(1,), label_asinh=((1, 0.1),))
    with pytest.raises(InputError, match="label_asinh"):
        FlowConfig(dim=2, label_dim=2, label_asinh=((1, 0.1), (1, 0.2)))      # one scale each


def test_train_config_flag_reaches_the_saved_run_and_the_export(tmp_path):
    from tfgalflow.export import export_model, load_saved_model
    from tfgalflow.training import TrainConfig, load_run, train

    x, c, _, _, _ = _pair()
    config = TrainConfig(layers=2, hidden=(8,), epochs=1, batch_size=100, patience=0,
                         checkpoint_every=0, jit_compile=False, steps_per_call=1,
                         label_asinh="1:0.01")
    flow = train(x, config, tmp_path / "run", labels=c, verbose=0)
    loaded = load_run(tmp_path / "run")
    assert loaded.config.label_asinh == ((1, 0.01),)
    np.testing.assert_allclose(loaded.log_prob(x[:20], c[:20]), flow.log_prob(x[:20], c[:20]),
                               rtol=1e-6, atol=1e-6)
    # the asinh input is part of the graph: the SavedModel takes the 2 labels and agrees
    exported = load_saved_model(export_model(flow, tmp_path / "saved", accelerations=False))
    np.testing.assert_allclose(exported.log_prob(x[:20], c[:20]), flow.log_prob(x[:20], c[:20]),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="label_asinh"):
        TrainConfig(label_asinh="0.5:0.01")
