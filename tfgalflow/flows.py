"""Bijector chains of masked autoregressive flows (MAF): affine or rational-quadratic-spline
layers.

A flow maps a standard-normal latent z to the (rescaled) data y with a chain of L autoregressive
bijectors separated by permutations,

    y = f_L ∘ P_{L-1} ∘ ... ∘ P_1 ∘ f_1 (z),       y_i = τ(z_i; θ_i(y_{<i}, c)),

where θ_i comes from a MADE network (Germain et al. 2015) that sees only y_{<i} and the optional
conditioning labels c.  τ is either affine, y_i = z_i exp(s_i) + m_i
(MAF; Papamakarios, Pavlakou & Murray 2017), or a monotone rational-quadratic spline on [-B, B]
with identity tails (Durkan et al. 2019, "Neural Spline Flows").  The density direction
(y -> z, used by ``log_prob``) is one network pass per layer; sampling is D passes per layer, pass
i evaluating only the network units that output i depends on
(:func:`forward`; TFP runs D full passes in a ``tf.while_loop``).

Only :class:`FlowConfig` and :func:`build_bijector` are public; the model (rescaling, base density,
Keras training) lives in :mod:`tfgalflow.model`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import tensorflow as tf

from .errors import InputError

try:
    import tensorflow_probability as tfp
except ModuleNotFoundError as exc:          # tf.keras already resolved to Keras 3
    raise ImportError(
        "TensorFlow Probability needs Keras 2 (tf_keras): import tfgalflow, or set the "
        "environment variable TF_USE_LEGACY_KERAS=1, before importing tf_keras or "
        f"tensorflow.keras (TFP import failed with: {exc})"
    ) from exc

import tf_keras as keras  # noqa: E402  (after TFP, which needs Keras 2)

tfb = tfp.bijectors

FLOW_KINDS = ("affine", "spline")
PERMUTATIONS = ("reverse", "random")
ACTIVATIONS = (
    "relu",
    "tanh",
    "elu",
    "gelu",
    "selu",
    "swish",
    "silu",
    "sigmoid",
    "softplus",
    "leaky_relu",
)

#: Soft bound on the affine log-scale of every layer: s = b tanh(s_raw / b), so |s| < b and each
#: layer rescales by at most e^b. Keeps initial losses finite for every seed (unbounded log-scales
#: give infinite initial losses for some seeds).
LOG_SCALE_BOUND = 3.0
#: Smallest spline bin width/height (in rescaled units) and knot slope: keeps the spline invertible
#: and its Jacobian bounded away from zero.
MIN_BIN_SIZE = 1e-3
MIN_KNOT_SLOPE = 1e-3


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True)
class FlowConfig:
    """Architecture of a (conditional) masked autoregressive flow; JSON-serialisable and validated.

    Attributes:
        dim: number of data columns D (>= 1), e.g. 6 for phase space (x, v).
        label_dim: number of conditioning label columns C (0 = unconditional).
        layers: number of autoregressive layers L (>= 1).
        hidden: hidden-layer widths of each MADE network, e.g. (64, 64).
        activation: hidden activation (one of ``ACTIVATIONS``).
        kind: "affine" (MAF) or "spline" (rational-quadratic spline MAF).
        bins: number of spline bins K (>= 2; only used for kind="spline"; 3K-1 parameters per dim).
        log_columns: data columns that are strictly positive and modelled as log(x)
            (0-based, < dim).
        upper_bounds: ((j, b_j), ...): log columns j whose values also lie below b_j > 0,
            modelled as log(x_j / (b_j − x_j)) instead of log x_j: the support (0, b_j) maps onto
            the whole real line, so a density that steps to zero at b_j (a catalogue cut at a
            true radius) becomes a tail the flow can represent. Points at or above b_j have
            log p = −inf.
        label_log_columns: label columns that are strictly positive and enter the networks as
            log(c) before standardisation (0-based, < label_dim), e.g. a metallicity Z spanning
            decades.
        label_asinh: ((k, s_k), ...): label columns k (not log columns; any sign, 0 included)
            that enter the networks as asinh(c_k / s_k) before standardisation, a softened log
            (≈ c_k / s_k below s_k, ≈ ln(2 c_k / s_k) above; Lupton, Gunn & Szalay 1999, AJ 118,
            1406): for a label that reaches 0 but whose effect scales with its ratio to other
            scales (an anisotropy radius a/r_a acts through r/r_a at r ≫ a).
        seed: seed of the weight initialisation and of random permutations (>= 0).
        permutation: "reverse" or "random" (seeded) permutation between layers.
        spline_range: half-width B of the spline interval [-B, B] in rescaled units
            (identity outside).
        conditional_rescaling: rescale each data column by a mean and a log-scale linear in the
            standardised labels (fitted by least squares in ``Flow.adapt``), so the chain learns
            what is left once a label-dependent location and scale are removed (for conditional
            flows; see :class:`tfgalflow.model.Flow`).
        rescaling_labels: the label columns the conditional rescaler regresses on (default
            (): all). The rescaler is an unregularised least-squares fit, so a label column that
            carries nothing on the density (an image latent, a noise column) still gets slopes
            that fit the few training objects' own means and scales; name the trusted labels
            (a galaxy's mass and size) and leave the rest to the networks (and the group lasso).
        rescaling_columns: the data columns the conditional rescaler moves and scales (default
            (): all); the others keep the unconditional location and scale, so their dependence
            on the labels (and their correlation with the rescaled columns) is the networks'
            alone (for columns whose label dependence is not a shift and scale, such as a
            metallicity that follows a gradient in radius).
        context_blocks: K > 0 gives the flow a context network
            (:class:`tfgalflow.context.ContextNetwork`): K pre-norm residual blocks that encode
            the standardised labels into a context of width ``context_width``, which every MADE
            takes as its conditional input instead of the labels (for many labels with a
            complicated effect on p(x | c)); 0 (default): the labels enter the MADEs directly.
        context_width: W, the width of the context network (used when ``context_blocks`` > 0).
    """

    dim: int
    label_dim: int = 0
    layers: int = 8
    hidden: tuple = (64, 64)
    activation: str = "relu"
    kind: str = "affine"
    bins: int = 8
    log_columns: tuple = ()
    seed: int = 0
    permutation: str = "reverse"
    spline_range: float = 5.0
    label_log_columns: tuple = ()
    conditional_rescaling: bool = False
    rescaling_labels: tuple = ()
    rescaling_columns: tuple = ()
    upper_bounds: tuple = ()
    label_asinh: tuple = ()
    context_blocks: int = 0
    context_width: int = 256

    def __post_init__(self) -> None:
        def bad(field: str, value: Any, expected: str) -> InputError:
            return InputError(f"FlowConfig.{field} = {value!r}: expected {expected}")

        for field, low in (("dim", 1), ("label_dim", 0), ("layers", 1), ("bins", 2), ("seed", 0),
                           ("context_blocks", 0), ("context_width", 1)):
            value = getattr(self, field)
            if not _is_int(value) or value < low:
                raise bad(field, value, f"an integer >= {low}")
            object.__setattr__(self, field, int(value))
        if self.seed >= 2**31:
            raise bad("seed", self.seed, "an integer in [0, 2**31 - 1]")
        hidden = self.hidden
        if _is_int(hidden):
            hidden = (hidden,)
        if (not isinstance(hidden, (tuple, list)) or len(hidden) == 0
                or not all(_is_int(h) and h >= 1 for h in hidden)):
            raise bad(
                "hidden", self.hidden, "a non-empty sequence of positive integers, e.g. (64, 64)"
            )
        object.__setattr__(self, "hidden", tuple(int(h) for h in hidden))
        if self.activation not in ACTIVATIONS:
            raise bad("activation", self.activation, f"one of {ACTIVATIONS}")
        if self.kind not in FLOW_KINDS:
            raise bad("kind", self.kind, f"one of {FLOW_KINDS}")
        if self.permutation not in PERMUTATIONS:
            raise bad("permutation", self.permutation, f"one of {PERMUTATIONS}")
        for field, what, size, name in (
                ("log_columns", "column", self.dim, "dim"),
                ("label_log_columns", "label column", self.label_dim, "label_dim"),
                ("rescaling_labels", "label column", self.label_dim, "label_dim"),
                ("rescaling_columns", "column", self.dim, "dim")):
            cols = getattr(self, field)
            if not isinstance(cols, (tuple, list)) or not all(_is_int(j) for j in cols):
                raise bad(field, cols, f"a sequence of {what} indices")
            if any(j < 0 or j >= size for j in cols) or len(set(cols)) != len(cols):
                raise bad(field, cols, f"distinct {what} indices in [0, {size - 1}] "
                          f"({name} = {size})")
            object.__setattr__(self, field, tuple(sorted(int(j) for j in cols)))

        def column_pairs(field: str, allowed: Any, expected: str, context: str) -> tuple:
            """The field's ((column, number), ...) sorted, each column distinct and ``allowed``,
            each number finite and > 0; InputError naming the field otherwise.
            """
            pairs = getattr(self, field)
            if not isinstance(pairs, (tuple, list)) or not all(
                    isinstance(pair, (tuple, list)) and len(pair) == 2 and _is_int(pair[0])
                    and isinstance(pair[1], (int, float, np.floating))
                    and not isinstance(pair[1], bool) for pair in pairs):
                raise bad(field, pairs, expected)
            out = tuple(sorted((int(j), float(b)) for j, b in pairs))
            columns = [j for j, _ in out]
            if (len(set(columns)) != len(columns) or not all(allowed(j) for j in columns)
                    or not all(math.isfinite(b) and b > 0 for _, b in out)):
                raise bad(field, pairs, expected + context)
            return out

        object.__setattr__(self, "label_asinh", column_pairs(
            "label_asinh",
            lambda k: 0 <= k < self.label_dim and k not in self.label_log_columns,
            "pairs (label column, scale s > 0) of distinct label columns that are not label log "
            "columns, e.g. ((1, 0.01),)", f" (label_dim = {self.label_dim})"))
        object.__setattr__(self, "upper_bounds", column_pairs(
            "upper_bounds", lambda j: j in self.log_columns,
            "pairs (column, bound) of distinct log columns and finite bounds > 0, e.g. "
            "((0, 100.0),)", f" (log_columns = {self.log_columns})"))
        if (
            isinstance(self.spline_range, bool)
            or not isinstance(self.spline_range, (int, float, np.floating))
            or not math.isfinite(self.spline_range)
            or self.spline_range <= 0
        ):
            raise bad("spline_range", self.spline_range, "a finite number > 0")
        object.__setattr__(self, "spline_range", float(self.spline_range))
        if not isinstance(self.conditional_rescaling, (bool, np.bool_)):
            raise bad("conditional_rescaling", self.conditional_rescaling, "True or False")
        object.__setattr__(self, "conditional_rescaling", bool(self.conditional_rescaling))
        if self.conditional_rescaling and self.label_dim == 0:
            raise bad("conditional_rescaling", True, "False for an unconditional flow "
                      "(label_dim = 0): there are no labels to rescale with")
        for field, role in (("rescaling_labels", "the labels the rescaler regresses on"),
                            ("rescaling_columns", "the columns the rescaler moves")):
            if getattr(self, field) and not self.conditional_rescaling:
                raise bad(field, getattr(self, field), f"() without conditional_rescaling "
                          f"(they name {role})")
        if self.context_blocks and self.label_dim == 0:
            raise bad("context_blocks", self.context_blocks, "0 for an unconditional flow "
                      "(label_dim = 0): there are no labels to encode")

    @property
    def context_dim(self) -> int:
        """Width of the MADEs' conditional input: ``context_width`` with a context network,
        else ``label_dim``.
        """
        return self.context_width if self.context_blocks else self.label_dim

    @property
    def params_per_dim(self) -> int:
        """MADE outputs per data dimension: 2 (shift, log-scale) or 3K-1
        (K widths, K heights, K-1 slopes).
        """
        return 2 if self.kind == "affine" else 3 * self.bins - 1

    def to_dict(self) -> dict:
        """JSON-able dict (tuples become lists); ``FlowConfig.from_dict(c.to_dict()) == c``."""
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        d["log_columns"] = list(self.log_columns)
        d["label_log_columns"] = list(self.label_log_columns)
        d["rescaling_labels"] = list(self.rescaling_labels)
        d["rescaling_columns"] = list(self.rescaling_columns)
        d["upper_bounds"] = [list(pair) for pair in self.upper_bounds]
        d["label_asinh"] = [list(pair) for pair in self.label_asinh]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FlowConfig":
        """Rebuild from :meth:`to_dict` output (lists accepted for tuples); unknown
        keys -> InputError.
        """
        if not isinstance(d, Mapping):
            raise InputError(f"FlowConfig.from_dict: expected a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InputError(
                f"FlowConfig.from_dict: unknown field(s) {unknown}; allowed: {sorted(names)}"
            )
        if "dim" not in d:
            raise InputError("FlowConfig.from_dict: missing required field 'dim'")
        kw = dict(d)
        for key in ("hidden", "log_columns", "label_log_columns"):
            if isinstance(kw.get(key), list):
                kw[key] = tuple(kw[key])
        for key in ("upper_bounds", "label_asinh"):
            if isinstance(kw.get(key), list):
                kw[key] = tuple(tuple(pair) if isinstance(pair, list) else pair
                                for pair in kw[key])
        return cls(**kw)


class _SeededGlorotUniform:
    """Glorot-uniform initializer that draws a fresh stateless stream [seed, k] on its k-th call.

    A seeded Keras initializer returns the *same* numbers on every call; MADE calls its initializer
    once per Dense layer, so this counter keeps layers different while the whole flow stays a
    deterministic function of ``FlowConfig.seed``. Layer i, call k uses the stream
    [seed, 1000 i + k] (a MADE makes 2 (len(hidden) + 1) < 1000 calls).
    """

    def __init__(self, seed: int, layer: int):
        self.seed = int(seed)
        self.layer = int(layer)
        self.calls = 0

    def __call__(self, shape, dtype=None, **kwargs):
        fan_in, fan_out = (shape[0], shape[1]) if len(shape) == 2 else (1, 1)
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        self.calls += 1
        return tf.random.stateless_uniform(
            shape,
            seed=[self.seed, 1000 * self.layer + self.calls],
            minval=-limit,
            maxval=limit,
            dtype=dtype or tf.float32,
        )

    def get_config(self) -> dict:
        return {"seed": self.seed, "layer": self.layer}


class _AffineTransform(tf.Module):
    """bijector_fn of an affine MAF layer: MADE(y_<i, c) -> (m_i, s_i); y_i = z_i exp(s_i) + m_i,
    |s_i| < b.
    """

    def __init__(self, network: tfb.AutoregressiveNetwork, conditional: bool, name: str):
        super().__init__(name=name)
        self.network = network
        self.conditional = conditional

    def _params(self, y, conditional_input=None):
        params = (
            self.network(y, conditional_input=conditional_input)
            if self.conditional
            else self.network(y)
        )
        return self._constrain(params)

    @staticmethod
    def _constrain(params):
        """Raw MADE outputs [.., D, 2] -> shift m and bounded log-scale s, each [.., D]."""
        shift, raw = tf.unstack(params, num=2, axis=-1)
        return shift, LOG_SCALE_BOUND * tf.tanh(raw / LOG_SCALE_BOUND)

    def __call__(self, y, conditional_input=None):
        shift, log_scale = self._params(y, conditional_input)
        return tfb.Shift(shift)(tfb.Scale(log_scale=log_scale))

    def inverse_and_log_det(self, y, conditional_input=None):
        """z_i = (y_i - m_i) exp(-s_i), log|det ∂z/∂y| = -Σ_i s_i: ([N, D], [N])."""
        shift, log_scale = self._params(y, conditional_input)
        return (y - shift) * tf.exp(-log_scale), -tf.reduce_sum(log_scale, axis=-1)

    def inverse_elementwise(self, y, params):
        """z = (y - m) exp(-s) and log|∂z/∂y| = -s per element, from raw MADE outputs params
        [.., D', 2] broadcast against y [.., D'] (e.g. params [N, 1, 2] of a 1-D flow and y [N, G]
        on a grid).
        """
        shift, log_scale = self._constrain(params)
        return (y - shift) * tf.exp(-log_scale), -log_scale

    def forward_given(self, z, y, conditional_input=None):
        """y_i = z_i exp(s_i) + m_i with (m, s) = MADE(y): correct for every i whose y_<i is
        already right.
        """
        params = (
            self.network(y, conditional_input=conditional_input)
            if self.conditional
            else self.network(y)
        )
        return self.forward_with(z, params)

    def forward_with(self, z, params):
        """y = z exp(s) + m from raw MADE outputs params [.., D', 2] for z [.., D']
        (any subset of columns).
        """
        shift, log_scale = self._constrain(params)
        return z * tf.exp(log_scale) + shift


class _SplineTransform(tf.Module):
    """bijector_fn of a spline MAF layer: MADE(y_<i, c) -> K widths, K heights, K-1 interior
    slopes.

    Widths and heights are softmax-normalised to fill [-B, B] (each >= MIN_BIN_SIZE); slopes are
    softplus(u + log(e-1)) + MIN_KNOT_SLOPE, so zero network output gives slope ~1. Outside [-B, B]
    the spline is the identity (TFP pads the boundary slopes with 1); Durkan et al. (2019), eqs.
    4-6.
    """

    def __init__(
        self,
        network: tfb.AutoregressiveNetwork,
        conditional: bool,
        bins: int,
        bound: float,
        name: str,
    ):
        super().__init__(name=name)
        self.network = network
        self.conditional = conditional
        self.bins = bins
        self.bound = bound

    def _params(self, y, conditional_input=None):
        """Bin widths [.., D, K], heights [.., D, K] and interior knot slopes [.., D, K-1]."""
        params = (
            self.network(y, conditional_input=conditional_input)
            if self.conditional
            else self.network(y)
        )
        return self._constrain(params)

    def _constrain(self, params):
        """Raw MADE outputs [.., D', 3K-1] -> widths [.., D', K], heights [.., D', K], slopes
        [.., D', K-1].
        """
        k, b = self.bins, self.bound
        widths, heights, slopes = tf.split(params, [k, k, k - 1], axis=-1)
        span = 2.0 * b - k * MIN_BIN_SIZE
        widths = tf.math.softmax(widths, axis=-1) * span + MIN_BIN_SIZE
        heights = tf.math.softmax(heights, axis=-1) * span + MIN_BIN_SIZE
        slopes = tf.math.softplus(slopes + math.log(math.e - 1.0)) + MIN_KNOT_SLOPE
        return widths, heights, slopes

    def __call__(self, y, conditional_input=None):
        widths, heights, slopes = self._params(y, conditional_input)
        return tfb.RationalQuadraticSpline(
            bin_widths=widths, bin_heights=heights, knot_slopes=slopes, range_min=-self.bound
        )

    def _knots(self, y, conditional_input=None):
        """Knot abscissae kx, ordinates ky [.., D, K+1] and slopes kd [.., D, K+1]
        (1 at both ends).
        """
        return self._knots_from(*self._params(y, conditional_input))

    def _knots_from(self, widths, heights, slopes):
        """Knots (kx, ky, kd) from constrained widths, heights and interior slopes
        (see ``_knots``).
        """
        lo = tf.constant(-self.bound, widths.dtype)
        pad = tf.zeros_like(widths[..., :1])
        kx = tf.concat([pad, tf.cumsum(widths, axis=-1)], axis=-1) + lo
        ky = tf.concat([pad, tf.cumsum(heights, axis=-1)], axis=-1) + lo
        ones = tf.ones_like(pad)
        return kx, ky, tf.concat([ones, slopes, ones], axis=-1)

    def _bin(self, v, knots, kx, ky, kd):
        """Clamp v into its knot interval, locate its bin and return the bin's spline constants.

        Returns (v_in, out_of_bounds, x_k, y_k, w, h, s, d_k, d_k+1), each [.., D]. The bin is
        found by counting interior knots <= v and read out with a one-hot mask
        (no searchsorted/gather), which keeps the graph and its gradient small and XLA-friendly.
        """
        out_of_bounds = (v <= knots[..., 0]) | (v >= knots[..., -1])
        v_in = tf.where(out_of_bounds, knots[..., 0], v)
        k = tf.reduce_sum(tf.cast(v_in[..., tf.newaxis] >= knots[..., 1:-1], tf.int32), axis=-1)
        one_hot = tf.one_hot(k, self.bins, dtype=v.dtype)

        def pick(t):
            return tf.reduce_sum(one_hot * t, axis=-1)

        x_k, y_k, d_k = pick(kx[..., :-1]), pick(ky[..., :-1]), pick(kd[..., :-1])
        w, h, d_k1 = pick(kx[..., 1:]) - x_k, pick(ky[..., 1:]) - y_k, pick(kd[..., 1:])
        return v_in, out_of_bounds, x_k, y_k, w, h, h / w, d_k, d_k1

    def inverse_and_log_det(self, y, conditional_input=None):
        """Inverse spline and its log-det in one pass: ([N, D], [N]); Durkan et al. (2019), app.
        A.2-A.3.

        Same maths as ``tfb.RationalQuadraticSpline``, written so the bin search, the knot look-ups
        and the derivative are computed once and shared by z and log|det|: in bin k with knots
        (x_k, y_k), width w, height h, s = h/w and knot slopes d_k, d_k+1,

            ξ = 2c / (-b - sqrt(b² - 4ac)),  a = h(s - d_k) + r δ,  b = h d_k - r δ,  c = -s r,
            r = y - y_k,  δ = d_k+1 + d_k - 2s,   x = x_k + ξ w,
            dy/dx = s² (d_k+1 ξ² + 2 s ξ(1-ξ) + d_k (1-ξ)²) / (s + δ ξ(1-ξ))²,

        and the identity (log-det 0) outside [-B, B].
        """
        x, log_dzdy = self._inverse_from_knots(y, *self._knots(y, conditional_input))
        return x, tf.reduce_sum(log_dzdy, axis=-1)

    def inverse_elementwise(self, y, params):
        """Inverse spline z and log|∂z/∂y| per element, from raw MADE outputs params [.., D', 3K-1]
        broadcast against y [.., D'] (e.g. params [N, 1, 3K-1] of a 1-D flow and y [N, G] on a
        grid).
        """
        return self._inverse_from_knots(y, *self._knots_from(*self._constrain(params)))

    def _inverse_from_knots(self, y, kx, ky, kd):
        """(z, log|∂z/∂y|) elementwise for y [.., D'] and knots [.., D' or 1, K+1]
        (the maths above).
        """
        y_in, out, x_k, y_k, w, h, s, d_k, d_k1 = self._bin(y, ky, kx, ky, kd)
        r = y_in - y_k
        delta = d_k1 + d_k - 2.0 * s
        a = h * (s - d_k) + r * delta
        b = h * d_k - r * delta
        c = -s * r
        xi = tf.where(
            tf.equal(r, 0.0), tf.zeros_like(r), 2.0 * c / (-b - tf.sqrt(b * b - 4.0 * a * c))
        )
        x = tf.where(out, y, x_k + xi * w)
        t = xi * (1.0 - xi)
        log_dydx = (
            2.0 * tf.math.log(s)
            + tf.math.log(d_k1 * xi * xi + 2.0 * s * t + d_k * (1.0 - xi) ** 2)
            - 2.0 * tf.math.log(s + delta * t)
        )
        return x, -tf.where(out, tf.zeros_like(log_dydx), log_dydx)

    def forward_given(self, z, y, conditional_input=None):
        """Spline forward y_i = g(z_i; θ(y)) (app. A.1): y_k + h
        (s ξ² + d_k ξ(1-ξ)) / (s + δ ξ(1-ξ)), ξ = (z - x_k)/w; identity outside [-B, B]. Correct
        for every i whose y_<i is already right.
        """
        params = (
            self.network(y, conditional_input=conditional_input)
            if self.conditional
            else self.network(y)
        )
        return self.forward_with(z, params)

    def forward_with(self, z, params):
        """The spline forward of z [.., D'] with raw MADE outputs params [.., D', 3K-1]
        (any subset of columns).
        """
        kx, ky, kd = self._knots_from(*self._constrain(params))
        z_in, out, x_k, y_k, w, h, s, d_k, d_k1 = self._bin(z, kx, kx, ky, kd)
        xi = (z_in - x_k) / w
        t = xi * (1.0 - xi)
        value = y_k + h * (s * xi * xi + d_k * t) / (s + (d_k1 + d_k - 2.0 * s) * t)
        return tf.where(out, z, value)


def layer_names(config: FlowConfig) -> list[str]:
    """Names of the autoregressive layers of ``build_bijector(config)``, the keys of
    ``bijector_kwargs``.
    """
    return [f"maf_{i}" for i in range(config.layers)]


def _permutation(config: FlowConfig, i: int) -> np.ndarray:
    if config.permutation == "reverse":
        return np.arange(config.dim)[::-1].copy()
    return np.random.default_rng([config.seed, i]).permutation(config.dim)


def build_bijector(config: FlowConfig) -> tfb.Chain:
    """Chain of ``config.layers`` MAF bijectors (named ``maf_i``) with permutations (``permute_i``)
    between.

    Forward maps latent z ~ N(0, I_D) to rescaled data y; inverse is the one-pass density
    direction. Conditional flows take ``bijector_kwargs={name: {"conditional_input": c} for name in
    layer_names(config)}`` with c: [N, config.context_dim] (the standardised labels, or their
    context h from :class:`tfgalflow.context.ContextNetwork` when ``context_blocks`` > 0, which
    ``tfgalflow.model.Flow`` owns and applies). Weights are a
    deterministic function of ``config.seed``; the MADE variables are created on the first call
    (``tfgalflow.model.Flow`` builds them at once).

    D = 1 is supported: the single MADE output then depends only on the labels (conditional) or is
    a learned constant (unconditional), i.e. an affine or spline transform of N(0, 1).

    Reference: Papamakarios, Pavlakou & Murray (2017), "Masked Autoregressive Flow for Density
    Estimation"; Durkan et al. (2019), "Neural Spline Flows".
    """
    if not isinstance(config, FlowConfig):
        raise InputError(f"build_bijector: expected a FlowConfig, got {type(config).__name__}")
    conditional = config.label_dim > 0
    bijectors = []   # forward order; reversed into tfb.Chain below
    for i, name in enumerate(layer_names(config)):
        cond_kw = (
            dict(conditional=True, conditional_event_shape=[config.context_dim])
            if conditional
            else {}
        )
        network = tfb.AutoregressiveNetwork(
            params=config.params_per_dim,
            event_shape=[config.dim],
            hidden_units=list(config.hidden),
            activation=config.activation,
            kernel_initializer=_SeededGlorotUniform(config.seed, i),
            name=f"made_{i}",
            **cond_kw,
        )
        if config.kind == "affine":
            fn = _AffineTransform(network, conditional, name=f"affine_{i}")
        else:
            fn = _SplineTransform(
                network, conditional, config.bins, config.spline_range, name=f"spline_{i}"
            )
        maf = tfb.MaskedAutoregressiveFlow(bijector_fn=fn, name=name)
        maf.transform = fn      # the same object TFP holds privately; used by inverse_and_log_det
        bijectors.append(maf)
        if i + 1 < config.layers and config.dim > 1:
            bijectors.append(tfb.Permute(permutation=_permutation(config, i), name=f"permute_{i}"))
    return tfb.Chain(list(reversed(bijectors)), name="flow_chain")


def inverse_and_log_det(
    chain: tfb.Chain, y: tf.Tensor, bijector_kwargs: Mapping[str, Mapping] | None = None
) -> tuple[tf.Tensor, tf.Tensor]:
    """z = T^{-1}(y) and log|det ∂z/∂y| of a :func:`build_bijector` chain in one pass: [N, D], [N].

    Equal to ``(chain.inverse(y, **kw), chain.inverse_log_det_jacobian(y, event_ndims=1, **kw))``
    but calls each MADE network once per layer instead of three times
    (TFP's Chain re-runs the inverses to reach each layer's input, and MAF evaluates its network
    separately for the inverse and the log-det), and shares the spline bin search between z and the
    log-det. Tested against TFP's Chain.
    """
    bijector_kwargs = bijector_kwargs or {}
    log_det = tf.zeros(tf.shape(y)[:-1], y.dtype)
    for bijector in chain.bijectors:          # tfb.Chain inverts its list left to right
        if isinstance(bijector, tfb.Permute):
            y = bijector.inverse(y)
            continue
        y, layer_log_det = bijector.transform.inverse_and_log_det(
            y, **bijector_kwargs.get(bijector.name, {})
        )
        log_det = log_det + layer_log_det
    return y, log_det


def inverse_and_log_det_grid(
    chain: tfb.Chain, y: tf.Tensor, bijector_kwargs: Mapping[str, Mapping] | None = None
) -> tuple[tf.Tensor, tf.Tensor]:
    """z = T^{-1}(y) and log|∂z/∂y| of a 1-D chain (dim = 1) at G values per row: y
    [N, G] -> [N, G], [N, G].

    In one dimension a MADE's output depends only on the labels c (no data column precedes y_0), so
    each layer's transform parameters θ_l(c) are computed once per row [N, 1, P] and applied to all
    G values of that row by broadcasting: the network runs N times per layer instead of N·G times.
    Equal to ``inverse_and_log_det`` on the N·G rows [y_ng] with c_n repeated (tested).
    """
    bijector_kwargs = bijector_kwargs or {}
    log_det = tf.zeros_like(y)
    for bijector in chain.bijectors:          # tfb.Chain inverts its list left to right
        if not hasattr(bijector, "transform") or bijector.transform.network.event_shape[-1] != 1:
            raise InputError("inverse_and_log_det_grid: needs a 1-D flow (FlowConfig.dim = 1)")
        transform = bijector.transform
        kwargs = bijector_kwargs.get(bijector.name, {})
        rows = tf.zeros(tf.stack([tf.shape(y)[0], 1]), y.dtype)  # ignored by a 1-D MADE
        params = (
            transform.network(rows, **kwargs) if transform.conditional else transform.network(rows)
        )
        y, layer_log_det = transform.inverse_elementwise(y, params)
        log_det = log_det + layer_log_det
    return y, log_det


@dataclass(frozen=True)
class _MadeBlock:
    """One masked dense block of a MADE: h_out = act(h_in W + b + c V + b_c); W is zero where
    masked.
    """

    kernel: tf.Variable                 # W [n_in, n_out]
    bias: tf.Variable | None            # b [n_out]
    label_kernel: tf.Variable | None    # V [C, n_out] (TFP: every block of a conditional MADE)
    label_bias: tf.Variable | None      # b_c [n_out] (TFP: none)
    activation: Any                     # applied to the block's output; None for the output block


@dataclass(frozen=True)
class _Truncation:
    """What output i of a MADE depends on: ``ends[i][k]`` leading inputs of block k
    (k = 0: data columns).

    ``params`` outputs per data column; output i is columns [i P, (i+1) P) of the last block.
    """

    blocks: tuple
    ends: tuple
    params: int


def _inbound(layer) -> list | None:
    """The Keras layers feeding ``layer`` in its (single) functional-graph node, or None if it has
    several.
    """
    nodes = getattr(layer, "_inbound_nodes", [])
    return [t._keras_history.layer for t in nodes[0].keras_inputs] if len(nodes) == 1 else None


def _linear_dense(layer) -> bool:
    return isinstance(layer, keras.layers.Dense) and layer.activation is keras.activations.linear


def _made_blocks(model) -> list[_MadeBlock] | None:
    """The blocks of TFP's MADE Keras model, read by walking its graph from the output back to the
    data input.

    TFP builds, per block: Dense(h) [+ Dense(c) via Add] [-> Activation], with the data x as the
    model's first input and the labels c as its second. Returns None for any other structure.
    """
    x_layer = model.inputs[0]._keras_history.layer
    c_layer = model.inputs[1]._keras_history.layer if len(model.inputs) > 1 else None
    blocks = []
    layer = model.outputs[0]._keras_history.layer
    for _ in range(len(model.layers) + 1):
        if layer is x_layer:
            return blocks[::-1]
        activation = labels = None
        if isinstance(layer, keras.layers.Activation):
            inbound = _inbound(layer)
            if inbound is None or len(inbound) != 1:
                return None
            activation, layer = layer.activation, inbound[0]
        if isinstance(layer, keras.layers.Add):
            inbound = _inbound(layer)
            if inbound is None or len(inbound) != 2:
                return None
            layer, labels = inbound
            if c_layer is None or not _linear_dense(labels) or _inbound(labels) != [c_layer]:
                return None
        inbound = _inbound(layer)
        if not _linear_dense(layer) or inbound is None or len(inbound) != 1:
            return None
        blocks.append(
            _MadeBlock(
                layer.kernel,
                layer.bias if layer.use_bias else None,
                None if labels is None else labels.kernel,
                labels.bias if labels is not None and labels.use_bias else None,
                activation,
            )
        )
        layer = inbound[0]
    return None


def label_kernels(chain: tfb.Chain) -> list[tf.Variable]:
    """The kernels V [C, n_out] through which the labels enter a conditional chain's MADEs.

    TFP feeds the (standardised) labels c [N, C] into every block of every conditional MADE,
    h_out = act(h_in W + b + c V), so row j of every V holds all the weights through which label
    column j acts: p(x | c) does not depend on c_j exactly when row j of every kernel is zero
    (the groups of :meth:`tfgalflow.model.Flow.set_label_lasso`). An unconditional chain has none.

    Args:
        chain: a built chain from :func:`build_bijector`.

    Returns:
        The kernel variables, MAF layers in chain order and blocks input to output.

    Raises:
        InputError: a conditional MADE whose layer graph is not TFP's (block: Dense + Dense(c)).
    """
    kernels = []
    for bijector in chain.bijectors:
        transform = getattr(bijector, "transform", None)
        if transform is None or not transform.conditional:
            continue
        blocks = _made_blocks(transform.network._network)
        if blocks is None or any(b.label_kernel is None for b in blocks):
            raise InputError(f"label_kernels: {bijector.name} is not a TFP MADE with the labels "
                             "in every block")
        kernels.extend(b.label_kernel for b in blocks)
    return kernels


def _leading(needed: np.ndarray) -> int | None:
    """n if ``needed`` (bool) is True exactly on its first n entries, else None."""
    n = int(needed.sum())
    return n if needed[:n].all() else None


def _truncation(network: tfb.AutoregressiveNetwork) -> _Truncation | None:
    """Per output i, the leading slices of each MADE block that output i depends on; None if not
    leading.

    From the masks alone: output i reads the last hidden units with a set mask entry to any of its
    ``params`` outputs; those read the units of the layer below with a set mask entry, and so on
    down to the data columns. With TFP's left-to-right input order and 'equal' hidden degrees
    (sorted), these are the units of degree <= i -- leading slices -- and the data columns 0..i-1.
    Another input order, random hidden degrees or an unexpected layer graph returns None.
    """
    try:
        model, masks = network._network, [np.asarray(m, bool) for m in network._masks]
        dim, params = int(network.event_shape[-1]), int(network.params)
        blocks = _made_blocks(model)
    except (AttributeError, IndexError, TypeError, ValueError):
        return None
    if (blocks is None or len(blocks) != len(masks) or masks[-1].shape[1] != dim * params
            or any(tuple(b.kernel.shape) != m.shape for b, m in zip(blocks, masks))):
        return None
    ends = []
    for i in range(dim):
        needed = np.arange(dim * params) // params == i          # the last block's outputs for y_i
        widths = [0] * len(masks)
        for k in reversed(range(len(masks))):
            needed = masks[k][:, needed].any(axis=1)             # inputs of block k that reach y_i
            width = _leading(needed)
            if width is None:
                return None
            widths[k] = width
        if widths[0] > i:               # y_i's parameters must not read y_i or later columns
            return None
        ends.append(tuple(widths))
    return _Truncation(tuple(blocks), tuple(ends), params)


@dataclass(frozen=True)
class _StackedLayers:
    """L MAF layers that share one truncation plan, their weights stacked along a leading layer
    axis.

    ``weights[k]`` = (W, b, V, b_c) of block k, each [L, ...] or None; ``permutations`` [L, D] is
    the permutation applied before each layer (identity before the first), or None if there are
    none.
    """

    # layer 0's transform: forward_with is the same maths for all
    transform: Any
    ends: tuple
    params: int
    activations: tuple
    weights: tuple
    permutations: Any
    conditional_input: Any


def _same_transform(a, b) -> bool:
    return (type(a) is type(b) and a.conditional == b.conditional
            and getattr(a, "bins", None) == getattr(b, "bins", None)
            and getattr(a, "bound", None) == getattr(b, "bound", None))


def _stack_layers(
    chain: tfb.Chain, z: tf.Tensor, bijector_kwargs: Mapping[str, Mapping]
) -> _StackedLayers | None:
    """The chain as stacked layers for :func:`forward`, or None if it is not that homogeneous.

    Needs: the chain is (Permute?) MAF, (Permute?) MAF, ... in application order; every MADE is
    built and truncatable with the same plan and block layout; all transforms are the same kind and
    constants; z is [N, D]; every layer gets the same ``conditional_input`` tensor [N, C]
    (or none).
    """
    if z.shape.rank != 2 or z.shape[-1] is None:
        return None
    layers, permutation = [], None
    for bijector in reversed(chain.bijectors):    # tfb.Chain applies its list right to left
        if isinstance(bijector, tfb.Permute):
            if permutation is not None:
                return None
            permutation = bijector.permutation
        elif isinstance(bijector, tfb.MaskedAutoregressiveFlow) and hasattr(bijector, "transform"):
            layers.append((permutation, bijector))
            permutation = None
        else:
            return None
    if not layers or permutation is not None:
        return None
    kwargs = [bijector_kwargs.get(b.name, {}) for _, b in layers]
    first = layers[0][1].transform
    conditional_input = kwargs[0].get("conditional_input")
    if any(set(kw) - {"conditional_input"} or kw.get("conditional_input") is not conditional_input
           for kw in kwargs):
        return None
    if first.conditional:
        if conditional_input is None:
            return None
        conditional_input = tf.convert_to_tensor(conditional_input, z.dtype)
        if conditional_input.shape.rank != 2:
            return None
    plans = []
    for _, bijector in layers:
        transform = bijector.transform
        if not _same_transform(transform, first) or not transform.network.built:
            return None
        plans.append(_truncation(transform.network))
    if plans[0] is None or any(p is None or p.ends != plans[0].ends or p.params != plans[0].params
                               for p in plans):
        return None
    layout = [
        [
            (
                tuple(b.kernel.shape),
                b.bias is None,
                b.label_kernel is None,
                b.label_bias is None,
                b.activation,
            )
            for b in p.blocks
        ]
        for p in plans
    ]
    if any(lay != layout[0] for lay in layout):
        return None

    def stacked(variables):
        return (
            None
            if variables[0] is None
            else tf.stack([tf.convert_to_tensor(v) for v in variables])
        )

    weights = tuple(
        tuple(stacked([getattr(p.blocks[k], name) for p in plans])
              for name in ("kernel", "bias", "label_kernel", "label_bias"))
        for k in range(len(plans[0].blocks)))
    dim = z.shape[-1]
    permutations = None
    if any(perm is not None for perm, _ in layers):
        identity = tf.range(dim, dtype=tf.int32)
        permutations = tf.stack(
            [identity if perm is None else tf.cast(perm, tf.int32) for perm, _ in layers]
        )
    return _StackedLayers(
        first,
        plans[0].ends,
        plans[0].params,
        tuple(b.activation for b in plans[0].blocks),
        weights,
        permutations,
        conditional_input,
    )


def _dense_slice(h, kernel, bias, label_term, n_in: int, columns: slice, batch) -> tf.Tensor:
    """Pre-activation of a block restricted to its first ``n_in`` inputs and the output
    ``columns``.

    h [N, n_in] (None if n_in = 0); kernel [n_in', n_out], bias [n_out] | None, label_term c
    V + b_c [N, n_out] | None. The same operations in the same order as the Keras layers
    (matmul, bias_add, + label term); the dropped terms are inputs times masked (exactly zero)
    weights.
    """
    if n_in:
        out = tf.matmul(h, kernel[:n_in, columns])
    else:                               # nothing below reaches these units: bias (+ labels) only
        out = tf.zeros(tf.stack([batch, columns.stop - columns.start]), kernel.dtype)
    if bias is not None:
        out = tf.nn.bias_add(out, bias[columns])
    if label_term is not None:
        out = out + label_term[:, columns]
    return out


def _truncated_passes(layers: _StackedLayers, weights, z: tf.Tensor) -> tf.Tensor:
    """One MAF layer's sampling direction, y_i = τ(z_i; θ_i(y_<i, c)) for i = 0..D-1, in D unrolled
    passes that evaluate only the MADE units output i depends on: z [N, D] -> y [N, D].

    ``weights``: per block (W, b, V, b_c) of this layer (tensors or None).
    """
    batch, p, c = tf.shape(z)[0], layers.params, layers.conditional_input
    # c V + b_c does not depend on y: once per layer, sliced by every pass
    label_terms = []
    for _, _, label_kernel, label_bias in weights:
        term = None if label_kernel is None else tf.matmul(c, label_kernel)
        if label_bias is not None:
            term = tf.nn.bias_add(term, label_bias)
        label_terms.append(term)
    columns = []                        # y_0, y_1, ..., each [N, 1]
    last = len(weights) - 1
    for i, ends in enumerate(layers.ends):
        h = tf.concat(columns[:ends[0]], axis=-1) if ends[0] else None
        for k, ((kernel, bias, _, _), activation) in enumerate(zip(weights, layers.activations)):
            out = slice(i * p, (i + 1) * p) if k == last else slice(0, ends[k + 1])
            h = _dense_slice(h, kernel, bias, label_terms[k], ends[k], out, batch)
            if activation is not None:
                h = activation(h)
        columns.append(layers.transform.forward_with(z[:, i:i + 1], h[:, tf.newaxis, :]))
    return tf.concat(columns, axis=-1)


def _forward_stacked(layers: _StackedLayers, z: tf.Tensor) -> tf.Tensor:
    """All layers: a ``tf.while_loop`` over the layer index l, reading layer l's weights from the
    stacks.
    """
    n_layers = layers.weights[0][0].shape[0]

    def layer(index, y):
        if layers.permutations is not None:
            y = tf.gather(y, layers.permutations[index], axis=-1)
        weights = [
            tuple(None if w is None else w[index] for w in block) for block in layers.weights
        ]
        return index + 1, _truncated_passes(layers, weights, y)

    return tf.while_loop(
        lambda index, y: True, layer, (tf.constant(0), z), maximum_iterations=n_layers
    )[1]


def _forward_loop(transform, z: tf.Tensor, kwargs: Mapping[str, Any]) -> tf.Tensor:
    """One MAF layer's sampling direction by D full passes y <- τ(z; θ(y, c)) in a
    ``tf.while_loop`` (after pass i the first i+1 outputs are exact), as TFP's
    MaskedAutoregressiveFlow does: [N, D].
    """
    def one_pass(y):
        return (transform.forward_given(z, y, **kwargs),)

    if z.shape[-1] == 1:
        return one_pass(tf.zeros_like(z))[0]
    return tf.while_loop(
        lambda y: True, one_pass, (tf.zeros_like(z),), maximum_iterations=z.shape[-1]
    )[0]


def forward(chain: tfb.Chain, z: tf.Tensor, bijector_kwargs: Mapping[str, Mapping] | None = None,
            truncate: bool = True) -> tf.Tensor:
    """Sampling direction y = T(z) of a :func:`build_bijector` chain: [N, D] -> [N, D].

    Equal to ``chain.forward(z, **kw)`` up to float32 round-off. Each MAF layer solves
    y_i = τ(z_i; θ_i(y_<i, c)) for i = 0..D-1 in D passes, and pass i evaluates only the part of
    the MADE that θ_i depends on (TFP instead repeats the full network D times in a
    ``tf.while_loop``). In a MADE (Germain et al. 2015, "MADE: Masked Autoencoder for Distribution
    Estimation") data column j has degree j+1, hidden unit u of layer l a degree m_l(u), and unit u
    sees unit v of the layer below only if m_l(u) >= m_{l-1}(v); output i (degree i+1) sees the
    last hidden units of degree < i+1. So

        θ_i = b_out,i + V_out,i c + W_out[S_L(i), i] h_L(i),
        h_l(i) = act(b_l[S_l(i)] + V_l[:, S_l(i)] c + W_l[S_{l-1}(i), S_l(i)] h_{l-1}(i)),
        S_l(i) = {u : m_l(u) <= i},   h_0(i) = y_<i,

    and every dropped term is a unit times a masked weight, which TFP keeps exactly zero (masked
    initializer and kernel constraint). TFP's 'equal' degrees are sorted, so each S_l(i) is a
    leading slice [0, n_l(i)): pass 0 is the output bias (+ labels) alone and pass i of a width-H
    layer costs ~(i/(D-1))^2 of the full H x H product. The slices are derived from the network's
    masks and checked (:func:`_truncation`); a MADE without leading slices
    (another input order, random degrees) falls back to the full-pass loop. The label terms c V_l
    do not depend on y and are computed once per layer, and the affine/spline transform of pass i
    acts on column i only (the loop transforms all D columns D times: for splines this, not the
    MADE, dominated the cost).

    The D passes are unrolled (static slice widths) inside a ``tf.while_loop`` over the L layers,
    whose weights are stacked along a leading axis, so the traced graph does not grow with L.
    Chains that are not uniform (mixed kinds, a MADE that does not truncate, per-layer labels) use
    the full-pass loop per layer; ``truncate=False`` forces it
    (the reference the tests compare with).

    Truncation is faster than the full-pass loop for affine flows and much faster for splines
    (whose per-column transform dominated the loop), with a smaller graph and a faster first call;
    unrolling the layers or XLA-compiling the sampler does not pay (figures: benchmarks/README.md).
    """
    bijector_kwargs = bijector_kwargs or {}
    # create the MADE variables (as TFP's MAF does before its loop)
    for bijector in chain.bijectors:
        if hasattr(bijector, "transform") and not bijector.transform.network.built:
            bijector.transform.forward_given(
                z, tf.zeros_like(z), **bijector_kwargs.get(bijector.name, {})
            )
    layers = _stack_layers(chain, z, bijector_kwargs) if truncate else None
    if layers is not None:
        return _forward_stacked(layers, z)
    for bijector in reversed(chain.bijectors):    # tfb.Chain applies its list right to left
        kwargs = bijector_kwargs.get(bijector.name, {})
        if hasattr(bijector, "transform"):
            z = _forward_loop(bijector.transform, z, kwargs)
        else:
            z = bijector.forward(z, **kwargs)
    return z
