"""SavedModel export of a trained flow: named serving signatures, versioned layout, TF Serving
config, loading.

``export_model(model, path)`` writes a SavedModel of a :class:`tfgalflow.model.Flow` or
``Ensemble`` whose graph holds only core TensorFlow ops, so it runs under TF Serving,
``saved_model_cli`` and plain ``tf.saved_model.load`` without TFP, tf-keras or tfgalflow.
Signatures (N, B: free batch dimension; D: data width; C: label width, present only for conditional
models)::

    signature        inputs                               outputs
    serving_default  x [N, D] f32 (+ labels [N, C] f32)   log_prob [N] f32    (same as log_prob)
    log_prob         x [N, D] f32 (+ labels [N, C] f32)   log_prob [N] f32
    grad_log_prob    x [N, D] f32 (+ labels [N, C] f32)   grad_log_prob [N, D] f32
    sample           seed [N] i64 (+ labels [N, C] f32)   sample [N, D] f32
    accelerations    positions [B, 3] f32, seed [B] i64   acceleration [B, 3], residual [B],
                     (+ labels [B, C] f32)                condition [B], ess [B],
                                                          log_density [B] f32, support [B] bool,
                                                          flagged [B] bool, reasons [B] string
                                                          (the flags of
                                                          tfgalflow.cbe.accelerations)

with log p(x | c) in nats per unit physical volume of x (the rescaling Jacobian is included) and
the gradient ∂ log p/∂x in 1/(unit of each column). ``accelerations`` is present for 6D phase-space
models (x = (position, velocity)), conditional ones included (then at the label of each position,
a(x_b | c_b)): the collisionless-Boltzmann least-squares fit of
:func:`tfgalflow.cbe.acceleration_graph` at each position (acceleration in velocity²/length of the
data; residual, condition number, effective sample size and log ∫ f d³v of the velocity draw, and
whether the DF has support there - the inputs of :func:`tfgalflow.cbe.flag_reasons`).

Seed convention (every input carries the batch dimension, as TF Serving's request batching needs):
``sample`` draws N points, N = len(seed) for unconditional models and N = len(labels) for
conditional ones (one draw per label row); the whole draw is the stateless draw
``model.sample_stateless(N, seed=[seed[0], 0])``, so only ``seed[0]`` matters (send e.g. ``[s, s,
..., s]``); the same seed[0] and N give the same points. ``accelerations`` likewise seeds its
velocity draws with ``[seed[0], 0]``. With TF Serving's server-side batching enabled, concurrent
requests may be merged and the draws stay valid samples but are then seeded by the first request's
seed; the tfgalflow endpoint never merges them.

A :class:`tfgalflow.symmetry.SphericalAverage` of a Flow or Ensemble exports the same way: its
signatures answer for the DF averaged over the stored rotations (metadata ``spherical_average``: M
and seed). A :class:`tfgalflow.spherical_df.SphericalDF` (a flow of (r, v_r, v_t)) exports as the
6-D DF it defines: signatures in w = (x, v), metadata ``spherical_df`` (``even``); an
:class:`tfgalflow.axisymmetric_df.AxisymmetricDF` (a flow of (R, z, v_R, v_φ, v_z, ...)) as the
density of the catalogue's columns, metadata ``axisymmetric_df`` (``even``).

The FlowConfig, the run's config.json (when exported from a run), the rescaling constants, this
convention and the list of row-wise signatures (whose output rows depend only on the same input
rows, so a server may merge requests: log_prob, grad_log_prob, serving_default) are stored in the
SavedModel as the string variable ``tfgalflow_metadata`` (JSON); the rescaling actually applied
lives in the model's own (non-trainable) variables.

Layout for TF Serving: ``ROOT/NAME/<version>/saved_model.pb`` (integer versions, highest served by
default) and ``ROOT/models.config`` (``model_config_list`` text format) from
:func:`write_models_config`.

Reference: TensorFlow Serving REST API and SavedModel docs,
https://www.tensorflow.org/tfx/serving/api_rest
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from . import __version__
from .atomic import atomic_dir, write_text
from .density import Density
from .errors import FileError, InputError
from .validation import integer

SAVEDMODEL_FORMAT = "tfgalflow-savedmodel"
SAVEDMODEL_FORMAT_VERSION = 1
METADATA_VARIABLE = "tfgalflow_metadata"
MODELS_CONFIG = "models.config"
#: Signatures every tfgalflow SavedModel has (``accelerations`` only for 6D models).
REQUIRED_SIGNATURES = ("serving_default", "log_prob", "grad_log_prob", "sample")
#: Outputs of the ``accelerations`` signature (those that cbe.acceleration_graph provides).
ACCELERATION_OUTPUTS = ("acceleration", "residual", "condition", "ess", "log_density", "support",
                        "flagged", "reasons")
SEED_CONVENTION = (
    "sample: N = len(seed) (unconditional) or len(labels) (conditional); the draw is "
    "sample_stateless(N, seed=[seed[0], 0]), other seed entries are ignored. "
    "accelerations: velocity draws seeded with [seed[0], 0]."
)
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


# ---- one signature of a loaded SavedModel: typed, named NumPy in and out -----------------------

def _shape_text(shape: tuple) -> str:
    """[N, 3] for a TensorSpec shape (None, 3): the batch dimension is N, other free dimensions
    '?'.
    """
    dims = [
        "N" if (d is None and i == 0) else ("?" if d is None else str(d))
        for i, d in enumerate(shape)
    ]
    return "[" + ", ".join(dims) + "]"


class Signature:
    """One signature (a traced function) of a loaded SavedModel with NumPy inputs and outputs.

    ``inputs`` / ``outputs`` map names to ``(shape, numpy dtype)`` with ``None`` for free
    dimensions. :meth:`check` converts nested lists or arrays to arrays of the signature's dtypes
    and shapes (raising InputError naming the input, the expected and the received shape);
    :meth:`run` makes ONE call of the traced function for the whole batch.
    """

    def __init__(self, name: str, function: Any):
        import tensorflow as tf
        self.name = name
        self._function = function
        _, kwargs = function.structured_input_signature
        self.inputs = {k: (tuple(s.shape.as_list()) if s.shape.rank is not None else None,
                           np.dtype(s.dtype.as_numpy_dtype)) for k, s in sorted(kwargs.items())}
        outputs = function.structured_outputs
        if not isinstance(outputs, Mapping):
            outputs = {"output_0": outputs}
        self.outputs = {k: (tuple(s.shape.as_list()) if s.shape.rank is not None else None,
                            np.dtype(s.dtype.as_numpy_dtype)) for k, s in sorted(outputs.items())}
        self._tf = tf

    def describe(self) -> str:
        """'x [N, 3] float32, labels [N, 2] float32' - for error messages."""
        return ", ".join(f"{k} {_shape_text(s) if s is not None else '[?]'} {d.name}"
                         for k, (s, d) in self.inputs.items())

    def check(self, values: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Arrays of the right dtype and shape for every input; InputError naming what is wrong.

        Float inputs accept integers and floats; integer inputs only integers; NaN and inf are
        rejected.
        """
        missing = [k for k in self.inputs if k not in values]
        unknown = [k for k in values if k not in self.inputs]
        if unknown:
            raise InputError(
                f"signature '{self.name}' has no input named {', '.join(map(repr, unknown))}; "
                f"its inputs are: {self.describe()}"
            )
        if missing:
            raise InputError(
                f"signature '{self.name}' is missing input {', '.join(map(repr, missing))}; "
                f"its inputs are: {self.describe()}"
            )
        return {k: self._check_one(k, values[k]) for k in self.inputs}

    def _check_one(self, name: str, value: Any) -> np.ndarray:
        shape, dtype = self.inputs[name]
        expected = f"{_shape_text(shape) if shape is not None else '[?]'} {dtype.name}"
        try:
            array = np.asarray(value)
        except (ValueError, TypeError) as exc:
            raise InputError(
                f"input '{name}' is not a rectangular array ({exc}); expected {expected}"
            ) from None
        kind = array.dtype.kind
        allowed = "fiu" if dtype.kind == "f" else ("iu" if dtype.kind in "iu" else dtype.kind)
        if kind not in allowed or array.dtype == object:
            what = {
                "b": "booleans",
                "U": "strings",
                "S": "bytes",
                "O": "mixed or out-of-range values",
                "f": "non-integer numbers",
            }.get(kind, array.dtype.name)
            raise InputError(
                f"input '{name}' holds {what}, which are not of the expected type {dtype.name}; "
                f"expected {expected}"
            )
        if shape is not None and (
            array.ndim != len(shape)
            or any(d is not None and d != a for d, a in zip(shape, array.shape))
        ):
            raise InputError(f"input '{name}' has shape {list(array.shape)}; expected {expected}")
        if kind == "f":
            bad = ~np.isfinite(array)
            if bad.any():
                raise InputError(
                    f"input '{name}' contains NaN or infinite values at "
                    f"{np.argwhere(bad)[:5].tolist()} (index of the first ones); only finite "
                    f"numbers are accepted"
                )
        if dtype.kind == "f":
            with np.errstate(over="ignore"):
                converted = array.astype(dtype, copy=False)
            if not np.isfinite(converted).all():
                raise InputError(f"input '{name}' has values beyond the {dtype.name} range (|x| > "
                                 f"{np.finfo(dtype).max:.3g}); expected {expected}")
            return converted
        if kind in "iu" and dtype.kind in "iu":
            info = np.iinfo(dtype)
            if array.size and (array.min() < info.min or array.max() > info.max):
                raise InputError(
                    f"input '{name}' has integers outside the {dtype.name} range; "
                    f"expected {expected}"
                )
        return array.astype(dtype, copy=False)

    def run(self, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One call of the traced function on checked arrays -> {output name: array}.

        Graph-time failures caused by the data (e.g. x and labels with different numbers of rows)
        are raised as InputError.
        """
        tf = self._tf
        try:
            out = self._function(**{k: tf.constant(v) for k, v in arrays.items()})
        except tf.errors.InvalidArgumentError as exc:
            raise InputError(
                f"signature '{self.name}' rejected the inputs: {exc.message.strip()}"
            ) from None
        if not isinstance(out, Mapping):
            out = {"output_0": out}
        return {k: _text_to_str(v.numpy()) for k, v in out.items()}

    def __call__(self, **values: Any) -> dict[str, np.ndarray]:
        """check + run: ``sig(x=array)`` -> {output name: array}."""
        return self.run(self.check(values))


def _text_to_str(array: np.ndarray) -> np.ndarray:
    """String outputs (TF gives bytes objects) as a unicode array; other arrays unchanged."""
    if array.dtype == object:
        return np.vectorize(
            lambda b: b.decode() if isinstance(b, bytes) else str(b), otypes=[str]
        )(array)
    return array


# ---- a loaded SavedModel ---------------------------------------------------------------------

def _is_saved_model(path: Path) -> bool:
    return (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file()


def read_signature_defs(path: str | os.PathLike) -> dict:
    """The SignatureDefs of the 'serve' MetaGraph as JSON (proto3 JSON mapping, as TF Serving
    prints them).

    Raises FileError if ``path`` holds no readable saved_model.pb / saved_model.pbtxt.
    """
    from google.protobuf import json_format, text_format
    from tensorflow.core.protobuf import saved_model_pb2

    path = Path(path)
    proto = saved_model_pb2.SavedModel()
    try:
        if (path / "saved_model.pb").is_file():
            proto.ParseFromString((path / "saved_model.pb").read_bytes())
        else:
            text_format.Parse((path / "saved_model.pbtxt").read_text(), proto)
    # DecodeError / ParseError have no common base
    except (OSError, UnicodeDecodeError, Exception) as exc:
        raise FileError(f"{path}: not a readable SavedModel (saved_model.pb): {exc}") from None
    graphs = [g for g in proto.meta_graphs if "serve" in g.meta_info_def.tags] or list(
        proto.meta_graphs
    )
    if not graphs:
        raise FileError(f"{path}: the SavedModel has no MetaGraph")
    return {name: json_format.MessageToDict(sig, preserving_proto_field_name=True,
                                            always_print_fields_with_no_presence=True)
            for name, sig in sorted(graphs[0].signature_def.items())}


class ExportedModel(Density):
    """A SavedModel loaded with plain TensorFlow, as a :class:`~tfgalflow.density.Density`.

    ``log_prob``, ``prob``, ``grad_log_prob``, ``sample`` validate their inputs (InputError) and
    return float32 tensors, like every density; inside a ``tf.function`` the SavedModel's functions
    are called directly, so ``cbe.accelerations(load(path), ...)`` and
    ``SphericalAverage(load(path))`` work on it. Its graphs are the exported ones (never
    XLA-compiled): ``inlinable`` is False.

    Attributes:
        path: the SavedModel directory.
        signatures: {name: :class:`Signature`} (every signature of the SavedModel, NumPy in and
            out).
        metadata: the tfgalflow metadata JSON ({} for SavedModels not written by
            :func:`export_model`).
        dim, label_dim: data and label widths (from the ``log_prob`` signature when present).
        x_scale: [D] rescaler scales of the (first) member from the metadata, or None.
    """

    what = "SavedModel"

    def __init__(self, path: str | os.PathLike):
        import tensorflow as tf
        self.path = Path(path)
        if not self.path.is_dir() or not _is_saved_model(self.path):
            raise FileError(f"{self.path}: not a SavedModel directory (no saved_model.pb)")
        self.signature_defs = read_signature_defs(self.path)
        try:
            self._loaded = tf.saved_model.load(str(self.path))
        # noqa: BLE001 - TF raises OSError, OpError, ValueError, DecodeError, ...
        except Exception as exc:
            raise FileError(
                f"{self.path}: the SavedModel cannot be loaded: {type(exc).__name__}: {exc}"
            ) from None
        self.signatures = {
            name: Signature(name, fn) for name, fn in sorted(self._loaded.signatures.items())
        }
        self.metadata: dict = {}
        variable = getattr(self._loaded, METADATA_VARIABLE, None)
        if variable is not None:
            try:
                self.metadata = json.loads(variable.numpy().decode())
            except (ValueError, AttributeError) as exc:
                raise FileError(f"{self.path}: corrupt {METADATA_VARIABLE}: {exc}") from None
        rescaling = self.metadata.get("rescaling") or [{}]
        # The (first member's) rescaler scale per data column: cbe reads its velocity part to
        # centre the velocity sampler exactly as it does for the in-memory Flow. None for foreign
        # SavedModels.
        self.x_scale = (
            np.asarray(rescaling[0]["x_scale"], np.float32) if "x_scale" in rescaling[0] else None
        )
        lp = self.signatures.get("log_prob")
        self.dim = (
            lp.inputs["x"][0][1]
            if lp is not None and "x" in lp.inputs
            else self.metadata.get("dim")
        )
        self.label_dim = (lp.inputs["labels"][0][1] if lp is not None and "labels" in lp.inputs
                          else self.metadata.get("label_dim", 0))

    @property
    def loaded(self) -> Any:
        """The object ``tf.saved_model.load`` returned (signatures, saved variables)."""
        return self._loaded

    def __repr__(self) -> str:
        return f"ExportedModel({str(self.path)!r}, signatures={sorted(self.signatures)})"

    def _signature(self, name: str) -> Signature:
        if name not in self.signatures:
            raise InputError(f"{self.path}: the SavedModel has no '{name}' signature "
                             f"(it has: {', '.join(sorted(self.signatures))})")
        return self.signatures[name]

    def _run(self, name: str, output: str, **inputs: Any) -> Any:
        self._signature(name)
        return self._loaded.signatures[name](**{k: v for k, v in inputs.items() if v is not None})[
            output
        ]

    # -- the density contract -------------------------------------------------------------------
    @property
    def inlinable(self) -> bool:
        """False: the SavedModel's functions are opaque to XLA (its graphs stay plain)."""
        return False

    @property
    def can_sample(self) -> bool:
        """Whether the SavedModel has a ``sample`` signature."""
        return "sample" in self.signatures

    def scale_hint(self) -> Any:
        """The exported rescaler's scales [D] from the metadata (None for foreign SavedModels)."""
        import tensorflow as tf
        return None if self.x_scale is None else tf.constant(self.x_scale)

    def log_prob_tensor(self, x: Any, labels: Any = None) -> Any:
        """The SavedModel's ``log_prob`` signature: [N]."""
        return self._run("log_prob", "log_prob", x=x, labels=labels)

    def gradient_tensor(self, x: Any, labels: Any = None) -> Any:
        """The SavedModel's ``grad_log_prob`` signature: [N, D]."""
        return self._run("grad_log_prob", "grad_log_prob", x=x, labels=labels)

    def sample_tensor(self, n: Any, labels: Any, seed: Any) -> Any:
        """The SavedModel's ``sample`` signature, seeded by seed[0] (its convention): [n, D]."""
        import tensorflow as tf
        rows = tf.shape(labels)[0] if labels is not None else n
        return self._run(
            "sample", "sample", seed=tf.fill(tf.reshape(rows, [1]), seed[0]), labels=labels
        )

    # -- NumPy in and out for scripts: eager calls go through the signatures' own checks ----------
    def _density_inputs(self, x: Any, labels: Any) -> dict:
        if self.label_dim:
            if labels is None:
                raise InputError(
                    f"the model is conditional: labels of shape [N, {self.label_dim}] are required"
                )
            return {"x": x, "labels": labels}
        if labels is not None:
            raise InputError("labels were given but the model is unconditional (label_dim = 0); "
                             "pass labels=None")
        return {"x": x}

    def log_prob(self, x: Any, labels: Any = None) -> Any:
        """log p(x | labels): [N] float32, NumPy in and out (a tensor inside a ``tf.function``).

        x [N, D] in the physical units the model was trained in; validated by the SavedModel's
        signature (InputError naming the input, its shape and the expected one).
        """
        if not self._eager:
            return super().log_prob(x, labels)
        return self._signature("log_prob")(**self._density_inputs(x, labels))["log_prob"]

    def prob(self, x: Any, labels: Any = None) -> Any:
        """p(x | labels) = exp(log_prob): [N] float32."""
        return np.exp(self.log_prob(x, labels)) if self._eager else super().prob(x, labels)

    def grad_log_prob(self, x: Any, labels: Any = None) -> Any:
        """∂ log p(x | labels)/∂x: [N, D] float32 (the exported ``grad_log_prob`` signature)."""
        if not self._eager:
            return super().grad_log_prob(x, labels)
        return self._signature("grad_log_prob")(**self._density_inputs(x, labels))["grad_log_prob"]

    def sample(self, n: int, labels: Any = None, seed: int | None = None) -> Any:
        """n draws [n, D] float32; the same (n, labels, seed) gives the same points as the
        in-memory model's ``sample_stateless(n, [seed, 0])``; ``seed=None`` draws a fresh seed.
        """
        n = integer(n, "n")
        if seed is None:
            seed = int(np.random.SeedSequence().generate_state(1, np.uint32)[0])
        seed = integer(seed, "seed", low=0)
        inputs: dict[str, Any] = {"seed": np.full(n, seed, np.int64)}
        if self.label_dim:
            if labels is None:
                raise InputError(f"the model is conditional: sample(n, labels) needs labels "
                                 f"[n, {self.label_dim}]")
            labels = np.asarray(labels, dtype=np.float64)
            if labels.shape == (self.label_dim,):
                labels = np.broadcast_to(labels, (n, self.label_dim))
            if labels.shape != (n, self.label_dim):
                raise InputError(f"labels have shape {list(labels.shape)}; expected [{n}, "
                                 f"{self.label_dim}] or [{self.label_dim}]")
            inputs["labels"] = labels
        elif labels is not None:
            raise InputError("labels were given but the model is unconditional (label_dim = 0)")
        return self._signature("sample")(**inputs)["sample"]

    @property
    def _eager(self) -> bool:
        import tensorflow as tf
        return tf.executing_eagerly()

    def accelerations(self, positions: Any, seed: int = 0, labels: Any = None,
                      **thresholds: Any) -> Any:
        """CBE accelerations at positions [B, 3] through the exported ``accelerations`` signature:
        an :class:`~tfgalflow.cbe.AccelerationResult` with the same flags as the in-memory
        ``cbe.accelerations(model, positions, n_velocities, seed, labels=labels)`` at the exported
        n_velocities.

        ``labels``: for a conditional model, [C] (every position) or [B, C] (one per position);
        None otherwise (checked as :func:`tfgalflow.cbe.check_labels` does). ``thresholds``:
        ``max_residual``, ``max_condition``, ``min_ess``, ``min_log_density`` as in
        :func:`tfgalflow.cbe.accelerations`.
        """
        from .cbe import AccelerationResult, check_labels, check_positions
        self._signature("accelerations")  # a model exported without it says so first
        seed = integer(seed, "seed", low=0)
        positions = check_positions(positions)
        labels = check_labels(self, labels, positions.shape[0])
        inputs = {} if labels is None else {"labels": labels}
        out = self._signature("accelerations")(positions=positions,
                                                seed=np.full(positions.shape[0], seed, np.int64),
                                                **inputs)
        return AccelerationResult.from_outputs(out, **thresholds)


def load_saved_model(path: str | os.PathLike, require: tuple = ()) -> ExportedModel:
    """Load any SavedModel as an :class:`ExportedModel`; FileError if it lacks a ``require``-d
    signature.
    """
    model = ExportedModel(path)
    missing = [s for s in require if s not in model.signatures]
    if missing:
        raise FileError(
            f"{model.path}: not a tfgalflow SavedModel: missing signature(s) {', '.join(missing)} "
            f"(it has: {', '.join(sorted(model.signatures)) or 'none'})"
        )
    return model


def versions(model_dir: str | os.PathLike) -> list[int]:
    """Sorted integer version numbers under ``model_dir`` that hold a SavedModel (TF Serving's
    layout).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir()
                  if p.name.isdigit() and p.is_dir() and _is_saved_model(p))


def rebuild_model(path: str | os.PathLike) -> Any:
    """The in-memory model of a tfgalflow SavedModel: a Flow, an Ensemble, or either averaged over
    rotations, with the exported weights (to fine-tune, evaluate under XLA, or export again with
    this version's signatures).

    Built from the metadata's FlowConfig and the SavedModel's saved variables, in export order; the
    result is checked against the SavedModel (log p of its own draws equal to float32 round-off),
    so a SavedModel whose variables do not map onto the architecture is a FileError, never a model
    with wrong weights.

    Args:
        path: a SavedModel directory written by :func:`export_model` (or ``ROOT/NAME`` for its
            highest version).

    Raises:
        FileError: not a tfgalflow SavedModel, or its variables do not fit its recorded FlowConfig.
    """
    from .flows import FlowConfig
    from .model import Ensemble, Flow
    from .symmetry import SphericalAverage

    exported = load(path)
    if not isinstance(exported, ExportedModel) or not exported.metadata.get("flow"):
        raise FileError(f"{path}: not a tfgalflow SavedModel (no FlowConfig in its metadata)")
    meta = exported.metadata
    config = FlowConfig.from_dict(meta["flow"])
    members = [Flow(config) for _ in range(int(meta.get("members", 1)))]
    model = members[0] if len(members) == 1 else Ensemble(members)
    from .coordinates import METADATA_KEYS, wrap
    for coordinates, key in METADATA_KEYS.items():
        if meta.get(key):
            model = wrap(coordinates, model, **meta[key])
    average = meta.get("spherical_average")
    if average:
        model = SphericalAverage(model, average["n_rotations"], average["seed"])
    # The export saved list(model.variables) of the same construction: the same order.
    saved = list(getattr(exported.loaded, "model_variables", None) or [])
    mine = list(model.variables)
    if len(mine) != len(saved):
        # Exported before flows recorded their label range: those variables keep their defaults.
        added = ("label_min", "label_max")
        mine = [v for v in mine if not v.name.startswith(added)]
    if len(mine) != len(saved) or any(a.shape != b.shape for a, b in zip(mine, saved)):
        raise FileError(f"{exported.path}: its {len(saved)} saved variables do not fit the "
                        f"recorded FlowConfig ({len(mine)} variables)")
    for mine_v, saved_v in zip(mine, saved):
        mine_v.assign(saved_v)
    if exported.can_sample:
        c = None
        if exported.label_dim:     # inside the training range (no extrapolation warning)
            span = model.label_range()
            mid = np.zeros(exported.label_dim) if span is None else (span[0] + span[1]) / 2
            c = np.tile(mid, (256, 1)).astype(np.float32)
        x = np.asarray(exported.sample(256, c, seed=0))
        if not np.allclose(np.asarray(model.log_prob(x, c)), np.asarray(exported.log_prob(x, c)),
                           rtol=1e-4, atol=1e-4):
            raise FileError(f"{exported.path}: the rebuilt model does not reproduce the "
                            f"SavedModel's log_prob")
    return model


def load(path: str | os.PathLike) -> Any:
    """Load a trained model from a run directory, a SavedModel, or a versioned model directory.

    * run directory (``config.json``): :func:`tfgalflow.training.load_run` -> Flow | Ensemble;
    * SavedModel (``saved_model.pb``): :class:`ExportedModel` (log_prob, prob, grad_log_prob,
    sample,
      accelerations when exported) with NumPy in/out and InputError on bad input;
    * ``ROOT/NAME`` holding integer versions: the highest version, as above.

    Raises FileError if ``path`` is none of these, lacks a tfgalflow signature, or is corrupt.
    """
    path = Path(path)
    if not path.exists():
        raise FileError(
            f"{path}: no such file or directory (expected a run directory with config.json, a "
            f"SavedModel or a model directory of versions)"
        )
    if path.is_dir() and _is_saved_model(path):
        return load_saved_model(path, require=REQUIRED_SIGNATURES)
    if (path / "config.json").is_file():
        from .training import load_run
        return load_run(path)
    found = versions(path)
    if found:
        return load_saved_model(path / str(found[-1]), require=REQUIRED_SIGNATURES)
    raise FileError(
        f"{path}: neither a SavedModel (saved_model.pb), a run directory (config.json), nor a "
        f"model directory with integer version subdirectories"
    )


# ---- export ------------------------------------------------------------------------------------

def _unwrapped(model: Any) -> Any:
    """The Flow/Ensemble under any wrapper (a SphericalAverage, a reduced-coordinate DF: a
    :class:`~tfgalflow.density.DerivedDensity`); its config, members and rescaling describe the
    export.
    """
    from .density import DerivedDensity
    while isinstance(model, DerivedDensity):
        model = model.base
    return model


def _rescaling(model: Any) -> list[dict] | None:
    model = _unwrapped(model)
    members = getattr(model, "members", None) or [model]
    out = []
    for m in members:
        names = ("x_shift", "x_scale", "label_shift", "label_scale")
        if not all(hasattr(m, n) for n in names):
            return None
        out.append({n: np.asarray(getattr(m, n).numpy(), np.float64).tolist() for n in names})
    return out


def _metadata(model: Any, run_config: Mapping | None, accelerations: dict | None) -> dict:
    from .symmetry import SphericalAverage
    base = _unwrapped(model)
    config = getattr(base, "config", None)
    members = getattr(base, "members", None)
    return {
        "format": SAVEDMODEL_FORMAT,
        "format_version": SAVEDMODEL_FORMAT_VERSION,
        "tfgalflow_version": __version__,
        "model": "ensemble" if members else "flow",
        "members": len(members) if members else 1,
        "dim": int(model.dim),
        "label_dim": int(model.label_dim),
        "flow": config.to_dict() if hasattr(config, "to_dict") else None,
        "rescaling": _rescaling(model),
        "run": dict(run_config) if run_config is not None else None,
        "seed_convention": SEED_CONVENTION,
        # Signatures whose output rows depend only on the same input rows (a server may merge
        # requests).
        "row_wise_signatures": ["serving_default", "log_prob", "grad_log_prob"],
        "accelerations": accelerations,
        # Every signature answers for the DF averaged over these rotations (tfgalflow.symmetry), or
        # null.
        "spherical_average": (
            {"n_rotations": model.n_rotations, "seed": model.seed}
            if isinstance(model, SphericalAverage) else None
        ),
        # The flow learned reduced coordinates and every signature answers for the DF it defines
        # in the catalogue's columns: "spherical_df" (r, v_r, v_t: tfgalflow.spherical_df) or
        # "axisymmetric_df" (R, z, v_R, v_phi, v_z, ...: tfgalflow.axisymmetric_df), each the
        # DF's options or null.
        **_coordinate_df_metadata(model),
    }


def _coordinate_df_metadata(model: Any) -> dict:
    from .coordinates import METADATA_KEYS, coordinates_of, options
    from .symmetry import SphericalAverage
    while isinstance(model, SphericalAverage):
        model = model.base
    mine = coordinates_of(model)
    return {key: options(model) if name == mine else None for name, key in METADATA_KEYS.items()}


def _acceleration_graph(model: Any, accelerations: bool | None, n_velocities: int):
    """cbe.acceleration_graph for 6D models, conditional or not (None: not wanted / applicable)."""
    applicable = int(model.dim) == 6
    if accelerations is False or (accelerations is None and not applicable):
        return None
    if not applicable:
        raise InputError(f"accelerations need a 6D phase-space model (an unconditional 6D "
                         f"f(x, v) or a conditional f(x, v | c)); this one has dim = {model.dim}, "
                         f"label_dim = {model.label_dim}")
    try:
        from .cbe import acceleration_graph
    except ImportError as exc:
        if accelerations:
            raise InputError(
                f"accelerations=True but tfgalflow.cbe.acceleration_graph is unavailable: {exc}"
            ) from None
        return None
    return acceleration_graph(model, n_velocities)


def _without_xla(model: Any) -> Any:
    """A copy of a Flow/Ensemble whose traced functions are not XLA-compiled (same weights).

    A Flow built with ``jit_compile=True`` would leave ``_XlaMustCompile`` in the exported graph,
    which TF Serving runs only with its experimental XLA support; the copy traces without it.
    """
    from .density import DerivedDensity
    from .model import Ensemble, Flow
    if isinstance(model, DerivedDensity):      # the same wrapper (rotations, options) over a copy
        return model.with_base(_without_xla(model.base))
    if isinstance(model, Ensemble):
        return Ensemble([_without_xla(m) for m in model.members])
    if isinstance(model, Flow):
        clone = Flow(model.config)
        clone.set_weights(model.get_weights())
        return clone
    return model


def _build_module(model: Any, metadata_json: str, accel: Any):
    """tf.Module holding the model's variables, the metadata string and the signature functions."""
    import tensorflow as tf
    dim, label_dim = int(model.dim), int(model.label_dim)
    module = tf.Module()
    # tracked, so the captured variables are saved
    module.model_variables = list(model.variables)
    setattr(module, METADATA_VARIABLE, tf.Variable(metadata_json, trainable=False, dtype=tf.string,
                                                   name=METADATA_VARIABLE))
    x_spec = tf.TensorSpec([None, dim], tf.float32, name="x")
    c_spec = tf.TensorSpec([None, label_dim], tf.float32, name="labels")
    seed_spec = tf.TensorSpec([None], tf.int64, name="seed")

    def first_seed(seed):
        # seed[0], or 0 for an empty seed vector (then N = 0 for unconditional models: an empty
        # draw).
        return tf.stack(
            [tf.concat([seed, tf.zeros([1], tf.int64)], 0)[0], tf.constant(0, tf.int64)]
        )

    def after(check, *tensors):
        # The tensors, passed through identities that wait for ``check``. A control dependency
        # on the model call alone is not enough: once the graph optimiser inlines the model's
        # functions, their ops may run before the check (a reshape then fails with an opaque
        # error). Data that flows through these identities cannot.
        with tf.control_dependencies([check]):
            return [tf.identity(t) for t in tensors]

    def same_rows(x, labels, names="x [N, D] and labels [N, C]", n="N"):
        # Without this check the model would broadcast a single label row over all of x.
        return after(tf.debugging.assert_equal(
            tf.shape(x)[0], tf.shape(labels)[0],
            message=f"{names} must have the same number of rows {n}"), x, labels)

    if label_dim:
        def log_prob(x, labels):
            x, labels = same_rows(x, labels)
            return {"log_prob": model.log_prob(x, labels)}

        def grad(x, labels):
            x, labels = same_rows(x, labels)
            return {"grad_log_prob": model.grad_log_prob(x, labels)}
        log_prob = tf.function(log_prob, input_signature=[x_spec, c_spec])
        grad = tf.function(grad, input_signature=[x_spec, c_spec])

        def sample(seed, labels):
            seed, = after(tf.debugging.assert_greater(
                tf.size(seed), 0, message="seed must have at least one element"), seed)
            return {"sample": model.sample_stateless(labels, first_seed(seed))}
        sample = tf.function(sample, input_signature=[seed_spec, c_spec])
    else:
        log_prob = tf.function(lambda x: {"log_prob": model.log_prob(x)}, input_signature=[x_spec])
        grad = tf.function(
            lambda x: {"grad_log_prob": model.grad_log_prob(x)}, input_signature=[x_spec]
        )
        sample = tf.function(
            lambda seed: {
                "sample": model.sample_stateless(tf.size(seed, tf.int32), first_seed(seed))
            },
            input_signature=[seed_spec],
        )
    module.log_prob, module.grad_log_prob, module.sample = log_prob, grad, sample
    signatures = {"serving_default": log_prob.get_concrete_function(),
                  "log_prob": log_prob.get_concrete_function(),
                  "grad_log_prob": grad.get_concrete_function(),
                  "sample": sample.get_concrete_function()}
    if accel is not None:
        from .cbe import flagged_outputs
        p_spec = tf.TensorSpec([None, 3], tf.float32, name="positions")
        if label_dim:
            def accelerations(positions, seed, labels):
                positions, labels = same_rows(positions, labels,
                                              "positions [B, 3] and labels [B, C]", "B")
                result = flagged_outputs(accel(positions, first_seed(seed), labels))
                return {k: result[k] for k in ACCELERATION_OUTPUTS if k in result}
            specs = [p_spec, seed_spec, c_spec]
        else:
            def accelerations(positions, seed):
                result = flagged_outputs(accel(positions, first_seed(seed)))
                return {k: result[k] for k in ACCELERATION_OUTPUTS if k in result}
            specs = [p_spec, seed_spec]
        module.accelerations = tf.function(accelerations, input_signature=specs)
        signatures["accelerations"] = module.accelerations.get_concrete_function()
    return module, signatures


def export_model(
    model: Any,
    path: str | os.PathLike,
    *,
    run_config: Mapping | None = None,
    accelerations: bool | None = None,
    n_velocities: int = 256,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (Flow or Ensemble) as a SavedModel at ``path`` (atomically: temp dir +
    rename).

    Args:
        model: a trained :class:`~tfgalflow.model.Flow` or :class:`~tfgalflow.model.Ensemble`, or
            either wrapped in a :class:`~tfgalflow.symmetry.SphericalAverage` (then every signature
            answers for the rotation-averaged DF, and the metadata's ``spherical_average`` says
            so) or a :class:`~tfgalflow.spherical_df.SphericalDF` (the 6-D DF of a flow of
            (r, v_r, v_t); metadata ``spherical_df``) or an
            :class:`~tfgalflow.axisymmetric_df.AxisymmetricDF` (metadata ``axisymmetric_df``).
        path: the SavedModel directory to create (for TF Serving: ``ROOT/NAME/<version>``).
        run_config: the run's config.json dict, stored in the metadata (``tfgalflow export RUN``
            passes it).
        accelerations: add the ``accelerations`` signature: None = when applicable (6D, cbe
            available; conditional models take labels [B, C] with it), True = required (InputError
            otherwise), False = never.
        n_velocities: velocities sampled per position by the ``accelerations`` signature.
        overwrite: replace an existing directory (the old one is removed only after the new one is
            in place).

    Returns the SavedModel directory. Signatures and conventions: see the module docstring.
    """
    import tensorflow as tf
    for attr in ("dim", "label_dim", "log_prob", "grad_log_prob", "sample_stateless", "variables"):
        if not hasattr(model, attr):
            raise InputError(
                f"export_model(model): {type(model).__name__} has no '{attr}'; expected a "
                f"tfgalflow Flow or Ensemble"
            )
    if (
        isinstance(n_velocities, bool)
        or not isinstance(n_velocities, (int, np.integer))
        or n_velocities < 2
    ):
        raise InputError(f"n_velocities = {n_velocities!r}: expected an integer >= 2")
    model = _without_xla(model)
    accel = _acceleration_graph(model, accelerations, int(n_velocities))
    metadata = _metadata(model, run_config,
                         {"n_velocities": int(n_velocities)} if accel is not None else None)
    module, signatures = _build_module(model, json.dumps(metadata, sort_keys=True), accel)
    path = Path(path)
    try:
        with atomic_dir(path, overwrite=overwrite) as tmp:
            tf.saved_model.save(module, str(tmp), signatures=signatures)
    except FileExistsError as exc:
        raise FileError(str(exc)) from None
    return path


def export_versioned(model: Any, root: str | os.PathLike, name: str, **kwargs: Any) -> Path:
    """Export to ``root/name/<v>`` with v = 1 + the highest existing version (1 for a new model).

    Never overwrites: if another writer takes version v first, the next free number is used.
    Keyword arguments go to :func:`export_model`. Returns the new version directory.
    """
    if not isinstance(name, str) or not _MODEL_NAME.fullmatch(name):
        raise InputError(
            f"model name {name!r}: expected letters, digits, '_', '.', '-' (not starting with "
            f"'.', '_' or '-')"
        )
    model_dir = Path(root) / name
    while True:
        existing = (
            [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()]
            if model_dir.is_dir()
            else []
        )
        target = model_dir / str(max(existing, default=0) + 1)
        try:
            return export_model(model, target, overwrite=False, **kwargs)
        except FileError:
            if not target.exists():
                raise


def _text_string(value: str) -> str:
    """A protobuf text-format string literal: printable ASCII as is, other UTF-8 bytes as octal
    escapes.
    """
    return '"' + "".join(chr(b) if 32 <= b < 127 and b not in (34, 92) else f"\\{b:03o}"
                         for b in value.encode("utf-8")) + '"'


#: Where the model base directory is for the server by default: the tensorflow/serving container's
#: ``/models`` (``docker run -v "$(pwd)/saved_models:/models" tensorflow/serving``).
CONTAINER_BASE_PATH = "/models"


def write_models_config(root: str | os.PathLike, base_path: str = CONTAINER_BASE_PATH,
                        version_policy: str = "all") -> Path:
    """Write ``root/models.config`` (TF Serving ``model_config_list`` text format) for every model
    in root.

    A model is a subdirectory of ``root`` with at least one integer version holding a SavedModel.

    Args:
        root: the model base directory (``ROOT/NAME/<version>/saved_model.pb``).
        base_path: directory that ``root`` will be at for the server: by default "/models", where
            the tensorflow/serving container mounts it, so the file is the same on every host;
            ``str(Path(root).resolve())`` for a ``tensorflow_model_server`` running on this host.
        version_policy: "all" (serve every version, like ``tfgalflow serve``) or "latest" (only the
            highest, TF Serving's default).

    Returns the path of the written file. Use with
    ``tensorflow_model_server --rest_api_port=8501 --model_config_file=ROOT/models.config``.
    """
    if version_policy not in ("all", "latest"):
        raise InputError(f"version_policy = {version_policy!r}: expected 'all' or 'latest'")
    root = Path(root)
    if not root.is_dir():
        raise FileError(f"{root}: no such model directory")
    if not isinstance(base_path, str) or not base_path:
        raise InputError(
            f"base_path = {base_path!r}: expected the directory ROOT is at for the server, "
            f"e.g. '{CONTAINER_BASE_PATH}'"
        )
    base = base_path.rstrip("/") or "/"
    names = sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and _MODEL_NAME.fullmatch(p.name) and versions(p)
    )
    policy = "all {}" if version_policy == "all" else "latest { num_versions: 1 }"
    entries = "".join(
        "  config {\n"
        f"    name: {_text_string(name)}\n"
        f"    base_path: {_text_string(base.rstrip('/') + '/' + name)}\n"
        '    model_platform: "tensorflow"\n'
        f"    model_version_policy {{ {policy} }}\n"
        "  }\n" for name in names)
    target = root / MODELS_CONFIG
    write_text(target, "model_config_list {\n" + entries + "}\n")
    return target
