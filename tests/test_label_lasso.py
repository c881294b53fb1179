"""Label selection by the group lasso (Flow.set_label_lasso, TrainConfig.label_lasso), and the
refusals it shares with label noise (TrainConfig.label_noise)."""
import json

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from tfgalflow.errors import InputError
from tfgalflow.flows import FlowConfig, label_kernels
from tfgalflow.model import Flow
from tfgalflow.training import TrainConfig


def adapted_flow(kind: str = "affine", dim: int = 2, label_dim: int = 3, seed: int = 0) -> Flow:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(2048, label_dim)).astype(np.float32)
    x = (rng.normal(size=(2048, dim)) + c[:, :1]).astype(np.float32)
    flow = Flow(FlowConfig(dim=dim, label_dim=label_dim, layers=2, hidden=(16, 16), kind=kind,
                           seed=seed))
    return flow.adapt(x, c)


@pytest.mark.parametrize("kind,dim", [("affine", 2), ("spline", 2), ("spline", 1)])
def test_the_label_kernels_hold_every_weight_of_a_label_column(kind, dim):
    # The groups' promise: with row j of every label kernel zero, log p(x | c) and the samples do
    # not depend on c_j at all (exact in exact arithmetic: c_j only ever meets those zeros; atol
    # 1e-6 allows XLA's float32 re-association), while with the rows left they move by O(0.1).
    flow = adapted_flow(kind, dim)
    kernels = label_kernels(flow.bijector)
    assert len(kernels) == 2 * 3                  # 2 MADEs x (2 hidden blocks + output block)
    assert all(k.shape[0] == 3 for k in kernels)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(256, dim)).astype(np.float32)
    c = rng.uniform(-1.0, 1.0, size=(256, 3)).astype(np.float32)   # inside the training range
    c_moved = c.copy()
    c_moved[:, 1] += 1.0
    before = flow.log_prob(x, c).numpy()
    assert np.max(np.abs(flow.log_prob(x, c_moved).numpy() - before)) > 0.05
    for k in kernels:
        k.assign(tf.tensor_scatter_nd_update(k, [[1]], tf.zeros([1, k.shape[1]])))
    np.testing.assert_allclose(flow.log_prob(x, c_moved).numpy(), flow.log_prob(x, c).numpy(),
                               atol=1e-6)
    np.testing.assert_allclose(flow.sample(256, c_moved, seed=4).numpy(),
                               flow.sample(256, c, seed=4).numpy(), atol=1e-6)
    norms = flow.label_weight_norms()
    assert norms[1] < 1e-12
    expected = np.sqrt(sum(np.sum(k.numpy().astype(np.float64) ** 2, axis=1) for k in kernels))
    np.testing.assert_allclose(norms, expected, rtol=1e-5, atol=1e-12)


def test_a_lasso_step_adds_the_gradient_of_the_group_norms():
    # One SGD step (learning rate η) with the lasso differs from the plain step by exactly
    # -η λ V_{j·} / ‖V_{j·}‖ on every label kernel row and by nothing elsewhere: the gradient of
    # λ Σ_j ‖V_{j·}‖₂. η λ = 0.1 x 0.5 = 0.05 against float32 round-off ~1e-7 on the weights
    # (atol 1e-6).
    rng = np.random.default_rng(3)
    x = rng.normal(size=(128, 2)).astype(np.float32)
    c = rng.normal(size=(128, 3)).astype(np.float32)
    flows = []
    for lam in (0.5, 0.0):
        flow = adapted_flow()
        flow.set_label_lasso(lam)
        flow.compile(keras.optimizers.SGD(0.1))
        flows.append(flow)
    lasso, plain = flows
    start = {v.name: v.numpy() for v in label_kernels(lasso.bijector)}
    norms = lasso.label_weight_norms()
    lasso.train_on_batch(x, c)
    plain.train_on_batch(x, c)
    kernel_names = set(start)
    for a, b in zip(lasso.trainable_variables, plain.trainable_variables):
        expected = (-0.1 * 0.5 * start[a.name] / norms[:, None] if a.name in kernel_names
                    else np.zeros(a.shape))
        np.testing.assert_allclose(a.numpy() - b.numpy(), expected, atol=1e-6)


def test_the_lasso_drops_a_label_that_carries_no_information():
    # x | c ~ N(c_0, 0.5²); c_1 is independent noise. Plain maximum likelihood leaves c_1's
    # weights at ~0.6 of c_0's (measured: nothing pulls a useless direction back); with λ = 0.1
    # nat per unit norm they fall to ~0.02 of c_0's. Bounds 0.3 / 0.1 leave 2x and 4x margins.
    # The kept density stays right: its KL to the exact conditional, estimated on 20000 fresh
    # draws, measured 0.004 ± 0.001 nat (as without the lasso); bound 0.015.
    rng = np.random.default_rng(0)
    c = rng.normal(size=(4096, 2)).astype(np.float32)
    x = (c[:, :1] + 0.5 * rng.normal(size=(4096, 1))).astype(np.float32)
    ratios = {}
    for lam in (0.0, 0.1):
        flow = Flow(FlowConfig(dim=1, label_dim=2, layers=1, hidden=(16,), seed=0)).adapt(x, c)
        flow.set_label_lasso(lam)
        flow.compile(keras.optimizers.Adam(1e-2))
        flow.fit(x, c, batch_size=256, epochs=15, verbose=0)
        norms = flow.label_weight_norms()
        ratios[lam] = norms[1] / norms[0]
    assert ratios[0.0] > 0.3
    assert ratios[0.1] < 0.1
    c_test = np.clip(rng.normal(size=(20000, 2)), -3.0, 3.0).astype(np.float32)   # in range
    x_test = (c_test[:, :1] + 0.5 * rng.normal(size=(20000, 1))).astype(np.float32)
    exact = -0.5 * ((x_test[:, 0] - c_test[:, 0]) / 0.5) ** 2 - np.log(0.5 * np.sqrt(2 * np.pi))
    kl = np.mean(exact - flow.log_prob(x_test, c_test).numpy())
    assert kl < 0.015


@pytest.mark.parametrize("regulariser", ["label_lasso", "label_noise"])
def test_label_regularisers_are_refused_where_they_mean_nothing(regulariser):
    with pytest.raises(InputError, match=regulariser):
        TrainConfig(**{regulariser: -0.1})
    with pytest.raises(InputError, match="unconditional flow"):
        TrainConfig(**{regulariser: 0.1, "label_dim": 0})
    with pytest.raises(InputError, match="conditional flow"):
        getattr(Flow(FlowConfig(dim=2, layers=1, hidden=(8,))), f"set_{regulariser}")(0.1)
    assert getattr(TrainConfig(**{regulariser: "0.2"}), regulariser) == 0.2


def test_an_unconditional_flow_has_no_label_kernels():
    assert label_kernels(Flow(FlowConfig(dim=2, layers=1, hidden=(8,))).bijector) == []


def test_a_run_records_the_lasso_and_which_labels_the_flow_uses(tmp_path):
    # The run config keeps λ, and each member's final summary the norm of every label column's
    # weights by name, equal to Flow.label_weight_norms of the reloaded member.
    from tfgalflow.training import load_run, read_run_config, train

    rng = np.random.default_rng(5)
    c = rng.normal(size=(1024, 2))
    x = c[:, :1] + 0.5 * rng.normal(size=(1024, 1))
    config = TrainConfig(layers=1, hidden=(8,), epochs=1, batch_size=256, label_lasso=0.1,
                         validation_split=0, jit_compile=False)
    train(np.concatenate([x, rng.normal(size=(1024, 1))], 1), config, tmp_path / "run",
          labels=c, label_names=["signal", "noise"], verbose=0)
    assert read_run_config(tmp_path / "run")["train"]["label_lasso"] == 0.1
    summary = json.loads((tmp_path / "run" / "member_000" / "final" / "summary.json").read_text())
    norms = summary["label_weight_norms"]
    assert set(norms) == {"signal", "noise"}
    np.testing.assert_allclose([norms["signal"], norms["noise"]],
                               load_run(tmp_path / "run").label_weight_norms(), rtol=1e-6)
