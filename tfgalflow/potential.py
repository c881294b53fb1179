"""A potential network Φ_θ(x | c) fitted to the collisionless Boltzmann equation of a phase-space
DF.

A steady-state DF f(x, v) in a potential Φ obeys, at every phase-space point (dividing by f),

    v · ∇_x log f − ∇Φ · ∇_v log f = 0.

Instead of solving for a(x) position by position (:mod:`tfgalflow.cbe`), :func:`fit_potential` fits
one smooth network Φ_θ(x) over the whole volume, with no symmetry assumed (Green, Ting & Kamdar
2023, ApJ 942, 26, "Deep Potential"). Then

    a(x) = −∇Φ_θ(x)                (curl-free by construction: the Jacobian ∂a_i/∂x_j is symmetric)
    ρ(x) = ∇²Φ_θ(x) / (4π G)       (Laplacian by nested GradientTapes)

The fit, step by step:

1. phase-space points (x_n, v_n) are drawn from the DF (``df.sample``) or taken from a catalogue;
   rows where log f or its gradient is not finite (outside the DF's support) are dropped;
2. ∇_x log f and ∇_v log f are computed ONCE by GradientTape (``df.grad_log_prob``, batched) and
   reused every epoch, together with a per-point scale s_n = |∇_v log f_n| <|v|²>(r_n) / r_n
   (:func:`residual_scale`: |∇_v log f| times a local virial estimate of |a|), so that the residual
   R_n / s_n is the acceleration error along ∇_v log f relative to the local |a|, at every radius;
3. loss = ⟨ρ(R_n / (δ s_n))⟩ + λ ⟨asinh(max(−∇²Φ, 0) / L_0)⟩ with the robust norm
   ρ(z) = z asinh z (quadratic for |z| << 1, |z| log|z| growth: convex, smooth, robust to the
   points where the learned DF is poor), δ = ``robust_scale``, L_0 = Φ_0 / ℓ² and
   λ = ``laplacian_weight`` (the penalty pushes towards ρ >= 0; it is zero for any physical
   potential);
4. Adam with a cosine-decayed learning rate, early stopping on a held-out fraction of the points
   (best weights restored).

Network. Positions are centred on the median of the training positions and compressed radially,

    u = x̃ asinh(|x̃|) / |x̃|,   x̃ = (x − centre) / ℓ,
    ℓ = ``length_scale`` (default: the 1 % quantile of |x − centre|, :data:`LENGTH_QUANTILE`),

(smooth at x̃ = 0; linear inside ℓ, logarithmic beyond, so one MLP spans decades in radius: with ℓ
at the innermost data, Φ(|x|) is a smooth function of u even for a cusp, where Φ ∝ |x| near the
centre and a median-sized ℓ made the network round the cone off: ``studies/potential``), then
an MLP with a smooth activation (softplus, tanh, swish, sigmoid: ∇²Φ must exist) maps (u, labels
rescaled) to a scalar N. The potential is Φ_θ(x) = Φ_0 [N(u(x)) − N(u(x_ref))] + Φ_ext(x):

* **gauge**: Φ_θ(x_ref) = 0 exactly, x_ref = ``reference`` (default: the centre). The data fix only
  ∇Φ; the constant is a choice, and "Φ → 0 far out" would need an extrapolation beyond the data
  that the CBE does not constrain. Compare potentials as Φ(x) − Φ(x_ref);
* Φ_0 = ``output_scale`` x mean |v|² of the training points (mean |v|² is the virial scale of
  |Φ|; the default fraction 0.2 keeps the untrained network's random field and Adam's first steps
  small against the field to be learned, which matters most when a fixed external part carries
  most of Φ: ``studies/potential``); the DF's ``scale_hint`` is not used (its position part is
  the flow's rescaler, too wide for the compression);
* Φ_ext: an optional known external potential (a TF-traceable callable x [N, 3] -> [N]) held
  fixed: the network fits the rest. It enters the SavedModel graph as traced ops.

Support. A position x is ``supported`` when at least ``support_neighbours`` (k) of the stored
training positions (a subsample of ``support_points``) lie within η (|x − centre| + h) of it,
h = 0.1 x the median |x − centre| of the training positions,
η = ``support_radius``: a data-extent test that scales with radius (what a DF sampled by stars can
constrain). Outputs at unsupported positions are returned but flagged: every output method and
signature carries the ``supported`` mask.

Units: those of the DF (x in length, v in velocity); Φ in velocity², a in velocity²/length,
ρ in mass/length³ for the given G (model units: G = 1; kpc, km/s, Msun: G = 4.30092e-6).

Conditional DFs f(x, v | c): the labels are extra inputs of the network, Φ(x | c); pass labels
everywhere (``fit_potential(df, labels=...)`` to draw training points at those labels).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tensorflow as tf
import tf_keras as keras

from . import __version__
from .atomic import atomic_dir
from .density import Density, as_float32, check_finite, shape_of
from .errors import FileError, InputError
from .validation import finite_matrix, integer, one_of, positive_number

ACTIVATIONS = ("softplus", "tanh", "swish", "sigmoid")
POTENTIAL_FORMAT = "tfgalflow-potential"
POTENTIAL_FORMAT_VERSION = 1
#: Signatures of an exported potential (each also returns ``supported`` [N] bool).
POTENTIAL_SIGNATURES = ("potential", "acceleration", "density")
METADATA_VARIABLE = "tfgalflow_metadata"
#: Default ℓ of the input compression: this quantile of the training points' |x − centre|.
LENGTH_QUANTILE = 0.01
#: Rows per chunk of the support test and of eager evaluation.
ROWS_PER_CHUNK = 4096


# ---- configuration ------------------------------------------------------------------------------

@dataclass(frozen=True)
class PotentialConfig:
    """Settings of :func:`fit_potential` (all JSON-serialisable; stored in the potential's
    config.json).

    Attributes:
        hidden: widths of the MLP's hidden layers.
        activation: smooth activation (one of :data:`ACTIVATIONS`).
        n_points: phase-space points drawn from the DF (ignored when ``data`` is given).
        epochs, batch_size, lr, patience: Adam with cosine decay; early stopping after ``patience``
            epochs without improvement of the held-out loss (best weights restored).
        validation_split: held-out fraction of the points.
        robust_scale: δ of the robust norm ρ(R / (δ s)); residuals >> δ grow only as |z| log|z|.
        laplacian_weight: λ of the penalty on negative ∇²Φ (0: off).
        G: gravitational constant in the DF's units (ρ = ∇²Φ / 4πG).
        output_scale: Φ_0 = output_scale x mean |v|² of the points (the network's output unit:
            larger values make the initial field and the Adam steps in Φ larger).
        length_scale: ℓ of the input compression (None: the :data:`LENGTH_QUANTILE` quantile of
            |x − centre| of the points).
        reference: x_ref of the gauge Φ(x_ref) = 0 (None: the centre of the points).
        support_points, support_neighbours, support_radius: the support test (module docstring).
        seed: seed of the draws, the split, the initial weights and the shuffling.
    """

    hidden: tuple[int, ...] = (128, 128, 128)
    activation: str = "softplus"
    n_points: int = 2**16
    epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-2
    patience: int = 15
    validation_split: float = 0.1
    robust_scale: float = 1.0
    laplacian_weight: float = 0.01
    G: float = 1.0
    output_scale: float = 0.2
    length_scale: float | None = None
    reference: tuple[float, float, float] | None = None
    support_points: int = 8192
    support_neighbours: int = 8
    support_radius: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        hidden = tuple(self.hidden)
        if not hidden:
            raise InputError(
                "PotentialConfig.hidden = (): expected at least one hidden layer width"
            )
        for width in hidden:
            integer(width, "PotentialConfig.hidden entry")
        object.__setattr__(self, "hidden", hidden)
        one_of(self.activation, "PotentialConfig.activation", ACTIVATIONS)
        for name in ("n_points", "epochs", "batch_size", "patience", "support_points",
                     "support_neighbours"):
            integer(getattr(self, name), f"PotentialConfig.{name}")
        for name in ("lr", "robust_scale", "G", "support_radius", "output_scale"):
            positive_number(getattr(self, name), f"PotentialConfig.{name}")
        positive_number(self.laplacian_weight, "PotentialConfig.laplacian_weight", allow_zero=True)
        if not 0.0 < float(self.validation_split) < 1.0:
            raise InputError(f"PotentialConfig.validation_split = {self.validation_split!r}: "
                             f"expected a fraction in (0, 1)")
        if self.length_scale is not None:
            positive_number(self.length_scale, "PotentialConfig.length_scale")
        if self.reference is not None:
            ref = finite_matrix([self.reference], "PotentialConfig.reference", width=3,
                                expected="[3] (x, y, z)")[0]
            object.__setattr__(self, "reference", tuple(float(r) for r in ref))
        integer(self.seed, "PotentialConfig.seed", low=0)

    def to_dict(self) -> dict:
        """The config as plain JSON types."""
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        d["reference"] = None if self.reference is None else list(self.reference)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PotentialConfig":
        """The config from ``to_dict()``'s dict (InputError for unknown fields)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(
                f"unknown PotentialConfig key(s) {unknown}; expected some of {sorted(known)}"
            )
        d = dict(d)
        if "hidden" in d:
            d["hidden"] = tuple(d["hidden"])
        if d.get("reference") is not None:
            d["reference"] = tuple(d["reference"])
        return cls(**d)

    def with_overrides(self, **overrides: Any) -> "PotentialConfig":
        """A copy with the given fields replaced (None leaves a field as it is)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})


# ---- the network --------------------------------------------------------------------------------

def compress(x_tilde: tf.Tensor) -> tf.Tensor:
    """u = x̃ asinh(|x̃|) / |x̃| [N, 3]: identity near 0, logarithmic in radius beyond 1 (smooth).

    asinh(s)/s = 1 − s²/6 + ... is even in s, so u is a smooth function of x̃ (including x̃ = 0,
    where the small-s branch of the series is used to avoid 0/0).
    """
    s2 = tf.reduce_sum(tf.square(x_tilde), axis=-1, keepdims=True)
    small = s2 < 1e-6
    s = tf.sqrt(tf.where(small, tf.ones_like(s2), s2))
    ratio = tf.where(small, 1.0 - s2 / 6.0, tf.math.asinh(s) / s)
    return x_tilde * ratio


def _mlp(hidden: tuple[int, ...], activation: str, input_dim: int, seed: int) -> keras.Sequential:
    init = lambda k: keras.initializers.GlorotUniform(seed=seed + k)   # noqa: E731
    layers = [keras.layers.Dense(w, activation=activation, kernel_initializer=init(i))
              for i, w in enumerate(hidden)]
    layers.append(keras.layers.Dense(1, kernel_initializer=init(len(hidden))))
    net = keras.Sequential(layers)
    net.build((None, input_dim))
    return net


class PotentialModel(tf.Module):
    """The fitted potential Φ(x | c) with its derivatives: potential, acceleration, density,
    support.

    Built by :func:`fit_potential` or :func:`load_potential`. Public methods take x [N, 3] (and
    labels [N, C] for a conditional potential), validate them (InputError for a wrong shape, NaN or
    inf), run in one traced graph per method (free batch dimension) and return NumPy arrays:

    * :meth:`potential` Φ [N], :meth:`acceleration` a = −∇Φ [N, 3], :meth:`density` ρ = ∇²Φ/4πG
    [N],
      :meth:`supported` [N] bool, :meth:`evaluate` all four at once.

    Attributes: ``config`` (:class:`PotentialConfig`), ``label_dim``, ``constants`` (centre, length
    scale, Φ_0, reference, label shift/scale as a dict of NumPy arrays), ``external`` (the fixed
    external potential or None), ``history`` (per-epoch losses of the fit).
    """

    def __init__(self, config: PotentialConfig, constants: dict, label_dim: int = 0,
                 external: Callable[[tf.Tensor], tf.Tensor] | None = None,
                 external_name: str | None = None):
        super().__init__(name="potential")
        self.config = config
        self.label_dim = int(label_dim)
        self.constants = {k: np.asarray(v, np.float32) for k, v in constants.items()}
        self.external = external
        self.external_name = external_name if external is not None else None
        self.history: dict = {}
        c = self.constants
        self.centre = tf.constant(c["centre"], tf.float32)                     # [3]
        self.length_scale = tf.constant(float(c["length_scale"]), tf.float32)
        # potentials saved before support_scale was stored used ℓ / 10 (ℓ was the median radius)
        self.support_scale = tf.constant(
            float(c.get("support_scale", 0.1 * float(c["length_scale"]))), tf.float32)
        self.phi_scale = tf.constant(float(c["phi_scale"]), tf.float32)
        self.reference = tf.constant(c["reference"], tf.float32)               # [3]
        self.label_shift = tf.constant(c["label_shift"], tf.float32)           # [C]
        self.label_scale = tf.constant(c["label_scale"], tf.float32)           # [C]
        self.support_positions = tf.constant(c["support_positions"], tf.float32)   # [S, 3]
        self.network = _mlp(config.hidden, config.activation, 3 + self.label_dim, config.seed)
        self.__dict__["_functions"] = None

    # -- the maths as TF ops ----------------------------------------------------------------------
    def _features(self, x: tf.Tensor, labels: tf.Tensor | None) -> tf.Tensor:
        u = compress((x - self.centre) / self.length_scale)
        if self.label_dim:
            u = tf.concat([u, (labels - self.label_shift) / self.label_scale], axis=1)
        return u

    def network_potential_tensor(self, x: tf.Tensor, labels: tf.Tensor | None = None) -> tf.Tensor:
        """Φ_θ(x | c) [N] (gauge applied, without Φ_ext) as TF ops, no validation."""
        n = self.network(self._features(x, labels))[:, 0]
        ref = tf.broadcast_to(self.reference, tf.shape(x))
        n_ref = self.network(self._features(ref, labels))[:, 0]
        return self.phi_scale * (n - n_ref)

    def potential_tensor(self, x: tf.Tensor, labels: tf.Tensor | None = None) -> tf.Tensor:
        """Φ(x | c) = Φ_θ + Φ_ext [N] as TF ops, no validation."""
        phi = self.network_potential_tensor(x, labels)
        if self.external is not None:
            phi = phi + tf.cast(self.external(x), tf.float32)
        return phi

    def derivatives_tensor(self, x: tf.Tensor, labels: tf.Tensor | None = None,
                           laplacian: bool = True) -> dict[str, tf.Tensor]:
        """{potential [N], gradient ∇Φ [N, 3], laplacian ∇²Φ [N]} by nested GradientTapes.

        Rows are independent (an MLP per row), so d(Σ_n ∂Φ_n/∂x_ni)/dx_n = ∂²Φ_n/∂x_ni∂x_n.
        """
        with tf.GradientTape(persistent=True) as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                phi = self.potential_tensor(x, labels)
            grad = inner.gradient(phi, x, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            parts = [grad[:, i] for i in range(3)] if laplacian else []
        out = {"potential": phi, "gradient": grad}
        if laplacian:
            out["laplacian"] = tf.add_n(
                [
                    outer.gradient(
                        parts[i], x, unconnected_gradients=tf.UnconnectedGradients.ZERO
                    )[:, i]
                    for i in range(3)
                ]
            )
        del outer
        return out

    def supported_tensor(self, x: tf.Tensor) -> tf.Tensor:
        """[N] bool: at least k stored training positions within η (|x − centre| + h) of x.

        Runs over chunks of :data:`ROWS_PER_CHUNK` rows (memory [chunk, S]) as a ``tf.map_fn``.
        """
        cfg = self.config
        k = min(cfg.support_neighbours, int(self.constants["support_positions"].shape[0]))
        n = tf.shape(x)[0]
        chunks = (n + ROWS_PER_CHUNK - 1) // ROWS_PER_CHUNK
        padded = tf.pad(x, [[0, chunks * ROWS_PER_CHUNK - n], [0, 0]])
        blocks = tf.reshape(padded, [chunks, ROWS_PER_CHUNK, 3])
        p = self.support_positions
        p2 = tf.reduce_sum(tf.square(p), axis=1)

        def count(block):
            d2 = (tf.reduce_sum(tf.square(block), 1, keepdims=True) + p2[None, :]
                  - 2.0 * tf.matmul(block, p, transpose_b=True))  # [chunk, S]
            h = cfg.support_radius * (
                tf.norm(block - self.centre, axis=1) + self.support_scale
            )
            return tf.reduce_sum(tf.cast(d2 < tf.square(h)[:, None], tf.int32), axis=1)

        counts = tf.reshape(tf.map_fn(count, blocks, fn_output_signature=tf.int32), [-1])[:n]
        return counts >= k

    def outputs_tensor(
        self, x: tf.Tensor, labels: tf.Tensor | None = None
    ) -> dict[str, tf.Tensor]:
        """Every output as TF ops: potential [N], acceleration [N, 3], density [N], supported
        [N].
        """
        d = self.derivatives_tensor(x, labels)
        return {"potential": d["potential"], "acceleration": -d["gradient"],
                "density": d["laplacian"] / (4.0 * math.pi * self.config.G),
                "supported": self.supported_tensor(x)}

    # -- validated public methods -----------------------------------------------------------------
    def check_inputs(self, x: Any, labels: Any = None) -> tuple[tf.Tensor, tf.Tensor | None]:
        """x [N, 3] (and labels [N, C] for a conditional potential) as float32; InputError
        otherwise.
        """
        from .density import validate_inputs
        return validate_inputs(x, labels, 3, self.label_dim, "potential")

    def _traced(self) -> dict:
        fns = self.__dict__.get("_functions")
        if fns is None:
            x_spec = tf.TensorSpec([None, 3], tf.float32, name="x")
            specs = [x_spec] + ([tf.TensorSpec([None, self.label_dim], tf.float32, name="labels")]
                                if self.label_dim else [])
            wrap = (lambda f: (lambda x, labels: f(x, labels))) if self.label_dim else \
                (lambda f: (lambda x: f(x, None)))
            fns = {name: tf.function(wrap(f), input_signature=specs, autograph=False)
                   for name, f in (
                       ("outputs", self.outputs_tensor),
                       ("potential", lambda x, c: {"potential": self.potential_tensor(x, c)}),
                       ("acceleration", lambda x, c: {
                           "acceleration": -self.derivatives_tensor(x, c, False)["gradient"]}))}
            fns["supported"] = tf.function(lambda x: self.supported_tensor(x),
                                           input_signature=[x_spec], autograph=False)
            self.__dict__["_functions"] = fns
        return fns

    def _run(self, name: str, x: Any, labels: Any) -> dict[str, np.ndarray]:
        x, c = self.check_inputs(x, labels)
        fn = self._traced()[name]
        pieces = []
        for start in range(0, max(int(x.shape[0]), 1), ROWS_PER_CHUNK):
            rows = slice(start, start + ROWS_PER_CHUNK)
            out = fn(x[rows], c[rows]) if self.label_dim else fn(x[rows])
            pieces.append({k: v.numpy() for k, v in out.items()})
        return {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}

    def evaluate(self, x: Any, labels: Any = None) -> dict[str, np.ndarray]:
        """{potential [N], acceleration [N, 3], density [N], supported [N] bool} at x [N, 3]."""
        return self._run("outputs", x, labels)

    def potential(self, x: Any, labels: Any = None) -> np.ndarray:
        """Φ(x | c) [N] (velocity² units; Φ(reference) = 0 for the network part)."""
        return self._run("potential", x, labels)["potential"]

    def acceleration(self, x: Any, labels: Any = None) -> np.ndarray:
        """a = −∇Φ [N, 3] (velocity²/length), by GradientTape."""
        return self._run("acceleration", x, labels)["acceleration"]

    def density(self, x: Any, labels: Any = None) -> np.ndarray:
        """ρ = ∇²Φ / (4π G) [N] (mass/length³), Laplacian by nested GradientTapes."""
        return self._run("outputs", x, labels)["density"]

    def supported(self, x: Any) -> np.ndarray:
        """[N] bool: whether the training data cover x (see the module docstring)."""
        x, _ = validate_inputs_positions(x)
        fn = self._traced()["supported"]
        return np.concatenate([fn(x[s:s + ROWS_PER_CHUNK]).numpy()
                               for s in range(0, int(x.shape[0]), ROWS_PER_CHUNK)])

    # -- files ------------------------------------------------------------------------------------
    def metadata(self) -> dict:
        """What config.json and the SavedModel's metadata record."""
        return {
            "format": POTENTIAL_FORMAT,
            "format_version": POTENTIAL_FORMAT_VERSION,
            "tfgalflow_version": __version__,
            "config": self.config.to_dict(),
            "label_dim": self.label_dim,
            "external": self.external_name,
            "constants": {
                k: v.tolist() for k, v in self.constants.items() if k != "support_positions"
            },
            "support_positions": int(self.constants["support_positions"].shape[0]),
            "signatures": list(POTENTIAL_SIGNATURES),
            "units": "Phi: velocity^2; acceleration: velocity^2/length; density: mass/length^3 "
            "(G as in config)",
            # tf.Module wraps dict/list attributes for tracking: plain copies for JSON
            "history": {str(k): [float(x) for x in v] for k, v in self.history.items()},
        }

    def save(
        self, path: str | os.PathLike, *, export: bool = True, overwrite: bool = False
    ) -> Path:
        """Write the potential directory atomically: config.json, weights.npz (network weights and
        constants) and, with ``export``, the SavedModel in ``savedmodel/`` (see :meth:`export`).
        """
        path = Path(path)
        try:
            with atomic_dir(path, overwrite=overwrite) as tmp:
                arrays = {f"weight_{i}": w for i, w in enumerate(self.network.get_weights())}
                arrays.update({f"const_{k}": v for k, v in self.constants.items()})
                np.savez(tmp / "weights.npz", **arrays)
                (tmp / "config.json").write_text(json.dumps(self.metadata(), indent=2,
                                                            sort_keys=True) + "\n")
                if export:
                    self._write_saved_model(tmp / "savedmodel")
        except FileExistsError as exc:
            raise FileError(str(exc)) from None
        return path

    def export(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write a SavedModel (atomically) with signatures ``potential``, ``acceleration``,
        ``density`` (= serving_default: all outputs) taking x [N, 3] f32 (+ labels [N, C]) and
        returning their output plus ``supported`` [N] bool; metadata JSON in the string variable
        ``tfgalflow_metadata``. Core TF ops only: reloads with plain ``tf.saved_model.load``.
        """
        path = Path(path)
        try:
            with atomic_dir(path, overwrite=overwrite) as tmp:
                self._write_saved_model(tmp)
        except FileExistsError as exc:
            raise FileError(str(exc)) from None
        return path

    def _write_saved_model(self, path: Path) -> None:
        module = tf.Module()
        clone = _mlp(self.config.hidden, self.config.activation, 3 + self.label_dim,
                     self.config.seed)
        clone.set_weights(self.network.get_weights())
        module.network = clone
        setattr(module, METADATA_VARIABLE, tf.Variable(json.dumps(self.metadata(), sort_keys=True),
                                                       trainable=False, dtype=tf.string))
        twin = PotentialModel(self.config, self.constants, self.label_dim, self.external,
                              self.external_name)
        twin.network = clone
        x_spec = tf.TensorSpec([None, 3], tf.float32, name="x")
        specs = [x_spec] + ([tf.TensorSpec([None, self.label_dim], tf.float32, name="labels")]
                            if self.label_dim else [])

        def make(keys: tuple[str, ...], laplacian: bool):
            def body(x, labels=None):
                d = twin.derivatives_tensor(x, labels, laplacian)
                out = {"potential": d["potential"], "acceleration": -d["gradient"],
                       "supported": twin.supported_tensor(x)}
                if laplacian:
                    out["density"] = d["laplacian"] / (4.0 * math.pi * self.config.G)
                return {k: out[k] for k in keys}
            if self.label_dim:
                return tf.function(lambda x, labels: body(x, labels), input_signature=specs)
            return tf.function(lambda x: body(x), input_signature=specs)

        module.potential = make(("potential", "supported"), False)
        module.acceleration = make(("acceleration", "supported"), False)
        module.density = make(("potential", "acceleration", "density", "supported"), True)
        signatures = {"potential": module.potential.get_concrete_function(),
                      "acceleration": module.acceleration.get_concrete_function(),
                      "density": module.density.get_concrete_function()}
        signatures["serving_default"] = signatures["density"]
        tf.saved_model.save(module, str(path), signatures=signatures)


def validate_inputs_positions(x: Any) -> tuple[tf.Tensor, None]:
    """x [N, 3] float32 (finite) or InputError naming the shape."""
    t = as_float32(x, "x")
    if t.shape.rank != 2 or t.shape[1] != 3:
        raise InputError(f"x has shape {shape_of(t)}; the potential expects positions [N, 3]")
    check_finite(t, "x")
    return t, None


# ---- field files --------------------------------------------------------------------------------

#: File types :func:`save_field` writes.
FIELD_SUFFIXES = (".npz", ".csv")


def save_field(path: str | os.PathLike, positions: Any, outputs: dict) -> None:
    """Write positions [B, 3] and a potential's outputs (``evaluate``) atomically as .npz or .csv.

    Columns: x, y, z, r, ax, ay, az, a_radial (a · x/|x|, negative for attraction), potential,
    density, supported (0/1), flagged (0/1 = not supported) and reasons ("no_support" or "").
    InputError for another suffix (checked before anything is computed by the caller, too).
    """
    from .atomic import atomic_file
    from .cbe import radial_component

    suffix = Path(path).suffix.lower()
    if suffix not in FIELD_SUFFIXES:
        raise InputError(f"{path}: unknown output type {suffix!r}; use .npz or .csv")
    x = finite_matrix(positions, "positions", width=3, expected="[B, 3]")
    a = np.asarray(outputs["acceleration"], np.float64)
    supported = np.asarray(outputs["supported"], bool)
    cols = {"positions": x, "radius": np.linalg.norm(x, axis=1), "acceleration": a,
            "a_radial": radial_component(x, a),
            "potential": np.asarray(outputs["potential"], np.float64),
            "density": np.asarray(outputs["density"], np.float64), "supported": supported,
            "flagged": ~supported, "reasons": np.where(supported, "", "no_support").astype(str)}
    if suffix == ".npz":
        with atomic_file(path, suffix=".npz") as tmp:
            np.savez(tmp, **cols)
        return
    table = np.column_stack([x, cols["radius"], a, cols["a_radial"], cols["potential"],
                             cols["density"]])
    with atomic_file(path) as tmp, open(tmp, "w") as fh:
        fh.write("x,y,z,r,ax,ay,az,a_radial,potential,density,supported,flagged,reasons\n")
        for row, ok in zip(table, supported):
            fh.write(",".join(f"{v:.9g}" for v in row) + f",{int(ok)},{int(not ok)},"
                     f"{'' if ok else 'no_support'}\n")


# ---- loading ------------------------------------------------------------------------------------

class ExportedPotential:
    """A potential SavedModel loaded with plain TensorFlow: the same methods as PotentialModel.

    ``potential``, ``acceleration``, ``density``, ``evaluate``, ``supported`` take x [N, 3] (and
    labels [N, C] if conditional), validate them and return NumPy arrays from the exported
    signatures.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / "saved_model.pb").is_file():
            raise FileError(f"{self.path}: not a SavedModel directory (no saved_model.pb)")
        try:
            self._loaded = tf.saved_model.load(str(self.path))
        except Exception as exc:   # noqa: BLE001 - TF raises many types here
            raise FileError(f"{self.path}: the SavedModel cannot be loaded: {exc}") from None
        missing = [s for s in POTENTIAL_SIGNATURES if s not in self._loaded.signatures]
        if missing:
            raise FileError(f"{self.path}: not a tfgalflow potential: missing signature(s) "
                            f"{', '.join(missing)}")
        self.metadata = json.loads(getattr(self._loaded, METADATA_VARIABLE).numpy().decode())
        self.label_dim = int(self.metadata.get("label_dim", 0))
        self.config = PotentialConfig.from_dict(self.metadata["config"])

    def _run(self, name: str, x: Any, labels: Any) -> dict[str, np.ndarray]:
        from .density import validate_inputs
        x, c = validate_inputs(x, labels, 3, self.label_dim, "potential")
        fn = self._loaded.signatures[name]
        pieces = []
        for s in range(0, int(x.shape[0]), ROWS_PER_CHUNK):
            kwargs = {"x": x[s:s + ROWS_PER_CHUNK]}
            if self.label_dim:
                kwargs["labels"] = c[s:s + ROWS_PER_CHUNK]
            pieces.append({k: v.numpy() for k, v in fn(**kwargs).items()})
        return {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}

    def evaluate(self, x: Any, labels: Any = None) -> dict[str, np.ndarray]:
        """{potential, acceleration, density, supported} at x [N, 3] (one signature call)."""
        return self._run("density", x, labels)

    def potential(self, x: Any, labels: Any = None) -> np.ndarray:
        """Φ(x) [N] (velocity² units; Φ(x_ref) = 0)."""
        return self._run("potential", x, labels)["potential"]

    def acceleration(self, x: Any, labels: Any = None) -> np.ndarray:
        """a = -∇Φ(x) [N, 3] (velocity² / length)."""
        return self._run("acceleration", x, labels)["acceleration"]

    def density(self, x: Any, labels: Any = None) -> np.ndarray:
        """ρ = ∇²Φ / 4πG [N] (mass / length³ in the DF's units)."""
        return self._run("density", x, labels)["density"]

    def supported(self, x: Any, labels: Any = None) -> np.ndarray:
        """[N] bool: training data near x (else the outputs are extrapolations, not to be
        trusted).
        """
        return self._run("potential", x, labels)["supported"]


def is_potential_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a potential directory written by :meth:`PotentialModel.save`."""
    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "weights.npz").is_file():
        return False
    try:
        return json.loads((path / "config.json").read_text()).get("format") == POTENTIAL_FORMAT
    except (OSError, ValueError):
        return False


def is_potential(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a potential directory or a potential SavedModel (signatures
    potential/acceleration/density), judged from the files without loading TensorFlow graphs.
    """
    path = Path(path)
    if is_potential_dir(path):
        return True
    if not (path / "saved_model.pb").is_file():
        return False
    from .export import read_signature_defs
    try:
        return all(s in read_signature_defs(path) for s in POTENTIAL_SIGNATURES)
    except FileError:
        return False


def load_potential(path: str | os.PathLike,
                   external: Callable[[tf.Tensor], tf.Tensor] | None = None) -> Any:
    """A potential from a directory written by :meth:`PotentialModel.save` (-> PotentialModel) or a
    SavedModel written by :meth:`PotentialModel.export` (-> :class:`ExportedPotential`).

    ``external``: the fixed external potential the fit used (required if config.json records one;
    a SavedModel has it in its graph already). FileError for anything else.
    """
    path = Path(path)
    if (path / "saved_model.pb").is_file():
        return ExportedPotential(path)
    if not is_potential_dir(path):
        raise FileError(f"{path}: not a potential directory (config.json with format "
                        f"'{POTENTIAL_FORMAT}' and weights.npz) nor a potential SavedModel")
    meta = json.loads((path / "config.json").read_text())
    if meta.get("format_version") != POTENTIAL_FORMAT_VERSION:
        raise FileError(f"{path}/config.json: format_version {meta.get('format_version')!r}; this "
                        f"tfgalflow reads {POTENTIAL_FORMAT_VERSION}")
    if meta.get("external") and external is None:
        raise InputError(
            f"{path} was fitted with the external potential {meta['external']!r}: pass "
            f"it as load_potential(path, external=...) (or load {path}/savedmodel)"
        )
    try:
        with np.load(path / "weights.npz") as z:
            weights = [
                z[f"weight_{i}"] for i in range(sum(k.startswith("weight_") for k in z.files))
            ]
            constants = {k[len("const_"):]: z[k] for k in z.files if k.startswith("const_")}
    except (OSError, ValueError, KeyError) as exc:
        raise FileError(f"{path}/weights.npz: unreadable ({exc})") from None
    model = PotentialModel(PotentialConfig.from_dict(meta["config"]), constants,
                           int(meta.get("label_dim", 0)), external, meta.get("external"))
    model.network.set_weights(weights)
    model.history = meta.get("history") or {}
    return model


# ---- fitting ------------------------------------------------------------------------------------

def residual_scale(x: np.ndarray, v: np.ndarray, grad_v: np.ndarray,
                   bins: int = 32) -> np.ndarray:
    """Per-point scale s_n [N] of the CBE residual R_n = (∇Φ_true − ∇Φ_θ) · ∇_v log f_n.

        s_n = |∇_v log f_n| A(r_n),   A(r) = <|v|²>(r) / r,

    x [N, 3] relative to the centre, v [N, 3], grad_v = ∇_v log f [N, 3]. A(r) is a local virial
    estimate of the acceleration magnitude (|a| = v_c² / r, and v_c² ~ <|v|²> within a factor of
    order one) from the points themselves: <|v|²> in ``bins`` radial quantile bins, interpolated in
    log r. Then R_n / s_n is the acceleration error projected on ∇_v log f, relative to the local
    |a|, at every radius and for any DF. (|v| |∇_x log f| equals |∇_v log f| |a| for an isotropic
    f(E) but not for f(E, L): there ∇_x log f carries a 1/L term that does not enter the residual,
    and that scale drowned the radial field of the β = 1/2 Hernquist model.) A floor of 10⁻³ x the
    median keeps points with ∇_v log f ≈ 0 finite.
    """
    r = np.maximum(np.linalg.norm(x, axis=1), 1e-30)
    edges = np.quantile(r, np.linspace(0.0, 1.0, bins + 1))
    index = np.clip(np.searchsorted(edges, r, side="right") - 1, 0, bins - 1)
    v2 = np.sum(v * v, axis=1)
    mean_v2 = np.array([v2[index == k].mean() if np.any(index == k) else np.nan
                        for k in range(bins)])
    centres = np.array([np.median(r[index == k]) if np.any(index == k) else np.nan
                        for k in range(bins)])
    ok = np.isfinite(mean_v2) & np.isfinite(centres)
    log_a = np.interp(np.log(r), np.log(centres[ok]), np.log(mean_v2[ok] / centres[ok]))
    s = np.linalg.norm(grad_v, axis=1) * np.exp(log_a)
    return s + 1e-3 * np.median(s)


def robust_norm(z: tf.Tensor) -> tf.Tensor:
    """ρ(z) = z asinh z: ≈ z² for |z| << 1, ≈ |z| ln 2|z| for |z| >> 1 (convex, smooth, even)."""
    return z * tf.math.asinh(z)


def _phase_space_points(df: Density, config: PotentialConfig, data: Any,
                        labels: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """(w [N, 6], labels [N, C] | None): the catalogue's stars, or n_points draws from the DF."""
    if data is not None:
        if hasattr(data, "pos") and hasattr(data, "vel"):
            if labels is None and df.label_dim:
                labels = getattr(data, "labels", None)
            data = np.concatenate([np.asarray(data.pos), np.asarray(data.vel)], axis=1)
        w = finite_matrix(data, "data", width=6, expected="[N, 6] (x, v)", dtype=np.float32)
    else:
        if not df.can_sample:
            raise InputError(f"the {df.what} ({type(df).__name__}) cannot sample: pass data= (a "
                             f"Catalogue or [N, 6] phase-space points drawn from it)")
        w = None
    c = None
    if df.label_dim:
        if labels is None:
            raise InputError(f"the DF is conditional (label_dim = {df.label_dim}): pass labels "
                             f"[N, {df.label_dim}] (or a Catalogue with labels)")
        c = finite_matrix(labels, "labels", width=df.label_dim,
                          expected=f"[N, {df.label_dim}]", dtype=np.float32)
    elif labels is not None:
        raise InputError("labels were given but the DF is unconditional (label_dim = 0)")
    if w is None:
        if c is not None:
            w = np.asarray(df.sample(c.shape[0], labels=c, seed=config.seed))
        else:
            w = np.asarray(df.sample(config.n_points, seed=config.seed))
    if c is not None and c.shape[0] != w.shape[0]:
        raise InputError(f"data has {w.shape[0]} rows but labels have {c.shape[0]}")
    return w, c


def df_log_gradients(df: Density, w: np.ndarray, labels: np.ndarray | None = None,
                     chunk: int = 2**15) -> tuple[np.ndarray, np.ndarray]:
    """(∇_w log f [N, 6], log f [N]) by GradientTape (the DF's traced grad_log_prob), in chunks."""
    grads, logf = [], []
    for s in range(0, w.shape[0], chunk):
        rows = slice(s, s + chunk)
        c = None if labels is None else labels[rows]
        grads.append(np.asarray(df.grad_log_prob(w[rows], c)))
        logf.append(np.asarray(df.log_prob(w[rows], c)))
    return np.concatenate(grads), np.concatenate(logf)


class _Trainer(keras.Model):
    """Keras wrapper whose train/test steps evaluate the CBE loss of a PotentialModel."""

    def __init__(self, model: PotentialModel, laplacian_scale: float):
        super().__init__()
        self.potential_model = model
        self.net = model.network
        self.laplacian_scale = laplacian_scale
        self.cfg = model.config

    def _loss(self, batch: dict) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        pm, cfg = self.potential_model, self.cfg
        x, c = batch["x"], batch.get("labels")
        with tf.GradientTape(persistent=True) as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                phi = pm.network_potential_tensor(x, c)
            grad = inner.gradient(phi, x)
            parts = [grad[:, i] for i in range(3)]
        residual = batch["b"] - tf.reduce_sum(grad * batch["gv"], axis=1)
        cbe = tf.reduce_mean(robust_norm(residual / (cfg.robust_scale * batch["s"])))
        lap_term = tf.constant(0.0)
        if cfg.laplacian_weight > 0:
            lap = (
                tf.add_n([outer.gradient(parts[i], x)[:, i] for i in range(3)]) + batch["lap_ext"]
            )
            lap_term = cfg.laplacian_weight * tf.reduce_mean(
                tf.math.asinh(tf.nn.relu(-lap) / self.laplacian_scale))
        del outer
        return cbe + lap_term, cbe, lap_term

    def train_step(self, batch):
        with tf.GradientTape() as tape:
            loss, cbe, lap = self._loss(batch)
        # the output layer's bias cancels in Φ_0 [N(u) − N(u_ref)] (the gauge): it has no gradient
        variables = [v for v in self.net.trainable_variables if v is not self.net.layers[-1].bias]
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return {"loss": loss, "cbe": cbe, "laplacian": lap}

    def test_step(self, batch):
        loss, cbe, lap = self._loss(batch)
        return {"loss": loss, "cbe": cbe, "laplacian": lap}


def fit_potential(df: Density, config: PotentialConfig = PotentialConfig(), *, data: Any = None,
                  labels: Any = None,
                  external: Callable[[tf.Tensor], tf.Tensor] | None = None,
                  external_name: str | None = None, verbose: int = 0) -> PotentialModel:
    """Fit Φ_θ(x | c) to the CBE of the phase-space DF ``df`` (module docstring: loss, gauge,
    network).

    Args:
        df: a 6-D :class:`~tfgalflow.density.Density` f(x, v | c): Flow, Ensemble,
            SphericalAverage, exact DF, loaded SavedModel (gradients by its traced
            ``grad_log_prob``).
        config: :class:`PotentialConfig`.
        data: the training points instead of draws from the DF: a Catalogue (pos, vel, labels) or
            w [N, 6] = (x, v) in the DF's units; needed for DFs that cannot sample (exact DFs).
        labels: [N, C] labels of a conditional DF (the draws are made at these labels; with
            ``data``, the labels of its rows; a Catalogue's own labels by default).
        external: fixed external potential Φ_ext(x [N, 3] tensor) -> [N] (TF ops), or None.
        external_name: how config.json names ``external`` (load_potential asks for it back).
        verbose: Keras verbosity (0 quiet, 2 one line per epoch).

    Returns:
        :class:`PotentialModel` (history: per-epoch loss, val_loss, cbe, laplacian).

    Raises:
        InputError for a DF that is not 6-D, bad data/labels, or too few points with finite
        gradients.

    Example::

        from tfgalflow.mocks import sample_hernquist
        h = Hernquist()
        pot = fit_potential(h.exact_density("iso"), PotentialConfig(epochs=100),
                            data=sample_hernquist(20000, seed=0))
        pot.acceleration([[1.0, 0.0, 0.0]])     # ≈ [[-0.25, 0, 0]]
    """
    if not isinstance(df, Density) or df.dim != 6:
        raise InputError(
            f"df must be a 6-D phase-space DF (a tfgalflow Density with dim = 6); got "
            f"{type(df).__name__}" + (f" with dim = {df.dim}" if hasattr(df, "dim") else "")
        )
    if not isinstance(config, PotentialConfig):
        raise InputError(f"config must be a PotentialConfig, got {type(config).__name__}")
    if external is not None and not callable(external):
        raise InputError("external must be a callable Φ_ext(x [N, 3]) -> [N] in TF ops, or None")
    w, c = _phase_space_points(df, config, data, labels)
    grad, log_f = df_log_gradients(df, w, c)
    keep = np.isfinite(log_f) & np.all(np.isfinite(grad), axis=1)
    w, grad = w[keep], grad[keep]
    c = None if c is None else c[keep]
    if w.shape[0] < 64:
        raise InputError(f"only {w.shape[0]} of the phase-space points have a finite log f and "
                         f"gradient: the DF has no support at the data")
    x, v = w[:, :3].astype(np.float64), w[:, 3:].astype(np.float64)
    gx, gv = grad[:, :3].astype(np.float64), grad[:, 3:].astype(np.float64)

    centre = np.median(x, axis=0)
    radius = np.linalg.norm(x - centre, axis=1)
    length = config.length_scale or float(np.quantile(radius, LENGTH_QUANTILE))
    phi_scale = config.output_scale * float(np.mean(np.sum(v * v, axis=1)))
    rng = np.random.default_rng(config.seed)
    support = x[rng.permutation(x.shape[0])[:config.support_points]]
    constants = {"centre": centre, "length_scale": length, "phi_scale": phi_scale,
                 "reference": centre if config.reference is None else np.asarray(config.reference),
                 "label_shift": np.zeros(0) if c is None else c.mean(axis=0),
                 "label_scale": np.ones(0) if c is None else np.where(c.std(axis=0) > 0,
                                                                      c.std(axis=0), 1.0),
                 "support_positions": support, "support_scale": 0.1 * float(np.median(radius))}
    keras.utils.set_random_seed(config.seed)
    model = PotentialModel(config, constants, 0 if c is None else c.shape[1], external,
                           external_name or (getattr(external, "__name__", "external")
                                             if external is not None else None))

    b = np.sum(v * gx, axis=1)                                   # v · ∇_x log f
    s = residual_scale(x - centre, v, gv)                         # per-point scale, floored
    lap_ext = np.zeros(len(b))
    if external is not None:                                     # fold the fixed part into b, once
        xt = tf.constant(x, tf.float32)
        with tf.GradientTape(persistent=True) as outer:
            outer.watch(xt)
            with tf.GradientTape() as inner:
                inner.watch(xt)
                pe = tf.cast(external(xt), tf.float32)
            ge = inner.gradient(pe, xt, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            parts = [ge[:, i] for i in range(3)]
        lap_ext = sum(outer.gradient(parts[i], xt, unconnected_gradients="zero")[:, i].numpy()
                      for i in range(3))
        b = b - np.sum(ge.numpy() * gv, axis=1)
        del outer
    arrays = {"x": x, "gv": gv, "b": b, "s": s, "lap_ext": lap_ext}
    if c is not None:
        arrays["labels"] = c
    arrays = {k: np.asarray(a, np.float32) for k, a in arrays.items()}
    order = rng.permutation(x.shape[0])
    n_val = max(1, int(round(config.validation_split * x.shape[0])))
    val, train = order[:n_val], order[n_val:]
    batch = min(config.batch_size, len(train))
    train_ds = (tf.data.Dataset.from_tensor_slices({k: a[train] for k, a in arrays.items()})
                .shuffle(len(train), seed=config.seed, reshuffle_each_iteration=True)
                .batch(batch, drop_remainder=True).prefetch(2))
    val_ds = tf.data.Dataset.from_tensor_slices({k: a[val] for k, a in arrays.items()}).batch(4096)

    trainer = _Trainer(model, laplacian_scale=phi_scale / length**2)
    steps = config.epochs * max(1, len(train) // batch)
    schedule = keras.optimizers.schedules.CosineDecay(config.lr, steps, alpha=1e-2)
    trainer.compile(optimizer=keras.optimizers.Adam(schedule), jit_compile=True,
                    steps_per_execution=min(32, max(1, len(train) // batch)))
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience,
                                         restore_best_weights=True)
    hist = trainer.fit(train_ds, validation_data=val_ds, epochs=config.epochs, callbacks=[stop],
                       verbose=verbose)
    model.history = {k: [float(x) for x in vals] for k, vals in hist.history.items()}
    model.history["n_points"] = [int(x.shape[0])]
    return model


__all__ = [
    "PotentialConfig",
    "PotentialModel",
    "ExportedPotential",
    "fit_potential",
    "load_potential",
    "is_potential_dir",
    "is_potential",
    "save_field",
    "robust_norm",
    "residual_scale",
    "compress",
    "df_log_gradients",
    "ACTIVATIONS",
    "POTENTIAL_SIGNATURES",
]
