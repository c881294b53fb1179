"""The :class:`Catalogue` type: N stars in phase space with explicit units, validated when made.

A :class:`Catalogue` holds N stars as ``pos [N, 3]`` and ``vel [N, 3]`` (float64, read-only),
optional conditioning ``labels [N, C]`` with ``label_names``, the ``units`` of the numbers
(``{"length": ..., "velocity": ...}``; see :mod:`tfgalflow.units`) and a JSON-able ``meta`` dict
recording provenance. Everything is validated when the catalogue is made (through
:mod:`tfgalflow.validation`): a catalogue that exists is finite and well-shaped.

This module also holds what every file format shares: the unit checks and conversions, the JSON
form of ``meta``, and the rule that decides a file's units (:func:`resolve_units`). The readers and
writers live in :mod:`.npz`, :mod:`.hdf5` and :mod:`.gadget`; :meth:`Catalogue.save` and
:meth:`Catalogue.load` choose one by the file's extension.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from .. import validation
from ..atomic import atomic_file
from ..errors import FileError, InputError
from ..units import LENGTH_UNITS, MODEL_UNIT, VELOCITY_UNITS, ModelUnits

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf

    from .hdf5 import HDF5Catalogue

#: How ``Catalogue.errors`` describe each star's measurement error (see :class:`Catalogue`).
ERROR_KINDS = ("absolute", "fractional", "covariance")
#: How a deconvolving fit draws a star's true coordinates from its error model
#: (``tfgalflow.deconvolution.NoiseModel.proposal``): the kernel itself, or the kernel tilted along
#: the gradient of log f at the observation.
NOISE_PROPOSALS = ("kernel", "tilted")

FORMAT = "tfgalflow-catalogue"
FORMAT_VERSION = 1
NPZ_SUFFIXES = (".npz",)
HDF5_SUFFIXES = (".h5", ".hdf5")


# ---- the catalogue ------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Catalogue:
    """N stars in 6D phase space with explicit units.

    Attributes:
        pos: [N, 3] positions in ``units["length"]`` (float64, read-only copy).
        vel: [N, 3] velocities in ``units["velocity"]`` (float64, read-only copy).
        labels: [N, C] conditioning labels (float64) or None. A 1-D [N] array is taken as
            one column.
        label_names: C names (default ``label_0 ...``); empty when there are no labels.
        units: ``{"length": L, "velocity": V}`` with L in ``units.LENGTH_UNITS`` or "model", V in
            ``units.VELOCITY_UNITS`` or "model". Required: numbers without units are refused.
        meta: JSON-able provenance (sampler, seed, model, cuts, noise, ``model_units`` ...).
        errors: per-star Gaussian measurement errors of w = (pos, vel) (float64, read-only) or
            None; what they mean is ``error_kind``:

            ``"absolute"``    [N, 6] standard deviations σ in the catalogue's units (length for
                              columns 0-2, velocity for 3-5):  w_obs = w + σ ε,  ε ~ N(0, I);
            ``"fractional"``  [N, 6] dimensionless s (the Hernquist study's multiplicative
                              convention, ``mocks.add_noise(convention="coordinate")``):
                              w_obs,j = w_j (1 + s_j ε_j), so the error of column j is s_j |w_j|;
            ``"covariance"``  [N, 6, 6] covariance matrices C (symmetric, positive semi-definite)
                              in the units of the columns:  w_obs = w + e,  e ~ N(0, C).

            σ, s >= 0 (0 = exact column). :meth:`to_units` scales absolute errors and covariances
            with the columns; fractional ones are unit-free.
        error_kind: one of :data:`ERROR_KINDS`; default "absolute" for [N, 6] errors,
            "covariance" for [N, 6, 6]. Must be None without errors.

    Raises InputError on wrong shapes, N = 0, NaN/inf (naming the field and the first bad row),
    missing or unknown units, label names that do not match the labels, negative errors or
    covariances that are not symmetric positive semi-definite, or non-JSON meta.
    """

    pos: np.ndarray
    vel: np.ndarray
    labels: np.ndarray | None = None
    label_names: tuple[str, ...] = ()
    units: Mapping[str, str] | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    errors: np.ndarray | None = None
    error_kind: str | None = None

    def __post_init__(self):
        pos = _read_only(validation.finite_matrix(self.pos, "pos", width=3))
        vel = _read_only(validation.finite_matrix(self.vel, "vel", width=3))
        if pos.shape[0] != vel.shape[0]:
            raise InputError(f"pos has {pos.shape[0]} rows but vel has {vel.shape[0]}; expected "
                             "pos [N, 3] and vel [N, 3] with the same N")
        labels, names = self.labels, tuple(str(n) for n in (self.label_names or ()))
        if labels is not None:
            labels = np.asarray(labels)
            if labels.ndim == 1:
                labels = labels[:, None]
            labels = _read_only(validation.finite_matrix(labels, "labels",
                                                         expected=f"[{pos.shape[0]}, C]"))
            if labels.shape[0] != pos.shape[0]:
                raise InputError(f"labels have {labels.shape[0]} rows but pos has {pos.shape[0]}; "
                                 f"expected labels [{pos.shape[0]}, C]")
            width = labels.shape[1]
            if not names:
                names = tuple(f"label_{i}" for i in range(width))
            if len(names) != width:
                raise InputError(f"label_names has {len(names)} entries {list(names)} but labels "
                                 f"have {width} column(s); expected {width} names")
        elif names:
            raise InputError(f"label_names {list(names)} were given without labels; pass labels "
                             f"[N, {len(names)}]")
        object.__setattr__(self, "pos", pos)
        object.__setattr__(self, "vel", vel)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "label_names", names)
        object.__setattr__(self, "units", check_units(self.units))
        object.__setattr__(self, "meta", jsonable(self.meta, "meta"))
        errors, kind = check_errors(self.errors, self.error_kind, pos.shape[0])
        object.__setattr__(self, "errors", None if errors is None else _read_only(errors))
        object.__setattr__(self, "error_kind", kind)

    # ---- views ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.pos.shape[0]

    def __repr__(self) -> str:
        labels = f", labels={list(self.label_names)}" if self.labels is not None else ""
        errors = f", errors={self.error_kind}" if self.errors is not None else ""
        return f"Catalogue(N={len(self)}, units={self.units}{labels}{errors})"

    @property
    def phase_space(self) -> np.ndarray:
        """w = (x, v): [N, 6] float64 in (length, velocity) units."""
        return np.concatenate([self.pos, self.vel], axis=1)

    @property
    def r(self) -> np.ndarray:
        """Galactocentric radius |x|: [N]."""
        return np.linalg.norm(self.pos, axis=1)

    @property
    def speed(self) -> np.ndarray:
        """Speed |v|: [N]."""
        return np.linalg.norm(self.vel, axis=1)

    @property
    def label_dim(self) -> int:
        """C, the number of label columns (0 without labels)."""
        return 0 if self.labels is None else self.labels.shape[1]

    @property
    def model_units(self) -> ModelUnits | None:
        """The :class:`ModelUnits` recorded in ``meta["model_units"]``, if any."""
        mu = self.meta.get("model_units")
        return None if mu is None else _as_model_units(mu)

    def select(self, rows, **meta_updates: Any) -> "Catalogue":
        """The stars ``rows`` (boolean mask [N] or integer indices) as a new catalogue.

        Its meta is this catalogue's, updated with ``meta_updates``.
        """
        rows = np.asarray(rows)
        if rows.dtype == bool and rows.shape != (len(self),):
            raise InputError(f"a boolean row mask must have shape [{len(self)}], got "
                             f"{list(rows.shape)}")
        if rows.size == 0 or (rows.dtype == bool and not rows.any()):
            raise InputError(f"the selection keeps none of the {len(self)} stars; a catalogue "
                             "needs N >= 1")
        return dataclasses.replace(self, pos=self.pos[rows], vel=self.vel[rows],
                                   labels=None if self.labels is None else self.labels[rows],
                                   errors=None if self.errors is None else self.errors[rows],
                                   meta={**self.meta, **meta_updates})

    # ---- units ------------------------------------------------------------------------------
    def to_units(self, length: str | None = None, velocity: str | None = None,
                 model_units: ModelUnits | Mapping[str, float] | None = None) -> "Catalogue":
        """The stars in other units: x' = x * (kpc per old unit) / (kpc per new unit), likewise v.

        ``length``/``velocity`` default to the current ones. Converting from or to "model"
        (G = M = a = 1) needs a :class:`ModelUnits`: ``model_units``, or the one in
        ``meta["model_units"]`` (then recorded in the result's meta). Example:
        ``cat.to_units("kpc", "km/s")``; SI: ``cat.to_units("m", "m/s")``.
        """
        length = self.units["length"] if length is None else length
        velocity = self.units["velocity"] if velocity is None else velocity
        target = check_units({"length": length, "velocity": velocity})
        mu = _as_model_units(model_units) if model_units is not None else self.model_units
        needs_model = MODEL_UNIT in (
            self.units["length"],
            self.units["velocity"],
            length,
            velocity,
        )
        if needs_model and mu is None:
            raise InputError(f"converting {self.units} to {target} involves model units; pass "
                             "model_units=ModelUnits(mass_msun, length_kpc) or record it in "
                             "meta['model_units']")
        fx = _length_to_kpc(self.units["length"], mu) / _length_to_kpc(length, mu)
        fv = _velocity_to_kms(self.units["velocity"], mu) / _velocity_to_kms(velocity, mu)
        meta = dict(self.meta)
        if mu is not None:
            meta["model_units"] = dataclasses.asdict(mu)
        return dataclasses.replace(self, pos=self.pos * fx, vel=self.vel * fv, units=target,
                                   meta=meta, errors=scaled_errors(self.errors, self.error_kind,
                                                                   fx, fv))

    # ---- files ------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write to ``path`` (.npz, .h5 or .hdf5) atomically: a crash keeps any old file."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix in NPZ_SUFFIXES:
            from .npz import write_npz
            with atomic_file(path, suffix=".npz") as tmp:
                write_npz(tmp, self)
        elif suffix in HDF5_SUFFIXES:
            from .hdf5 import write_hdf5
            with atomic_file(path, suffix=suffix) as tmp:
                write_hdf5(tmp, self)
        else:
            raise InputError(f"{path}: unsupported catalogue extension {suffix!r}; use .npz, .h5 "
                             "or .hdf5")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, units: Mapping[str, str] | None = None) -> "Catalogue":
        """Read a catalogue from .npz or .h5/.hdf5 (tfgalflow or Gadget ``PartType4`` layout).

        ``units`` states the units of files that do not carry them (e.g. the reference datasets:
        ``{"length": "m", "velocity": "m/s"}``); it must agree with units a file does carry.
        Raises FileError (missing, unreadable or corrupt file; missing dataset; no units known) and
        InputError (bad contents: NaN, wrong shapes, unknown units).
        """
        path = existing_file(path)
        suffix = path.suffix.lower()
        if suffix in NPZ_SUFFIXES:
            from .npz import read_npz
            return read_npz(path, units)
        if suffix in HDF5_SUFFIXES:
            from .hdf5 import open_hdf5
            return open_hdf5(path, units=units).read()
        raise InputError(f"{path}: unsupported catalogue extension {suffix!r}; use .npz, .h5 or "
                         ".hdf5")

    @staticmethod
    def open_hdf5(
        path: str | os.PathLike, units: Mapping[str, str] | None = None
    ) -> "HDF5Catalogue":
        """Lazy view of an HDF5 catalogue (see :func:`tfgalflow.catalogue.hdf5.open_hdf5`)."""
        from .hdf5 import open_hdf5
        return open_hdf5(path, units=units)

    # ---- tf.data ----------------------------------------------------------------------------
    def to_dataset(self, batch_size: int, shuffle: bool = True, seed: int = 0,
                   with_labels: bool | None = None) -> "tf.data.Dataset":
        """In-memory pipeline of batches x [B, 6] float32 = (pos, vel), or of (x, labels [B, C]).

        ``with_labels`` defaults to whether the catalogue has labels. With ``shuffle`` the order is
        a fresh permutation every epoch, reproducible from ``seed``.
        """
        import tensorflow as tf

        batch_size = validation.integer(batch_size, "batch_size")
        with_labels = self._with_labels(with_labels)
        x = self.phase_space.astype(np.float32)
        rows = (x, self.labels.astype(np.float32)) if with_labels else x
        ds = tf.data.Dataset.from_tensor_slices(rows)
        if shuffle:
            ds = ds.shuffle(len(self), seed=seed, reshuffle_each_iteration=True)
        return ds.batch(batch_size)

    def _with_labels(self, with_labels: bool | None) -> bool:
        if with_labels is None:
            return self.labels is not None
        if with_labels and self.labels is None:
            raise InputError("with_labels=True but the catalogue has no labels")
        return bool(with_labels)



# ---- errors -------------------------------------------------------------------------------------

def check_errors(errors: Any, kind: str | None, n: int) -> tuple[np.ndarray | None, str | None]:
    """Validated (errors, error_kind) of a catalogue of ``n`` stars (see :class:`Catalogue`).

    Returns a float64 copy and the kind (defaulted from the shape when None); (None, None) without
    errors. InputError naming the field, its shape and the expected one otherwise.
    """
    if errors is None:
        if kind is not None:
            raise InputError(f"error_kind = {kind!r} was given without errors; pass errors [N, 6] "
                             "or [N, 6, 6]")
        return None, None
    try:
        errors = np.array(errors, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"errors cannot be read as a float array ({exc}); expected [{n}, 6] or "
                         f"[{n}, 6, 6]") from None
    if kind is None:
        kind = "covariance" if errors.ndim == 3 else "absolute"
    validation.one_of(kind, "error_kind", ERROR_KINDS)
    expected = [n, 6, 6] if kind == "covariance" else [n, 6]
    if list(errors.shape) != expected:
        raise InputError(f"errors ({kind}) have shape {list(errors.shape)}; expected {expected}")
    validation.check_finite_rows(errors, "errors")
    if kind != "covariance":
        negative = np.nonzero((errors < 0).any(axis=1))[0]
        if negative.size:
            raise InputError(f"errors ({kind}) are negative in {negative.size} row(s), first rows "
                             f"{negative[:5].tolist()}; standard deviations must be >= 0")
        return errors, kind
    scale = np.maximum(np.abs(errors).max(axis=(1, 2)), np.finfo(float).tiny)
    asymmetric = np.nonzero((np.abs(errors - errors.transpose(0, 2, 1)).max(axis=(1, 2))
                             > 1e-10 * scale))[0]
    if asymmetric.size:
        raise InputError(
            f"errors (covariance) are not symmetric in {asymmetric.size} row(s), first "
            f"rows {asymmetric[:5].tolist()}; expected C = C^T [N, 6, 6]"
        )
    not_psd = np.nonzero(np.linalg.eigvalsh(errors)[:, 0] < -1e-10 * scale)[0]
    if not_psd.size:
        raise InputError(
            f"errors (covariance) have negative eigenvalues in {not_psd.size} row(s), "
            f"first rows {not_psd[:5].tolist()}; a covariance is positive "
            "semi-definite"
        )
    return errors, kind


def scaled_errors(errors: np.ndarray | None, kind: str | None, fx: float,
                  fv: float) -> np.ndarray | None:
    """Errors of columns rescaled by (fx, fx, fx, fv, fv, fv): σ' = f σ, C' = diag(f) C diag(f);
    fractional errors are unit-free and returned as they are.
    """
    if errors is None or kind == "fractional":
        return errors
    f = np.array([fx] * 3 + [fv] * 3)
    if kind == "covariance":
        return errors * f[:, None] * f[None, :]
    return errors * f



# ---- units --------------------------------------------------------------------------------------

def check_units(units: Mapping[str, str] | None) -> dict[str, str]:
    """Validated ``{"length": L, "velocity": V}``; InputError if missing, incomplete or unknown."""
    allowed = (f"length in {sorted(LENGTH_UNITS) + [MODEL_UNIT]}, velocity in "
               f"{sorted(VELOCITY_UNITS) + [MODEL_UNIT]}")
    if units is None:
        raise InputError("units are missing; pass units={'length': ..., 'velocity': ...} with "
                         f"{allowed}")
    if not isinstance(units, Mapping):
        raise InputError(f"units must be a dict {{'length': ..., 'velocity': ...}}, got {units!r}")
    missing = [k for k in ("length", "velocity") if k not in units]
    if missing:
        raise InputError(f"units {dict(units)} lack {missing}; expected {allowed}")
    extra = sorted(set(units) - {"length", "velocity"})
    if extra:
        raise InputError(f"units {dict(units)} have unexpected keys {extra}; expected only "
                         "'length' and 'velocity'")
    length, velocity = units["length"], units["velocity"]
    if length not in LENGTH_UNITS and length != MODEL_UNIT:
        raise InputError(f"unknown length unit {length!r}; expected one of "
                         f"{sorted(LENGTH_UNITS) + [MODEL_UNIT]}")
    if velocity not in VELOCITY_UNITS and velocity != MODEL_UNIT:
        raise InputError(f"unknown velocity unit {velocity!r}; expected one of "
                         f"{sorted(VELOCITY_UNITS) + [MODEL_UNIT]}")
    return {"length": str(length), "velocity": str(velocity)}


def _length_to_kpc(unit: str, mu: ModelUnits | None) -> float:
    return mu.length_kpc if unit == MODEL_UNIT else LENGTH_UNITS[unit]


def _velocity_to_kms(unit: str, mu: ModelUnits | None) -> float:
    return mu.velocity_kms if unit == MODEL_UNIT else VELOCITY_UNITS[unit]


def _as_model_units(mu: Any) -> ModelUnits:
    if isinstance(mu, ModelUnits):
        return mu
    try:
        return ModelUnits(**dict(mu))
    except (TypeError, ValueError) as exc:
        raise InputError(f"model_units {mu!r} is not a ModelUnits(mass_msun, length_kpc): "
                         f"{exc}") from None



# ---- meta, units of files, paths ----------------------------------------------------------------

def jsonable(meta: Any, name: str) -> dict:
    """A plain-JSON copy of ``meta`` (NumPy scalars/arrays, dataclasses and paths converted)."""
    if meta is None:
        return {}
    if not isinstance(meta, Mapping):
        raise InputError(f"{name} must be a dict, got {type(meta).__name__}")
    try:
        return json.loads(json.dumps(dict(meta), default=_json_default))
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be JSON-serialisable: {exc}") from None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (Path, bytes)):
        return obj.decode() if isinstance(obj, bytes) else str(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} {obj!r} is not JSON-serialisable")


def resolve_units(path: Path, file_units: Any, given: Mapping[str, str] | None,
                   fallback: Mapping[str, str] | None = None) -> dict[str, str]:
    """The file's units, checked against the caller's ``given`` ones.

    When the file records none: ``given``, else ``fallback``, else FileError.
    """
    if file_units is not None:
        try:
            file_units = check_units(file_units)
        except InputError as exc:
            raise FileError(f"{path}: bad units in the file: {exc}") from None
        if given is not None and check_units(given) != file_units:
            raise InputError(f"{path}: the file says units {file_units} but units={dict(given)} "
                             "were given; load without units= and convert with .to_units(...)")
        return file_units
    if given is not None:
        return check_units(given)
    if fallback is not None:
        return dict(fallback)
    raise FileError(
        f"{path}: the file records no units; state them (command line: --units m,m/s; "
        "Python: Catalogue.load(path, units={'length': 'm', 'velocity': 'm/s'}), as for the "
        "SI reference datasets)"
    )


def existing_file(path: str | os.PathLike) -> Path:
    """``path`` as a Path, after checking it names an existing regular file (FileError if not)."""
    path = Path(path)
    if not path.exists():
        raise FileError(f"{path}: no such catalogue file")
    if not path.is_file():
        raise FileError(f"{path}: not a file (expected a catalogue .npz, .h5 or .hdf5)")
    return path


def _read_only(array: np.ndarray) -> np.ndarray:
    """``array`` (a fresh copy owned by the catalogue) made read-only."""
    array.setflags(write=False)
    return array
