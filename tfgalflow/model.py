"""The density model: rescaler + MAF chain + standard-normal base, as a Keras model; and ensembles.

For data x in physical units (e.g. kpc, km/s) and optional labels c, a :class:`Flow` evaluates

    u_j = log x_j  (j in log_columns),   u_j = x_j  (otherwise)
    u_j = log(x_j / (b_j − x_j))  (log columns with an upper bound b_j, FlowConfig.upper_bounds)
    y   = (u - μ) / σ                                   (rescaler, fitted by ``adapt``)
    z   = T^{-1}(y; c̃),  c̃ = (v - μ_c) / σ_c  (MAF chain, :func:`tfgalflow.flows.build_bijector`)
    v_k = log c_k  (k in label_log_columns),   v_k = asinh(c_k / s_k)  ((k, s_k) in label_asinh),
    v_k = c_k  (otherwise)

    log p_x(x | c) = log N(z; 0, I) + log|det ∂z/∂y| - Σ_j log σ_j + Σ_j log |du_j/dx_j|,

With ``FlowConfig.conditional_rescaling`` the rescaler depends on the labels,

    μ(c) = μ + σ ⊙ (c̃ A),   log σ(c) = log σ + c̃ B          (A, B [C, D], fitted by ``adapt``),

(a, A) by least squares of (u - μ₀)/σ₀ on (1, c̃) (c̃: the ``rescaling_labels`` columns, all by
default; the other rows of A and B are 0; data columns outside ``rescaling_columns``, if given,
keep a = b = 0 and zero columns of A and B), (b, B) by least squares of
log|(u - μ₀)/σ₀ - a - c̃ A| + (γ + log 2)/2 on (1, c̃) (for a Gaussian column E log|ε| = log of its
scale - (γ + log 2)/2), μ₀, σ₀ the unconditional moments, μ = μ₀ + σ₀ a and σ = σ₀ e^b (the
location and scale at the mean label; A is stored in units of σ).
Location and scale that change linearly with the labels (a galaxy's size, its velocity scale)
are then removed before the chain, which learns only what is left and so interpolates between
training labels far better than when it must learn them from a few distinct labels.

the change-of-variables formula (Papamakarios et al. 2021, "Normalizing Flows for Probabilistic
Modeling and Inference", eq. 2) with the rescaling Jacobian included, so densities are per unit
physical volume (e.g. per kpc^3 (km/s)^3). Points outside the support (x_j <= 0 in a log column)
have log p = -inf. Sampling runs the chain forward from z ~ N(0, I) and undoes the rescaling.

Both implement the density contract (:class:`tfgalflow.density.Density`): the maths is in
``log_prob_tensor`` / ``sample_tensor``, and the contract adds the validated, traced public
methods. The traced graphs contain only core TensorFlow ops, so a SavedModel of them reloads
without TFP.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import tensorflow as tf
import tf_keras as keras

from .context import ContextNetwork
from .density import Density, as_float32, shape_of, validate_inputs
from .errors import InputError
from .flows import (
    FlowConfig,
    build_bijector,
    forward,
    inverse_and_log_det,
    inverse_and_log_det_grid,
    label_kernels,
    layer_names,
)
from .validation import positive_number

LOG_2PI = math.log(2.0 * math.pi)


def _free_batch(t: tf.Tensor) -> tf.Tensor:
    """Forget a static batch size inside a graph (identity on values).

    With a static batch (e.g. a dataset batched with ``drop_remainder=True``), TF 2.21's Grappler
    remapper fails on the conditional MADE (MatMul+BiasAdd+Add+Relu) with "Node ... has an empty op
    name", logs three errors and discards its fusions for the whole step function. A
    ``PlaceholderWithDefault`` of shape [None, ...] gives the same graph as ``fit(arrays)`` does.
    """
    if tf.executing_eagerly() or t.shape.rank is None or t.shape[0] is None:
        return t
    return tf.compat.v1.placeholder_with_default(t, shape=[None] + t.shape.as_list()[1:])



# ---- the flow -------------------------------------------------------------------------------

def _check_weights_format(filepath: Any, save_format: str | None) -> None:
    """InputError for the HDF5 weights format, which misses the bijectors' networks."""
    name = str(filepath).lower()
    if save_format == "h5" or name.endswith((".h5", ".hdf5", ".keras")):
        raise InputError(
            f"{filepath}: a Flow's weights cannot be stored in the HDF5/Keras format (it would "
            f"miss the MADE networks inside the bijectors); use a TensorFlow checkpoint path "
            f"without that suffix, e.g. 'flow.ckpt'"
        )


class Flow(Density, keras.Model):
    """Conditional normalizing flow p(x | c) on physical-unit data
    (rescaler + MAF chain + N(0, I) base).

    Example::

        flow = Flow(FlowConfig(dim=6, layers=6, hidden=(64, 64)))
        flow.adapt(w)                              # w: [N, 6] (kpc, km/s)
        flow.compile(keras.optimizers.Adam(1e-3))
        flow.fit(w, epochs=20, batch_size=512)     # conditional: flow.fit(w, labels, ...)
        flow.log_prob(w[:10])                      # [10], log density per kpc^3 (km/s)^3
        flow.sample(1000, seed=1)                  # [1000, 6]

    The rescaler is a set of non-trainable variables (saved with the weights): ``x_shift``,
    ``x_scale`` [D], ``label_shift``, ``label_scale`` [C], ``adapted`` (1.0 once ``adapt`` ran),
    and the training label range ``label_min``, ``label_max`` [C]
    (:meth:`label_range`; labels outside it warn). All variables exist after construction
    (the network is called once on a dummy batch), so ``load_weights`` or
    ``tf.train.Checkpoint(model=flow).restore(...)`` works on a fresh ``Flow(config)``.

    Args:
        config: a :class:`FlowConfig` or its ``to_dict()``.
        jit_compile: run eager ``log_prob`` / ``grad_log_prob`` / ``sample`` XLA-compiled on
            row buckets (:func:`tfgalflow.density.row_bucket`; the default, faster per call for
            one compilation per bucket met: ``benchmarks/bench_flows.py`` and
            ``benchmarks/bench_call_overhead.py`` measure); False runs the plain graphs. Export
            and calls inside another ``tf.function`` always use the plain graphs.
    """

    what = "flow"

    def __init__(
        self, config: FlowConfig | Mapping[str, Any], jit_compile: bool = True, **kwargs
    ):
        if isinstance(config, Mapping):
            config = FlowConfig.from_dict(config)
        if not isinstance(config, FlowConfig):
            raise InputError(
                f"Flow(config): expected a FlowConfig or dict, got {type(config).__name__}"
            )
        kwargs.setdefault("name", "flow")
        super().__init__(**kwargs)
        self._flow_config = config
        self.bijector = build_bijector(config)
        # labels -> context h [N, W] that conditions every MADE (None: the labels themselves)
        self.context = (ContextNetwork(config.label_dim, config.context_width,
                                       config.context_blocks, config.activation, config.seed)
                        if config.context_blocks else None)
        self._layer_names = layer_names(config)
        dim, label_dim = config.dim, config.label_dim
        self._log_mask = tf.constant([j in config.log_columns for j in range(dim)], tf.bool)
        bounds = dict(config.upper_bounds)
        self._bound_mask = tf.constant([j in bounds for j in range(dim)], tf.bool)
        self._upper = tf.constant([bounds.get(j, 1.0) for j in range(dim)], tf.float32)
        self._label_log_mask = tf.constant(
            [k in config.label_log_columns for k in range(label_dim)], tf.bool)
        softening = dict(config.label_asinh)
        self._label_asinh_mask = tf.constant([k in softening for k in range(label_dim)], tf.bool)
        self._label_asinh_scale = tf.constant(
            [softening.get(k, 1.0) for k in range(label_dim)], tf.float32)
        self.x_shift = self.add_weight(
            name="x_shift", shape=[dim], initializer="zeros", trainable=False
        )
        self.x_scale = self.add_weight(
            name="x_scale", shape=[dim], initializer="ones", trainable=False
        )
        self.label_shift = self.add_weight(
            name="label_shift", shape=[label_dim], initializer="zeros", trainable=False
        )
        self.label_scale = self.add_weight(
            name="label_scale", shape=[label_dim], initializer="ones", trainable=False
        )
        self.adapted = self.add_weight(
            name="adapted", shape=[], initializer="zeros", trainable=False
        )
        # the training label range [C] (set by adapt): labels outside it are extrapolation (warned)
        self.label_min = self.add_weight(name="label_min", shape=[label_dim], initializer="zeros",
                                         trainable=False)
        self.label_max = self.add_weight(name="label_max", shape=[label_dim], initializer="zeros",
                                         trainable=False)
        if config.conditional_rescaling:
            # μ(c), log σ(c) slopes [C, D] in the standardised labels (set by adapt)
            self.x_shift_slope = self.add_weight(
                name="x_shift_slope", shape=[label_dim, dim], initializer="zeros",
                trainable=False)
            self.x_log_scale_slope = self.add_weight(
                name="x_log_scale_slope", shape=[label_dim, dim], initializer="zeros",
                trainable=False)
        self._loss_tracker = keras.metrics.Mean(name="loss")
        self.noise_model = None
        self.label_noise, self._label_noise_seed = 0.0, 0
        self.label_lasso = 0.0
        self.build_variables()
        self.jit_log_prob = bool(jit_compile)

    # -- configuration ---------------------------------------------------------------------------
    @property
    def config(self) -> FlowConfig:
        """The flow's :class:`~tfgalflow.flows.FlowConfig` (architecture, widths, seed)."""
        return self._flow_config

    @property
    def dim(self) -> int:
        """D, the width of x."""
        return self._flow_config.dim

    @property
    def label_dim(self) -> int:
        """C, the width of the labels (0: unconditional)."""
        return self._flow_config.label_dim

    @property
    def is_adapted(self) -> bool:
        """Whether ``adapt`` has fitted the rescaler."""
        return bool(self.adapted.numpy() > 0.5)

    def save_weights(self, filepath: Any, *args: Any, **kwargs: Any) -> Any:
        """Keras ``save_weights`` in the TensorFlow checkpoint format (a path without ``.h5``).

        The HDF5 weights format stores only Keras layers' weights, not the MADE networks inside
        the TFP bijectors, so a flow reloaded from it has other weights: InputError instead.
        """
        _check_weights_format(filepath, kwargs.get("save_format"))
        return super().save_weights(filepath, *args, **kwargs)

    def load_weights(self, filepath: Any, *args: Any, **kwargs: Any) -> Any:
        """Keras ``load_weights`` from a TensorFlow checkpoint (InputError for ``.h5`` files,
        see :meth:`save_weights`).
        """
        _check_weights_format(filepath, None)
        return super().load_weights(filepath, *args, **kwargs)

    def get_config(self) -> dict:
        """``FlowConfig.to_dict()`` (JSON-able); ``Flow.from_config(flow.get_config())`` rebuilds
        the flow.
        """
        return self._flow_config.to_dict()

    @classmethod
    def from_config(cls, config: Mapping[str, Any], custom_objects: Any = None) -> "Flow":
        """A new (untrained) flow from ``get_config()``'s dict (Keras' protocol)."""
        return cls(FlowConfig.from_dict(config))

    def build_variables(self) -> None:
        """Create every variable by evaluating log_prob on a dummy batch of one row
        (idempotent).
        """
        x = tf.ones([1, self.dim], tf.float32)
        # Through keras.Model.__call__, so Keras also records the input spec it needs when the
        # model is saved as part of a tf.Module (export) -- without it tf.saved_model.save refuses
        # the Flow.
        self((x, tf.zeros([1, self.label_dim], tf.float32)) if self.label_dim else x)

    # -- rescaler --------------------------------------------------------------------------------
    def adapt(self, x: Any, labels: Any = None) -> "Flow":
        """Fit the rescaler to data in physical units: μ, σ per column of u (log x in log columns).

        Args:
            x: [N, D] array/tensor, or a ``tf.data.Dataset`` yielding x [B, D] or
               (x [B, D], labels [B, C]) (streamed; moments accumulated in float64).
            labels: [N, C] for conditional flows (not with a Dataset). Label columns are
               standardised the same way, after log c_k in ``label_log_columns``
               (a constant label column gets σ_c = 1).
        Raises InputError for bad shapes, NaN/inf, x_j <= 0 in a log column or c_k <= 0 in a label
        log column (the message names the column), or a constant data column.
        """
        data_moments = _Moments(self.dim)
        label_moments = _Moments(self.label_dim)
        for u, v in self._adapt_rows(x, labels):
            data_moments.update(u)
            if v is not None:
                label_moments.update(v)
        if data_moments.count < 2:
            raise InputError(
                f"adapt: need at least 2 rows of x [N, {self.dim}], got {data_moments.count}"
            )
        mean, std = data_moments.mean_std()
        flat = np.nonzero(~(std > 0))[0]
        if flat.size:
            raise InputError(
                f"adapt: data column(s) {flat.tolist()} of x [N, {self.dim}] are constant; "
                f"a flow cannot model a zero-width column"
            )
        self.x_shift.assign(mean.astype(np.float32))
        self.x_scale.assign(std.astype(np.float32))
        if self.label_dim:
            c_mean, c_std = label_moments.mean_std()
            self.label_shift.assign(c_mean.astype(np.float32))
            self.label_scale.assign(np.where(c_std > 0, c_std, 1.0).astype(np.float32))
            self.label_min.assign(label_moments.low.astype(np.float32))
            self.label_max.assign(label_moments.high.astype(np.float32))
        if self.config.conditional_rescaling:
            self._fit_conditional_rescaling(x, labels)
        self.adapted.assign(1.0)
        return self

    def _adapt_rows(self, x: Any, labels: Any) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """(u [B, D], v [B, C] | None) float64 batches of adapt's input (one batch for arrays):
        u = x with log x_j in the log columns, v = the labels with log c_k in the label log
        columns. InputError as :meth:`adapt` documents.
        """
        if isinstance(x, tf.data.Dataset):
            if labels is not None:
                raise InputError(
                    "adapt: pass labels inside the Dataset as (x, labels) elements, not separately"
                )
            for element in x:
                bx, bc = (element if isinstance(element, (tuple, list)) else (element, None))[:2]
                yield self._adapt_batch(bx, bc)
        else:
            yield self._adapt_batch(x, labels)

    def _adapt_batch(self, x: Any, labels: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """One batch of :meth:`_adapt_rows`, validated."""
        x, c = self.check_inputs(x, labels)
        u = x.numpy().astype(np.float64)
        bounds = dict(self.config.upper_bounds)
        for j in self.config.log_columns:
            bad = u[:, j] <= 0
            if bad.any():
                raise InputError(
                    f"adapt: column {j} is a log column but has {int(bad.sum())} value(s) <= 0 "
                    f"(first at row {int(np.argmax(bad))}); log columns must be > 0"
                )
            if j in bounds:
                bad = u[:, j] >= bounds[j]
                if bad.any():
                    raise InputError(
                        f"adapt: column {j} is bounded above by {bounds[j]:g} "
                        f"(FlowConfig.upper_bounds) but has {int(bad.sum())} value(s) >= it "
                        f"(first at row {int(np.argmax(bad))})")
                u[:, j] = np.log(u[:, j] / (bounds[j] - u[:, j]))
            else:
                u[:, j] = np.log(u[:, j])
        v = None if c is None else self._encoded_labels(c.numpy().astype(np.float64), "adapt")
        return u, v

    def _fit_conditional_rescaling(self, x: Any, labels: Any) -> None:
        """A, B of the conditional rescaler (module docstring) by least squares: two passes."""
        # E log|ε| of ε ~ N(0, 1): -(γ + log 2) / 2
        log_abs_normal = -0.5 * (np.euler_gamma + math.log(2.0))
        mu, sigma = (v.numpy().astype(np.float64) for v in (self.x_shift, self.x_scale))
        c_mu, c_sigma = (v.numpy().astype(np.float64) for v in (self.label_shift,
                                                                 self.label_scale))
        # the regressors: FlowConfig.rescaling_labels (all label columns when empty); the others
        # keep slope 0
        used = list(self.config.rescaling_labels) or list(range(self.label_dim))
        slopes = []
        for target in ("mean", "log_scale"):
            gram = np.zeros((len(used) + 1, len(used) + 1))
            moment = np.zeros((len(used) + 1, self.dim))
            for u, v in self._adapt_rows(x, labels):
                y, c = (u - mu) / sigma, ((v - c_mu) / c_sigma)[:, used]        # standardised
                design = np.concatenate([np.ones((len(c), 1)), c], axis=1)
                if target == "log_scale":
                    residual = np.abs(y - design @ slopes[0])
                    y = np.log(np.maximum(residual, 1e-12)) - log_abs_normal
                gram += design.T @ design
                moment += design.T @ y
            # a label column constant in the data (σ_c = 1, c̃ = 0) gets slope 0 (lstsq min-norm)
            fit = np.linalg.lstsq(gram, moment, rcond=None)[0]
            if self.config.rescaling_columns:        # the other columns: unconditional
                fit[:, np.setdiff1d(np.arange(self.dim), self.config.rescaling_columns)] = 0.0
            slopes.append(fit)
        full = [np.zeros((self.label_dim, self.dim)) for _ in slopes]
        for f, fitted in zip(full, slopes):
            f[used] = fitted[1:]
        # intercepts [D] into μ and σ (the conditional location and scale at c̃ = 0), slopes
        # [C, D] into A and B
        self.x_shift.assign((mu + sigma * slopes[0][0]).astype(np.float32))
        self.x_scale.assign((sigma * np.exp(slopes[1][0])).astype(np.float32))
        # A in units of the new σ: σ c̃ A = σ₀ c̃ A₀
        self.x_shift_slope.assign((full[0] * np.exp(-slopes[1][0])).astype(np.float32))
        self.x_log_scale_slope.assign(full[1].astype(np.float32))

    def _encoded_labels(self, c: np.ndarray, where: str) -> np.ndarray:
        """c [N, C] with log c_k in the label log columns and asinh(c_k / s_k) in the
        ``label_asinh`` ones; InputError naming a log column with c <= 0.
        """
        if not self.config.label_log_columns and not self.config.label_asinh:
            return c
        c = np.array(c, dtype=np.float64)
        for k, scale in self.config.label_asinh:
            c[:, k] = np.arcsinh(c[:, k] / scale)
        for k in self.config.label_log_columns:
            bad = ~(c[:, k] > 0)
            if bad.any():
                raise InputError(f"{where}: label column {k} is a label log column but has "
                                 f"{int(bad.sum())} value(s) <= 0 (first at row "
                                 f"{int(np.argmax(bad))}); "
                                 f"label log columns must be > 0")
            c[:, k] = np.log(c[:, k])
        return c

    def check_inputs(self, x: Any, labels: Any = None) -> tuple[tf.Tensor, tf.Tensor | None]:
        """The contract's checks, plus c_k > 0 in every label log column (for concrete labels)."""
        x, c = super().check_inputs(x, labels)
        if c is not None and self.config.label_log_columns and tf.executing_eagerly():
            self._encoded_labels(c.numpy(), "labels")
        return x, c

    def _location_scale(self, c: tf.Tensor | None) -> tuple[tf.Tensor, tf.Tensor]:
        """(μ(c), log σ(c)) of the rescaler: [D] each, or [N, D] with conditional rescaling."""
        log_sigma = tf.math.log(self.x_scale)
        if not self.config.conditional_rescaling or c is None:
            return self.x_shift, log_sigma
        c_std = self._standardised_labels(c)
        return (self.x_shift + self.x_scale * tf.matmul(c_std, self.x_shift_slope),
                log_sigma + tf.matmul(c_std, self.x_log_scale_slope))

    def _rescale(self, x: tf.Tensor, c: tf.Tensor | None = None
                 ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor | None]:
        """y = (u - μ(c))/σ(c), log|det ∂y/∂x| = -Σ log σ(c) - Σ_log-cols log x, support:
        ([N, D], [N] or [], [N] | None).
        """
        shift, log_sigma = self._location_scale(c)
        log_jacobian = -tf.reduce_sum(log_sigma, axis=-1)
        u, log_du, in_support = self._unbounded(x)
        if in_support is not None:
            log_jacobian = log_jacobian + tf.reduce_sum(log_du, axis=-1)
            in_support = tf.reduce_all(in_support, axis=-1)
        y = (u - shift) * tf.exp(-log_sigma)
        return y, log_jacobian, in_support

    def _unbounded(self, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor | None, tf.Tensor | None]:
        """(u, log |du/dx|, in support) elementwise for x [..., D] (the last axis the columns):
        u = log x in the log columns, log(x / (b − x)) in the bounded ones
        (FlowConfig.upper_bounds; log |du/dx| = log b − log x − log(b − x)), x elsewhere;
        (x, None, None) without log columns. Outside the support (x ≤ 0, x ≥ b) u and its
        Jacobian are finite placeholders.
        """
        if not self.config.log_columns:
            return x, None, None
        positive = x > 0.0
        log_safe = tf.math.log(tf.where(self._log_mask & positive, x, tf.ones_like(x)))
        u = tf.where(self._log_mask, log_safe, x)
        log_du = -log_safe                     # 0 outside the log columns
        in_support = positive | ~self._log_mask
        if self.config.upper_bounds:
            below = x < self._upper
            gap = tf.where(self._bound_mask & below, self._upper - x, tf.ones_like(x))
            log_gap = tf.math.log(gap)         # 0 outside the bounded columns
            u = tf.where(self._bound_mask, log_safe - log_gap, u)
            log_du = log_du - log_gap + tf.where(self._bound_mask, tf.math.log(self._upper), 0.0)
            in_support = in_support & (below | ~self._bound_mask)
        return u, log_du, in_support

    def _unscale(self, y: tf.Tensor, c: tf.Tensor | None = None) -> tf.Tensor:
        shift, log_sigma = self._location_scale(c)
        u = y * tf.exp(log_sigma) + shift
        if not self.config.log_columns:
            return u
        x = tf.where(self._log_mask, tf.exp(tf.where(self._log_mask, u, tf.zeros_like(u))), u)
        if self.config.upper_bounds:        # x = b σ(u), the inverse of u = log(x / (b − x))
            # u ≤ 15: float32 σ(u) rounds to 1 (x = b, outside the support) from u ≈ 16.6; the
            # clip moves draws of probability ~e^-15 into the last 3e-7 of the interval
            x = tf.where(self._bound_mask, self._upper * tf.sigmoid(tf.minimum(u, 15.0)), x)
        return x

    def _bijector_kwargs(self, c: tf.Tensor | None) -> dict:
        if not self.label_dim:
            return {}
        c_std = self._standardised_labels(c)
        if self.context is not None:
            c_std = self.context(c_std)
        return {name: {"conditional_input": c_std} for name in self._layer_names}

    def _standardised_labels(self, c: tf.Tensor) -> tf.Tensor:
        """c̃ = (v - μ_c) / σ_c [N, C] (v = log c in the label log columns, asinh(c / s) in the
        ``label_asinh`` ones).
        """
        if self.config.label_asinh:
            c = tf.where(self._label_asinh_mask, tf.asinh(c / self._label_asinh_scale), c)
        if self.config.label_log_columns:
            # log c in the log columns (NaN/-inf for c <= 0, which check_inputs/adapt refuse);
            # the other columns take log 1 in the unused branch so their gradients stay finite.
            safe = tf.where(self._label_log_mask, c, tf.ones_like(c))
            c = tf.where(self._label_log_mask, tf.math.log(safe), c)
        return (c - self.label_shift) / self.label_scale

    # -- pure tensor maths (traced by the graph functions, by train_step and by Ensemble) ---------
    def log_prob_tensor(self, x: tf.Tensor, labels: tf.Tensor | None = None) -> tf.Tensor:
        """log p(x | labels) [N]: the change of variables of the module docstring, as TF ops."""
        y, log_jacobian, in_support = self._rescale(x, labels)
        kwargs = self._bijector_kwargs(labels)
        z, log_det = inverse_and_log_det(self.bijector, y, kwargs)
        log_base = -0.5 * tf.reduce_sum(tf.square(z), axis=-1) - 0.5 * self.dim * LOG_2PI
        lp = log_base + log_det + log_jacobian
        if in_support is not None:
            lp = tf.where(in_support, lp, tf.fill(tf.shape(lp), -np.inf))
        return lp

    def label_range(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(min [C], max [C]) of the labels ``adapt`` saw (the training range, in label units
        also for label log columns), None before adapt or for an unconditional flow. Saved with
        the weights (non-trainable ``label_min``/``label_max``).
        """
        if not self.label_dim or not self.is_adapted:
            return None
        low = self.label_min.numpy().astype(np.float64)
        high = self.label_max.numpy().astype(np.float64)
        # adapt records asinh(c_k / s_k) for the label_asinh columns: back to label units
        for k, scale in self.config.label_asinh:
            low[k], high[k] = scale * math.sinh(low[k]), scale * math.sinh(high[k])
        # adapt records log c_k for the label log columns: back to label units
        for k in self.config.label_log_columns:
            low[k], high[k] = math.exp(low[k]), math.exp(high[k])
        return low, high

    def scale_hint(self) -> tf.Variable:
        """The rescaler's scales σ [D] (the variable itself: read when traced, so current after
        adapt).
        """
        return self.x_scale

    def sample_tensor(
        self, n: tf.Tensor | None, c: tf.Tensor | None, seed: tf.Tensor
    ) -> tf.Tensor:
        """x = unscale(T(z; c)), z ~ N(0, I) [n, D] from a stateless seed [2]
        (truncated passes).
        """
        if c is not None:
            n = tf.shape(c)[0]
        return self.transform_noise_tensor(self.noise_tensor(n, seed), c)

    def noise_tensor(self, n: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        """Base draws z ~ N(0, I) [n, D] from a stateless seed [2] (the random part of
        :meth:`sample_tensor`).
        """
        return tf.random.stateless_normal(tf.stack([n, self.dim]), seed=seed, dtype=tf.float32)

    def transform_noise_tensor(self, z: tf.Tensor, c: tf.Tensor | None) -> tf.Tensor:
        """x = unscale(T(z; c)) [n, D] for base draws z [n, D] and labels c [n, C] | None."""
        return self._unscale(forward(self.bijector, z, self._bijector_kwargs(c)), c)

    def log_prob_grid_tensor(self, grid: tf.Tensor, labels: tf.Tensor | None = None) -> tf.Tensor:
        """log p(x_g | labels_n) [N, G] of a 1-D flow at every grid value x_g [G] for every label
        row [N, C].

        The same numbers as ``log_prob_tensor`` on the N·G pairs (x_g, c_n), but each layer's
        conditioning network runs once per row (:func:`tfgalflow.flows.inverse_and_log_det_grid`).
        Without labels (unconditional) N = 1. InputError unless dim = 1.
        """
        if self.dim != 1:
            raise InputError(
                f"log_prob_grid_tensor needs a 1-D flow; this {self.what} has dim = {self.dim}"
            )
        x = tf.reshape(tf.cast(grid, tf.float32), [1, -1])
        rows = 1 if labels is None else tf.shape(labels)[0]
        x = tf.tile(x, tf.stack([rows, 1]))                                  # [N, G]
        shift, log_sigma = self._location_scale(labels)      # [1] or [N, 1] (conditional)
        shift, log_sigma = shift[..., :1], log_sigma[..., :1]
        log_jacobian = -log_sigma
        u, log_du, in_support = self._unbounded(x[..., None])     # the one column, [N, G, 1]
        if in_support is not None:
            x, in_support = u[..., 0], in_support[..., 0]
            log_jacobian = log_jacobian + log_du[..., 0]
        y = (x - shift) * tf.exp(-log_sigma)
        z, log_det = inverse_and_log_det_grid(self.bijector, y, self._bijector_kwargs(labels))
        lp = -0.5 * tf.square(z) - 0.5 * LOG_2PI + log_det + log_jacobian
        if in_support is not None:
            lp = tf.where(in_support, lp, tf.fill(tf.shape(lp), -np.inf))
        return lp

    # -- Keras ------------------------------------------------------------------------------------
    def call(self, inputs, training=None):
        """log p for ``inputs`` = x or (x, labels); Keras' forward pass."""
        x, c, _ = self._unpack(inputs)
        return self.log_prob_tensor(x, c)

    def _unpack(self, data, dim: int | None = None
                ) -> tuple[tf.Tensor, tf.Tensor | None, tf.Tensor | None]:
        """(x, labels | None, sample_weight [N] | None) from Keras data: x, (x, labels) or
        (x, labels, w); x [N, ``dim``] (default the flow's D; the catalogue width of noisy rows,
        :meth:`_row_dim`).
        """
        x, c, w = _split_keras_data(data)
        if self.label_dim == 0 and c is not None and c.shape.rank == 2 and c.shape[1] == 0:
            # zero-width labels: how unconditional flows get sample weights (see train_step)
            c = None
        x, c = validate_inputs(x, c, dim or self.dim, self.label_dim, self.what)
        if w is not None:
            w = tf.reshape(tf.cast(w, tf.float32), [-1])
        return _free_batch(x), (_free_batch(c) if c is not None else None), w

    def _unpack_stack(self, data, dim: int | None = None
                      ) -> tuple[tf.Tensor, tf.Tensor | None, tf.Tensor | None]:
        """(x [K, B, D], labels [K, B, C] | None, sample_weight [K, B] | None) from a stack of K
        batches.

        The same conventions as :meth:`_unpack` (zero-width labels [K, B, 0] of an unconditional
        flow are dropped); K and B are made dynamic (see :func:`_free_stack`). InputError for wrong
        shapes.
        """
        x, c, w = _split_keras_data(data)
        x, dim = as_float32(x, "x"), dim or self.dim
        if x.shape[2] is not None and x.shape[2] != dim:
            raise InputError(
                f"stacked x has shape {shape_of(x)}; the {self.what} expects [K, B, {dim}]"
            )
        if c is not None and self.label_dim == 0 and c.shape.rank == 3 and c.shape[2] == 0:
            c = None
        if c is None and self.label_dim:
            raise InputError(
                f"the {self.what} is conditional: stacked labels [K, B, {self.label_dim}] are "
                f"required (x has shape {shape_of(x)})"
            )
        if c is not None:
            if not self.label_dim:
                raise InputError(
                    f"labels were given (shape {shape_of(c)}) but the {self.what} is "
                    "unconditional (label_dim = 0)"
                )
            c = as_float32(c, "labels")
            if (
                c.shape.rank != 3
                or (c.shape[2] is not None and c.shape[2] != self.label_dim)
                or not (c.shape[:2].is_compatible_with(x.shape[:2]))
            ):
                raise InputError(
                    f"stacked labels have shape {shape_of(c)}; with x {shape_of(x)} the "
                    f"{self.what} expects [K, B, {self.label_dim}]"
                )
            c = _free_stack(c)
        if w is not None:
            w = tf.reshape(tf.cast(w, tf.float32), tf.shape(x)[:2])
        return _free_stack(x), c, w

    @property
    def metrics(self):
        """The metrics Keras resets each epoch: the mean loss (nats per point)."""
        return [self._loss_tracker]

    def compile(self, optimizer="rmsprop", **kwargs):
        """keras.Model.compile; no loss is needed (it is -log p). ``weighted_metrics`` defaults to
        [] so that sample weights, which the loss already uses, do not trigger Keras'
        missing-metrics warning.
        """
        kwargs.setdefault("weighted_metrics", [])
        super().compile(optimizer=optimizer, **kwargs)

    def _loss(self, lp: tf.Tensor, w: tf.Tensor | None) -> tf.Tensor:
        """This replica's share of the global-batch loss -Σ_n w_n log p_n / Σ_n w_n (w_n = 1
        without weights: the mean over the global batch).

        One replica: the batch is the global batch, loss = -Σ w log p / Σ w. Under a
        ``tf.distribute`` strategy with R > 1 replicas (MirroredStrategy,
        MultiWorkerMirroredStrategy) replica r sees rows S_r of the global batch and the
        optimizer sums the R replicas' gradients, so replica r returns

            L_r = -Σ_{n ∈ S_r} w_n log p_n / Σ_{r'} Σ_{n ∈ S_r'} w_n,

        its numerator local and the denominator all-reduced (SUM) over the replicas: Σ_r ∇L_r
        is the gradient of the global mean for *any* split -- uneven pieces (a global batch of
        1025 rows as 513 + 512, an epoch's short last batch as 1 + 0 rows) and unequal weight
        sums included. (Keras' per-replica mean / R, ``scale_loss_for_distribution``, is exact
        only for equal pieces of equal weight.) A replica with no rows contributes 0.
        """
        context = tf.distribute.get_replica_context()
        if context is None or tf.distribute.get_strategy().num_replicas_in_sync == 1:
            if w is None:
                return -tf.reduce_mean(lp)
            return -tf.math.divide_no_nan(tf.reduce_sum(w * lp), tf.reduce_sum(w))
        if w is None:
            total, weight = tf.reduce_sum(lp), tf.cast(tf.size(lp), lp.dtype)
        else:
            total, weight = tf.reduce_sum(w * lp), tf.reduce_sum(w)
        # the global Σ w, a constant of the step (no gradient flows through the all-reduce)
        weight = tf.stop_gradient(context.all_reduce(tf.distribute.ReduceOp.SUM, weight))
        return -tf.math.divide_no_nan(total, weight)

    # -- deconvolution: the loss of noisy data (tfgalflow.deconvolution) ------------------------
    def set_noise_model(self, noise_model: Any) -> "Flow":
        """Train on noisy rows: with a :class:`tfgalflow.deconvolution.NoiseModel` the training
        data are packed rows [B, D + E] (x, then each row's errors; ``deconvolution.pack``) and the
        loss is -log of the noise-convolved density (``NoiseModel.log_likelihood``), so the flow
        learns the error-free density. None restores plain maximum likelihood. log_prob, sampling
        and export always describe the flow itself (the error-free density).
        """
        if noise_model is not None and getattr(noise_model, "dim", None) != self._observed_dim(
                getattr(noise_model, "coordinates", "cartesian")):
            raise InputError(f"set_noise_model: expected a NoiseModel with dim = "
                             f"{self._observed_dim(noise_model.coordinates)} for this "
                             f"{self.dim}-D flow, got {noise_model!r}")
        self.noise_model = noise_model
        self.train_function = self.test_function = None     # rebuilt with the new loss
        return self

    def _observed_dim(self, coordinates: str) -> int:
        """The width of the catalogue rows whose reduced ``coordinates`` this flow learns."""
        return self.dim if coordinates == "cartesian" else self._observed_density(coordinates).dim

    def _observed_density(self, coordinates: str) -> Any:
        """The density of the catalogue's columns this flow defines (itself for cartesian, the
        reduced-coordinate DF of :func:`tfgalflow.coordinates.wrap` otherwise, not symmetrised:
        the plain fit learns the same p). Built on demand, never stored (it holds the flow).
        """
        from .coordinates import wrap
        return wrap(coordinates, self, even=False) if coordinates != "cartesian" else self

    # -- label-noise regularisation ------------------------------------------------------------
    def set_label_noise(self, sigma: float, seed: int = 0) -> "Flow":
        """Train on labels jittered at every step: c̃ → c̃ + σ ε, ε ~ N(0, I), in the standardised
        labels c̃ = (c − μ_c) / σ_c (log c in the label log columns), fresh draws each optimizer
        step from (``seed``, step). The loss becomes that of the label-smoothed conditional
        ∫ p(x | c') N(c̃'; c̃, σ²) dc', which ties p(x | c) between the training labels to its
        neighbours: on a sparse label grid it stops the flow from learning sharp transitions
        between nodes (noise regularisation, Rothfuss et al. 2019, arXiv:1907.08982); the cost is
        a smoothing bias at the nodes that vanishes as σ → 0. Validation, log_prob and sampling use
        the labels as given. σ = 0 turns it off.
        """
        sigma = positive_number(sigma, "label noise sigma", allow_zero=True)
        if sigma > 0.0 and not self.label_dim:
            raise InputError("label noise needs a conditional flow (label_dim > 0)")
        self.label_noise, self._label_noise_seed = sigma, int(seed)
        self.train_function = None           # rebuilt with the new loss
        return self

    def _jittered_labels(self, c: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
        """c [B, C] with N(0, σ²) added to its standardised values (set_label_noise)."""
        seed = tf.stack([tf.constant(self._label_noise_seed, tf.int64), tf.cast(step, tf.int64)])
        shift = self.label_noise * self.label_scale * tf.random.stateless_normal(tf.shape(c), seed)
        if self.config.label_asinh:           # the jitter acts on asinh(c / s) there
            s = self._label_asinh_scale
            c = tf.where(self._label_asinh_mask, s * tf.sinh(tf.asinh(c / s) + shift), c)
            shift = tf.where(self._label_asinh_mask, tf.zeros_like(shift), shift)
        if not self.config.label_log_columns:
            return c + shift
        return tf.where(self._label_log_mask, c * tf.exp(shift), c + shift)

    # -- label selection: the group lasso over each label column's weights ---------------------
    def set_label_lasso(self, strength: float) -> "Flow":
        """Train with the group-lasso penalty λ Σ_j ‖V_{j·}‖₂ added to the loss (nats per point).

        V_{j·} gathers every weight through which label column j reaches the flow: row j of each
        MADE's label kernel (:func:`tfgalflow.flows.label_kernels`), or with a context network
        row j of its input kernel (:attr:`tfgalflow.context.ContextNetwork.label_kernel`, the
        only weights that read the labels), in the standardised labels, so the columns are
        penalised on one scale. The penalty is a sum of unsquared group norms, so it drives
        whole groups to zero (Yuan & Lin 2006, J. R. Stat. Soc. B 68, 49): a label
        column whose weights buy less than λ of likelihood per unit norm is dropped and p(x | c)
        stops depending on it. This is how a conditional flow trained on few objects with many
        labels (an image latent, a noise column) avoids memorising each object through the labels
        that carry no information on its density; :meth:`label_weight_norms` tells which columns
        it kept. The training loss reported stays -mean log p (the penalty is not in it); λ = 0
        turns it off.
        """
        strength = positive_number(strength, "label lasso strength", allow_zero=True)
        if strength > 0.0 and not self.label_dim:
            raise InputError("the label lasso needs a conditional flow (label_dim > 0)")
        self.label_lasso = strength
        self.train_function = None           # rebuilt with the new loss
        return self

    def label_weight_norms(self) -> np.ndarray:
        """‖V_{j·}‖₂ [C]: the norm of all the weights through which label column j enters the
        flow (standardised labels; 0 exactly when p(x | c) does not depend on c_j). See
        :meth:`set_label_lasso`.
        """
        return self._label_group_norms().numpy()

    def _label_group_norms(self) -> tf.Tensor:
        kernels = ([self.context.label_kernel] if self.context is not None
                   else label_kernels(self.bijector))
        if not kernels:
            return tf.zeros([self.label_dim])
        squares = tf.add_n([tf.reduce_sum(tf.square(v), axis=1) for v in kernels])
        # + tiny: a finite (zero) gradient at a dropped group; 1e-30 is far below float32's
        # resolution of any kept weight
        return tf.sqrt(squares + 1e-30)

    def _with_label_lasso(self, grads: list, variables: list) -> list:
        """grads + ∇(λ Σ_j ‖V_{j·}‖₂) / R over the label kernels (R replicas each add a share)."""
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            penalty = self.label_lasso / replicas * tf.reduce_sum(self._label_group_norms())
        extra = tape.gradient(penalty, variables, unconnected_gradients="zero")
        return [g if e is None else (e if g is None else g + e) for g, e in zip(grads, extra)]

    def _split_errors(self, data) -> tuple[Any, tf.Tensor | None]:
        """(Keras data with x [..., D], packed errors [..., E] | None): no-op without a noise
        model.
        """
        if self.noise_model is None:
            return data, None
        x, c, w = _split_keras_data(data)
        x, errors = self.noise_model.split(x)
        return (x, c, w), errors

    def _row_dim(self, errors: tf.Tensor | None) -> int:
        """The width of x in a training batch: D, or with errors the noise model's (catalogue)
        width, which differs from D when the flow learns reduced coordinates.
        """
        return self.dim if errors is None else self.noise_model.dim

    def _data_log_prob(self, x: tf.Tensor, c: tf.Tensor | None, errors: tf.Tensor | None,
                       step: tf.Tensor | int) -> tf.Tensor:
        """log f(x | c) [B]; with errors [B, E] the noise-convolved estimate log p̂(x | c), its
        draws seeded by (noise seed, ``step``).
        """
        if errors is None:
            return self.log_prob_tensor(x, c)
        log_prob, seed = self._noisy_density(step)
        return self.noise_model.log_likelihood(log_prob, x, errors, seed, c)

    def _noisy_density(self, step: tf.Tensor | int) -> tuple[Callable[..., tf.Tensor], tf.Tensor]:
        """(log f of the catalogue's columns, the stateless seed [2] of the noise draws of
        ``step``) for the noise model's estimator.
        """
        seed = tf.stack([tf.constant(self.noise_model.seed, tf.int64), tf.cast(step, tf.int64)])
        return self._observed_density(self.noise_model.coordinates).log_prob_tensor, seed

    def _with_selection(self, grads: list, variables: list, errors: tf.Tensor,
                        c: tf.Tensor | None, seed: tf.Tensor) -> list:
        """grads + ∇ log P_sel / R: the normaliser of a catalogue cut after the noise
        (``NoiseModel.selection_surrogate``; R replicas each add a share).
        """
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        density = self._observed_density(self.noise_model.coordinates)
        with tf.GradientTape() as tape:
            surrogate, _ = self.noise_model.selection_surrogate(density, errors, seed, c)
            surrogate = surrogate / replicas
        extra = tape.gradient(surrogate, variables, unconnected_gradients="zero")
        return [g + e for g, e in zip(grads, extra)]

    def _optimizer_step(self, x: tf.Tensor, c: tf.Tensor | None, w: tf.Tensor | None,
                        errors: tf.Tensor | None = None) -> None:
        """One Adam (or other optimizer) update on the batch x [B, D], c [B, C] | None, w
        [B] | None (errors [B, E]: the deconvolution loss, draws seeded by the optimizer step).
        """
        step = self.optimizer.iterations + 1
        if self.label_noise > 0.0 and c is not None:
            c = self._jittered_labels(c, step)
        variables = self.trainable_variables
        if errors is None:
            with tf.GradientTape() as tape:
                lp = self.log_prob_tensor(x, c)
                loss = self._loss(lp, w)
            grads = tape.gradient(loss, variables)
        else:                  # the noise model differentiates its estimator (in passes or not)
            log_prob, seed = self._noisy_density(step)
            lp, grads = self.noise_model.log_likelihood_and_gradient(
                log_prob, x, errors, seed, c, lambda lp: self._loss(lp, w), variables)
            if self.noise_model.selection_r_max is not None:
                grads = self._with_selection(grads, variables, errors, c, seed)
        if self.label_lasso > 0.0:
            grads = self._with_label_lasso(grads, variables)
        self.optimizer.apply_gradients(zip(grads, variables))
        self._loss_tracker.update_state(-lp, sample_weight=w)

    def train_step(self, data):
        """Optimizer steps on loss = -Σ_n w_n log p(x_n | c_n) / Σ_n w_n (w_n = 1 without weights).

        ``data`` is x, (x, labels) or (x, labels, sample_weight) as Keras passes it, so
        ``fit(x, labels, sample_weight=w)`` fits a weighted sample
        (e.g. inverse selection probabilities). Keras drops sample weights when y is None, so
        unconditional flows take zero-width labels: ``fit(x, np.zeros((len(x), 0)),
        sample_weight=w)``.

        Shapes:
            x [B, D], labels [B, C], sample_weight [B]: one optimizer step (the usual Keras step).
            x [K, B, D], labels [K, B, C], sample_weight [K, B]: a *stack* of K batches, K
                optimizer steps in one ``tf.while_loop`` -- step k uses batch k and the weights
                left by step k-1, exactly the updates (same order, same learning rates,
                optimizer.iterations += K) of K calls on x[0], ..., x[K-1]; the loss tracker is
                updated after every step. K and B may change from call to call
                (a short last stack, a stack of one partial batch).

        Why stacks: each call of Keras' train function costs a fixed dispatch overhead
        (function call, XLA launch, iterator, callbacks) comparable to a whole step on 2048 points
        of a 8 x (2x64) MAF on CPU; inside one XLA-compiled call (``compile(jit_compile=True)``) it
        is paid once per K steps. ``TrainConfig.steps_per_call`` builds such stacks for
        :func:`tfgalflow.training.train`.

        Stacks need a single replica: under a ``tf.distribute`` strategy with several replicas
        Keras would split a stack along K, so they raise InputError
        (``training.train`` falls back to K = 1 there).
        """
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if replicas > 1 and _rank(_split_keras_data(data)[0]) != 2:
            raise InputError(
                f"x has shape {shape_of(_split_keras_data(data)[0])} on one of {replicas} "
                "replicas: stacked batches [K, B, D] need a single replica "
                "(the distribution strategy would split the stack along K); feed batches "
                f"[B, {self.dim}]"
            )
        data, errors = self._split_errors(data)
        if not _is_stack(data):
            self._optimizer_step(*self._unpack(data, self._row_dim(errors)), errors)
            return {"loss": self._loss_tracker.result()}
        x, c, w = self._unpack_stack(data, self._row_dim(errors))
        with tf.init_scope():     # slots must exist before the loop (no-op if already built)
            self.optimizer.build(self.trainable_variables)

        def one_step(k):
            self._optimizer_step(x[k], None if c is None else c[k], None if w is None else w[k],
                                 None if errors is None else errors[k])
            return (k + 1,)

        # parallel_iterations=1: step k+1 reads the variables step k wrote.
        tf.while_loop(
            lambda k: k < tf.shape(x)[0], one_step, (tf.constant(0),), parallel_iterations=1
        )
        return {"loss": self._loss_tracker.result()}

    def test_step(self, data):
        """Loss tracker update on a batch x [B, D] (or a stack x [K, B, D], evaluated as K·B rows).

        With a noise model the loss is the noise-convolved estimate with draws from a fixed seed
        (common random numbers: epochs are compared on the same draws).
        """
        data, errors = self._split_errors(data)
        if _is_stack(data):
            x, c, w = self._unpack_stack(data, self._row_dim(errors))
            x = tf.reshape(x, [-1, x.shape[-1]])     # D, or the observed width with errors
            c = None if c is None else tf.reshape(c, [-1, self.label_dim])
            w = None if w is None else tf.reshape(w, [-1])
            errors = None if errors is None else tf.reshape(errors, [-1, self.noise_model.width])
        else:
            x, c, w = self._unpack(data, self._row_dim(errors))
        self._loss_tracker.update_state(-self._data_log_prob(x, c, errors, 0), sample_weight=w)
        return {"loss": self._loss_tracker.result()}


def _split_keras_data(data) -> tuple[Any, Any, Any]:
    """(x, labels, sample_weight) from Keras data x, (x, labels), ((x, labels),) or
    (x, labels, w).
    """
    x, c, w = keras.utils.unpack_x_y_sample_weight(data)
    if isinstance(x, (tuple, list)) and c is None and len(x) == 2:
        x, c = x
    return x, c, w


def _rank(value: Any) -> int | None:
    """Static rank of a tensor (None if unknown) or array."""
    return value.shape.rank if isinstance(value, (tf.Tensor, tf.Variable)) else np.ndim(value)


def _is_stack(data) -> bool:
    """True if the Keras data hold a stack of batches, x [K, B, D] (rank 3), rather
    than x [B, D].
    """
    return _rank(_split_keras_data(data)[0]) == 3


def _free_stack(t: tf.Tensor) -> tf.Tensor:
    """Forget static K and B of a stack [K, B, ...] inside a graph (identity on values).

    So that ``t[k]`` has a free batch dimension, for the reason given in :func:`_free_batch`.
    """
    if (
        tf.executing_eagerly()
        or t.shape.rank is None
        or (t.shape[0] is None and t.shape[1] is None)
    ):
        return t
    return tf.compat.v1.placeholder_with_default(t, shape=[None, None] + t.shape.as_list()[2:])


class _Moments:
    """Streaming per-column mean, standard deviation (float64, shifted sums about the first batch),
    minimum and maximum.
    """

    def __init__(self, width: int):
        self.count = 0
        self.low = np.full(width, np.inf)
        self.high = np.full(width, -np.inf)
        self.ref = np.zeros(width)
        self.sum = np.zeros(width)
        self.sum_sq = np.zeros(width)

    def update(self, batch: np.ndarray) -> None:
        if batch.shape[0] == 0:
            return
        if self.count == 0:
            self.ref = batch.mean(axis=0)
        d = batch - self.ref
        self.low = np.minimum(self.low, batch.min(axis=0))
        self.high = np.maximum(self.high, batch.max(axis=0))
        self.count += batch.shape[0]
        self.sum += d.sum(axis=0)
        self.sum_sq += (d * d).sum(axis=0)

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        m = self.sum / self.count
        var = np.maximum(self.sum_sq / self.count - m * m, 0.0)
        return self.ref + m, np.sqrt(var)


# ---- ensembles ------------------------------------------------------------------------------

class Ensemble(Density, tf.Module):
    """Equal-weight mixture of K flows: p(x | c) = (1/K) Σ_k p_k(x | c).

    The mixture (mean of densities) is itself a normalised density, and it is what a deep ensemble
    predicts (Lakshminarayanan et al. 2017); the mean of log-densities, exp((1/K) Σ log p_k), is a
    geometric mean that integrates to <= 1 (Jensen/Hölder) and is not a density. Hence

        log p = logsumexp_k(log p_k) - log K,

    computed stably in log space; ``sample`` draws each point from a member chosen uniformly at
    random (exact mixture sampling), and ``grad_log_prob`` differentiates the log of the mean
    density, i.e. Σ_k w_k ∇log p_k with posterior weights w_k = p_k / Σ_j p_j.

    ``jit_compile`` (default True) runs eager ``log_prob`` / ``grad_log_prob`` XLA-compiled on row
    buckets, as for :class:`Flow`; sampling stays in the plain graph (the member choice does not
    split off as base noise).
    """

    what = "ensemble"

    def __init__(self, members: Sequence[Flow], jit_compile: bool = True):
        members = list(members) if isinstance(members, Iterable) else []
        super().__init__(name="ensemble")
        if not members or not all(isinstance(m, Flow) for m in members):
            raise InputError("Ensemble(members): expected a non-empty list of Flow models")
        dims = {(m.dim, m.label_dim) for m in members}
        if len(dims) != 1:
            raise InputError(
                f"Ensemble members disagree on (dim, label_dim): {sorted(dims)}; all must match"
            )
        self.members = members
        self.jit_log_prob = bool(jit_compile)

    @property
    def config(self) -> FlowConfig:
        """The first member's FlowConfig (members differ only by seed)."""
        return self.members[0].config

    @property
    def dim(self) -> int:
        """D, the members' width of x."""
        return self.members[0].dim

    @property
    def label_dim(self) -> int:
        """C, the members' label width."""
        return self.members[0].label_dim

    def __len__(self) -> int:
        return len(self.members)

    @property
    def evaluations_per_row(self) -> int:
        """Member evaluations per row of ``log_prob`` (K): :mod:`tfgalflow.cbe` divides its chunks
        by it.
        """
        return len(self.members)

    def label_range(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The union of the members' training label ranges (min [C], max [C]), or None if
        unknown.
        """
        ranges = [m.label_range() for m in self.members]
        if any(r is None for r in ranges):
            return None
        return np.min([r[0] for r in ranges], axis=0), np.max([r[1] for r in ranges], axis=0)

    def scale_hint(self) -> tf.Tensor:
        """The first member's rescaler scales [D] (members share their data)."""
        return self.members[0].scale_hint()

    def log_prob_tensor(self, x: tf.Tensor, labels: tf.Tensor | None = None) -> tf.Tensor:
        """log p = logsumexp_k log p_k - log K [N] (the mixture density), as TF ops."""
        # [K, N]
        member_lp = tf.stack([m.log_prob_tensor(x, labels) for m in self.members], axis=0)
        return tf.reduce_logsumexp(member_lp, axis=0) - math.log(len(self.members))

    def log_prob_grid_tensor(self, grid: tf.Tensor, labels: tf.Tensor | None = None) -> tf.Tensor:
        """log of the mixture density [N, G] of 1-D members on a grid
        (see ``Flow.log_prob_grid_tensor``).
        """
        member_lp = tf.stack([m.log_prob_grid_tensor(grid, labels) for m in self.members], axis=0)
        return tf.reduce_logsumexp(member_lp, axis=0) - math.log(len(self.members))

    def sample_tensor(
        self, n: tf.Tensor | None, c: tf.Tensor | None, seed: tf.Tensor
    ) -> tf.Tensor:
        """Exact mixture draws [n, D]: each row from a member chosen uniformly at random."""
        k = len(self.members)
        if c is not None:
            n = tf.shape(c)[0]
        choice_seed = tf.random.experimental.stateless_fold_in(seed, k)
        member = tf.random.stateless_uniform(
            tf.reshape(n, [1]), seed=choice_seed, minval=0, maxval=k, dtype=tf.int32
        )
        rows = tf.dynamic_partition(tf.range(n), member, k)
        draws = []
        for j, m in enumerate(self.members):
            member_seed = tf.random.experimental.stateless_fold_in(seed, j)
            if c is None:
                draws.append(m.sample_tensor(tf.size(rows[j]), None, member_seed))
            else:
                draws.append(m.sample_tensor(None, tf.gather(c, rows[j]), member_seed))
        x = tf.dynamic_stitch(rows, draws)
        x.set_shape([None, self.dim])
        return x
