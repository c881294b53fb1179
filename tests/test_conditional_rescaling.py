"""FlowConfig.conditional_rescaling: a rescaler whose location and log-scale are linear in the
labels, fitted by least squares in ``Flow.adapt``.

Independent truths: for x = a c + e^{b c} ε (ε ~ N(0, 1)) the least-squares slopes are a and b
(in the rescaler's standardised units), and a one-layer flow of such a family trained on three
label values gives the exact log-density at labels between them up to its chain's
small conditioning error (the Gaussian family is what the rescaler removes, so the chain has
almost nothing left to interpolate). The contract (normalisation, gradients, sampling) is
checked by the "conditionally rescaled flow" case of tests/test_density.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import tf_keras as keras
from scipy import stats

from tfgalflow.errors import InputError
from tfgalflow.export import export_model, rebuild_model
from tfgalflow.flows import FlowConfig
from tfgalflow.model import Flow

A, B = 3.0, 0.5           # x = A c + exp(B c) ε


def _family(n: int, labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    c = rng.choice(labels, size=n).astype(np.float64)[:, None]
    x = A * c + np.exp(B * c) * rng.normal(size=(n, 1))
    return x.astype(np.float32), c.astype(np.float32)


def test_adapt_finds_the_linear_location_and_log_scale():
    x, c = _family(40000, np.linspace(0, 2, 21), seed=0)
    flow = Flow(FlowConfig(dim=1, label_dim=1, layers=1, hidden=(4,),
                           conditional_rescaling=True)).adapt(x, c)
    s_x, s_c = float(flow.x_scale.numpy()[0]), float(flow.label_scale.numpy()[0])
    # slopes per standardised label unit, in units of the global σ_x (location) and in log σ
    shift_slope = float(flow.x_shift_slope.numpy()[0, 0]) * s_x / s_c
    log_scale_slope = float(flow.x_log_scale_slope.numpy()[0, 0]) / s_c
    # least squares on 4e4 rows: the location slope's standard error is ~0.01 (σ ≈ 1.6 over a
    # label spread of 0.6); the log|ε| fit is noisier (sd of log|ε| is 1.1): ~0.01 too. 5 errors.
    assert shift_slope == pytest.approx(A, abs=0.05)
    assert log_scale_slope == pytest.approx(B, abs=0.05)


def test_a_trained_family_is_exact_between_the_training_labels(tmp_path):
    x, c = _family(30000, np.array([0.0, 1.0, 2.0]), seed=1)
    flow = Flow(FlowConfig(dim=1, label_dim=1, layers=1, hidden=(8,), activation="tanh",
                           conditional_rescaling=True, seed=0)).adapt(x, c)
    flow.compile(optimizer=keras.optimizers.Adam(1e-2))
    flow.fit(x, c, epochs=10, batch_size=512, verbose=0)
    for label in (0.5, 1.5):                  # never trained on: between the nodes
        grid = np.linspace(A * label - 4 * np.exp(B * label), A * label + 4 * np.exp(B * label),
                           400, dtype=np.float32)[:, None]
        exact = stats.norm.logpdf(grid[:, 0], A * label, np.exp(B * label))
        got = flow.log_prob(grid, np.full((len(grid), 1), label, np.float32)).numpy()
        # the chain only has to be the identity, but its conditioning network is free between
        # the three nodes: 0.1 nat (mean |Δ log p| under p) allows that (measured 0.02-0.08);
        # without the conditional rescaler the untrained gap is 0.3-8.5 nat at these labels
        weights = np.exp(exact) / np.exp(exact).sum()
        assert np.sum(weights * np.abs(got - exact)) < 0.1, label
    # the fitted slopes travel with the weights: an exported and rebuilt flow agrees
    rebuilt = rebuild_model(export_model(flow, tmp_path / "cr"))
    c_test = np.full((len(grid), 1), 1.5, np.float32)
    np.testing.assert_allclose(rebuilt.log_prob(grid, c_test).numpy(),
                               flow.log_prob(grid, c_test).numpy(), rtol=1e-5, atol=1e-5)


def test_only_for_conditional_flows():
    with pytest.raises(InputError, match="conditional_rescaling"):
        FlowConfig(dim=2, conditional_rescaling=True)
    with pytest.raises(InputError, match="conditional_rescaling"):
        FlowConfig(dim=2, label_dim=1, conditional_rescaling="yes")


def test_rescaling_labels_leave_noise_columns_out_of_the_fit():
    """Few objects (8 label values) with a pure-noise label column beside the true one (an
    unregularised fit on all labels would give it slopes fitting the objects' own sampling
    fluctuations); with ``rescaling_labels=(0,)`` its rows of A and B are exactly 0 and
    the true column's slopes are still the analytic a and b (the noise column's standardisation
    still happens: it is the networks' input)."""
    rng = np.random.default_rng(3)
    objects = 8
    c0 = np.linspace(0.0, 2.0, objects)
    c1 = rng.normal(size=objects)                       # a latent carrying nothing on x
    which = rng.integers(objects, size=40000)
    x = (A * c0[which] + np.exp(B * c0[which]) * rng.normal(size=40000))[:, None]
    c = np.stack([c0[which], c1[which]], axis=1)
    x, c = x.astype(np.float32), c.astype(np.float32)
    flow = Flow(FlowConfig(dim=1, label_dim=2, layers=1, hidden=(4,),
                           conditional_rescaling=True, rescaling_labels=(0,))).adapt(x, c)
    s_x, s_c = float(flow.x_scale.numpy()[0]), flow.label_scale.numpy()
    shift = flow.x_shift_slope.numpy()[:, 0] * s_x / s_c
    log_scale = flow.x_log_scale_slope.numpy()[:, 0] / s_c
    assert shift[1] == 0.0 and log_scale[1] == 0.0
    # as in test_adapt_finds_the_linear_location_and_log_scale: ~0.01 standard errors; 5 errors
    assert shift[0] == pytest.approx(A, abs=0.05)
    assert log_scale[0] == pytest.approx(B, abs=0.05)


@pytest.mark.parametrize("field", ["rescaling_labels", "rescaling_columns"])
def test_rescaling_labels_and_columns_are_checked(field):
    # dim = label_dim = 3: index 3 is out of range for either
    with pytest.raises(InputError, match=field):
        FlowConfig(dim=3, label_dim=3, conditional_rescaling=True, **{field: (3,)})
    with pytest.raises(InputError, match=field):
        FlowConfig(dim=3, label_dim=3, **{field: (0,)})
    cfg = FlowConfig(dim=3, label_dim=3, conditional_rescaling=True, **{field: [2, 0]})
    assert getattr(cfg, field) == (0, 2)
    assert FlowConfig.from_dict(cfg.to_dict()) == cfg


def test_rescaling_columns_leave_the_other_columns_unconditional():
    """Column 0 follows the family x = a c + e^{b c} ε, column 1 a metallicity-like
    z = 2 c + 0.3 x₀ + ε that the rescaler must leave alone with ``rescaling_columns=(0,)``:
    column 0's slopes are the analytic a and b and equal those of the all-column fit (the least
    squares is column by column), column 1 keeps exactly the unconditional location and scale of
    a flow without conditional rescaling and zero slopes."""
    x0, c = _family(40000, np.linspace(0, 2, 21), seed=4)
    rng = np.random.default_rng(5)
    x = np.concatenate([x0, 2 * c + 0.3 * x0 + rng.normal(size=x0.shape)], axis=1)
    x = x.astype(np.float32)

    def adapted(**options):
        return Flow(FlowConfig(dim=2, label_dim=1, layers=1, hidden=(4,), **options)).adapt(x, c)

    plain = adapted()
    every = adapted(conditional_rescaling=True)
    first = adapted(conditional_rescaling=True, rescaling_columns=(0,))
    for name in ("x_shift", "x_scale", "x_shift_slope", "x_log_scale_slope"):
        np.testing.assert_allclose(getattr(first, name).numpy()[..., 0],
                                   getattr(every, name).numpy()[..., 0], rtol=1e-6)
    for name in ("x_shift", "x_scale"):
        assert getattr(first, name).numpy()[1] == getattr(plain, name).numpy()[1]
    assert first.x_shift_slope.numpy()[0, 1] == 0.0
    assert first.x_log_scale_slope.numpy()[0, 1] == 0.0
    assert every.x_shift_slope.numpy()[0, 1] != 0.0        # the all-column fit does move it
    s_x, s_c = float(first.x_scale.numpy()[0]), float(first.label_scale.numpy()[0])
    # as in test_adapt_finds_the_linear_location_and_log_scale: ~0.01 standard errors; 5 errors
    assert float(first.x_shift_slope.numpy()[0, 0]) * s_x / s_c == pytest.approx(A, abs=0.05)
    assert float(first.x_log_scale_slope.numpy()[0, 0]) / s_c == pytest.approx(B, abs=0.05)
