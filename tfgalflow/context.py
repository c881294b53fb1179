"""The context network: a residual encoder of the labels that conditions every MADE of a flow.

A conditional MADE feeds the standardised labels c̃ [N, C] straight into its hidden layers, so
what the flow can learn of p(x | c) is limited by one or two dense layers acting on c̃. Where
the labels are many and the posterior depends on them in a complicated way (twenty fluxes and
errors whose break confusion makes p(z | c) bimodal), a deeper conditioner is needed, and a
plain deep MLP trains badly. The context network is a pre-norm residual MLP of width W:

    h_0     = W_in c̃ + b_in                                     [N, W]
    h_{k+1} = h_k + W2_k act(W1_k LN(h_k) + b1_k) + b2_k         (k = 0 .. K-1)
    h       = act(LN(h_K))                                       [N, W]

(LN: layer normalisation; He et al. 2016, "Identity Mappings in Deep Residual Networks";
Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture"). Each MADE then
takes h, not c̃, as its conditional input (``FlowConfig.context_blocks > 0``). The network runs
once per label row: it does not see x, so the autoregressive structure, the one-pass inverse
and the per-row grid evaluation of 1-D flows are unchanged.

``W_in`` [C, W] is the only weight that reads the labels: it is the label kernel of the group
lasso (:meth:`tfgalflow.model.Flow.set_label_lasso`) for a flow with a context network.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

from .errors import InputError  # noqa: E402

#: the context network's initialisation streams are [seed, CONTEXT_STREAM + k], apart from the
#: MADEs' [seed, 1000 i + k] for i < 1000 layers
CONTEXT_STREAM = 10**6


class ContextNetwork(keras.layers.Layer):
    """Pre-norm residual encoder c̃ [N, C] -> h [N, W] (module docstring).

    Args:
        label_dim: C, the width of the standardised labels.
        width: W, the width of the context (and of every block).
        blocks: K >= 1 residual blocks.
        activation: the blocks' activation and the output's (a Keras activation name).
        seed: weight-initialisation seed; the weights are a deterministic function of it.
    """

    def __init__(self, label_dim: int, width: int, blocks: int, activation: str, seed: int,
                 name: str = "context", **kwargs):
        super().__init__(name=name, **kwargs)
        if label_dim < 1 or width < 1 or blocks < 1:
            raise InputError(f"ContextNetwork: label_dim = {label_dim}, width = {width}, "
                             f"blocks = {blocks}: expected integers >= 1")
        self.label_dim, self.width, self.blocks = int(label_dim), int(width), int(blocks)
        self.activation = keras.activations.get(activation)

        def dense(k: int, name: str, activation: str | None = None) -> keras.layers.Dense:
            init = keras.initializers.GlorotUniform(seed=int(seed) * 7919 + CONTEXT_STREAM + k)
            return keras.layers.Dense(self.width, activation=activation, kernel_initializer=init,
                                      name=name)

        self.input_dense = dense(0, "input")
        self.residuals = [
            (keras.layers.LayerNormalization(name=f"norm_{k}"),
             dense(2 * k + 1, f"inner_{k}", activation),
             dense(2 * k + 2, f"outer_{k}"))
            for k in range(self.blocks)
        ]
        self.output_norm = keras.layers.LayerNormalization(name="norm_out")
        self.build(tf.TensorShape([None, self.label_dim]))

    def build(self, input_shape) -> None:
        """Create every weight (called by the constructor, so they exist before any call)."""
        self.input_dense.build(input_shape)
        shape = tf.TensorShape([None, self.width])
        for norm, inner, outer in self.residuals:
            norm.build(shape)
            inner.build(shape)
            outer.build(shape)
        self.output_norm.build(shape)
        super().build(input_shape)

    def call(self, labels: tf.Tensor) -> tf.Tensor:
        """h [N, W] for standardised labels c̃ [N, C]."""
        h = self.input_dense(labels)
        for norm, inner, outer in self.residuals:
            h = h + outer(inner(norm(h)))
        return self.activation(self.output_norm(h))

    @property
    def label_kernel(self) -> tf.Variable:
        """W_in [C, W]: the only weights that read the labels (row j: label column j)."""
        return self.input_dense.kernel
