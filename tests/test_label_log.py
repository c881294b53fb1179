"""FlowConfig.label_log_columns: labels enter the networks as log c (e.g. metallicity Z)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tfgalflow.density import ExtrapolationWarning
from tfgalflow.errors import InputError
from tfgalflow.flows import FlowConfig
from tfgalflow.model import Flow


def _pair():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 2)).astype(np.float32)
    c = np.stack([10 ** rng.uniform(-4, -1.5, 200), rng.uniform(0.5, 5, 200)], 1).astype(
        np.float32
    )
    cfg = dict(dim=2, label_dim=2, layers=2, hidden=(8,), seed=3)
    with_log = Flow(FlowConfig(**cfg, label_log_columns=(0,))).adapt(x, c)
    plain = Flow(FlowConfig(**cfg)).adapt(x, np.stack([np.log(c[:, 0]), c[:, 1]], 1))
    return x, c, with_log, plain


def test_label_log_column_equals_a_flow_fed_log_labels():
    x, c, with_log, plain = _pair()
    # same seed -> same weights; the log-label flow at c equals the plain flow at (ln Z, alpha):
    # float32 round-off only (a missing log or unlogged moments would differ by O(1) nats)
    lc = np.stack([np.log(c[:, 0]), c[:, 1]], 1)
    np.testing.assert_allclose(
        with_log.log_prob(x, c), plain.log_prob(x, lc), rtol=1e-5, atol=1e-4
    )
    np.testing.assert_allclose(with_log.label_shift.numpy()[0], np.log(c[:, 0]).mean(), rtol=1e-5)
    assert FlowConfig.from_dict(with_log.config.to_dict()) == with_log.config
    assert FlowConfig(dim=2, label_dim=2).label_log_columns == ()


def test_training_label_range_is_in_label_units_for_log_columns():
    x, c, with_log, _ = _pair()
    low, high = with_log.label_range()
    # adapt stores log Z; the range (and the extrapolation check) is in Z itself: float32 ln
    # then exp keeps ~1e-7 relative (the stored log range would be ~[-9.2, -3.5], a factor ~1e4
    # off)
    np.testing.assert_allclose(low, c.min(axis=0), rtol=1e-6)
    np.testing.assert_allclose(high, c.max(axis=0), rtol=1e-6)
    assert not with_log.extrapolated(c).any()
    assert with_log.extrapolated([[c[:, 0].max() * 1.01, 1.0]]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExtrapolationWarning)
        with_log.log_prob(x, c)  # every label inside its training range: no warning


def test_non_positive_label_in_a_log_column_names_the_column():
    x, c, with_log, _ = _pair()
    c[5, 0] = 0.0
    with pytest.raises(
        InputError, match=r"label column 0 is a label log column .* \(first at row 5\)"
    ):
        with_log.log_prob(x, c)
    with pytest.raises(InputError, match="label column 0 is a label log column"):
        with_log.adapt(x, c)
    with pytest.raises(InputError, match="label_log_columns"):
        FlowConfig(dim=2, label_dim=1, label_log_columns=(1,))


def test_train_config_passes_label_log_columns_to_the_flow(tmp_path):
    from tfgalflow.training import TrainConfig, load_run, train

    x, c, _, _ = _pair()
    config = TrainConfig(layers=2, hidden=(8,), epochs=1, batch_size=100, patience=0,
                         checkpoint_every=0, jit_compile=False, steps_per_call=1,
                         label_log_columns=(0,))
    train(x, config, tmp_path / "run", labels=c, verbose=0)
    assert load_run(tmp_path / "run").config.label_log_columns == (0,)
    with pytest.raises(InputError, match="label_log_columns"):
        TrainConfig(label_log_columns=(0, 0))
