"""Star catalogues: positions, velocities, optional labels, explicit units; files and tf.data pipelines.

A :class:`Catalogue` holds N stars as ``pos [N, 3]`` and ``vel [N, 3]`` (float64, read-only), optional
conditioning ``labels [N, C]`` with ``label_names``, the ``units`` of the numbers (``{"length": ...,
"velocity": ...}``; see :mod:`tfgalflow.units`) and a JSON-able ``meta`` dict recording provenance.
Everything is validated when the catalogue is made: a catalogue that exists is finite and well-shaped.

Files (chosen by extension, written atomically through :mod:`tfgalflow.atomic`):

``.npz``        arrays ``pos``, ``vel`` [, ``labels``, ``label_names``] as in the reference datasets of
                An, Naik, Evans & Burrage (2021) (which hold only ``pos``/``vel``, in m and m/s), plus 0-d
                string arrays ``units`` and ``meta`` (JSON) and ``format``/``format_version``. A file
                without ``units`` loads only when the caller states them:
                ``Catalogue.load("hq_iso_orig.npz", units={"length": "m", "velocity": "m/s"})``.
``.h5/.hdf5``   chunked datasets ``pos``, ``vel`` [, ``labels``] with the units, label names and meta as
                JSON attributes of the root group (and a ``units`` attribute on ``pos``/``vel``). Gadget-style
                snapshots are read too: ``PartType4/Coordinates`` and ``PartType4/Velocities``, units from
                a ``units`` attribute of the datasets, the header's ``UnitLength_in_cm`` /
                ``UnitVelocity_in_cm_per_s`` (converted to kpc and km/s), or the caller.

Large HDF5 files are never read whole by :func:`open_hdf5` / :func:`hdf5_dataset`: ``len`` and the
metadata come from the file header, and the ``tf.data`` pipeline reads one group of chunks at a time.

Example::

    >>> cat = Catalogue(pos, vel, units={"length": "kpc", "velocity": "km/s"})
    >>> cat.save("mock.h5"); Catalogue.load("mock.h5").phase_space.shape
    (N, 6)
    >>> ds = hdf5_dataset("mock.h5", batch_size=1024, shuffle_buffer=100_000, seed=0)   # x [B, 6] float32
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import numpy as np

from .atomic import atomic_file
from .errors import FileError, InputError
from .units import CM_KPC, CM_S_KMS, LENGTH_UNITS, MODEL_UNIT, VELOCITY_UNITS, ModelUnits

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf

FORMAT = "tfgalflow-catalogue"
FORMAT_VERSION = 1
NPZ_SUFFIXES = (".npz",)
HDF5_SUFFIXES = (".h5", ".hdf5")
#: Rows per HDF5 chunk written by :meth:`Catalogue.save` (pos: 32768 x 3 x 8 B = 768 KiB).
CHUNK_ROWS = 32768
#: Gadget-style particle group and datasets understood by :meth:`Catalogue.load`.
GADGET_GROUP = "PartType4"
GADGET_POS, GADGET_VEL = "Coordinates", "Velocities"


# ---- the catalogue -------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Catalogue:
    """N stars in 6D phase space with explicit units.

    Attributes:
        pos: [N, 3] positions in ``units["length"]`` (float64, read-only copy).
        vel: [N, 3] velocities in ``units["velocity"]`` (float64, read-only copy).
        labels: [N, C] conditioning labels (float64) or None. A 1-D [N] array is taken as one column.
        label_names: C names (default ``label_0 ...``); empty when there are no labels.
        units: ``{"length": L, "velocity": V}`` with L in ``units.LENGTH_UNITS`` or "model", V in
            ``units.VELOCITY_UNITS`` or "model". Required: numbers without units are refused.
        meta: JSON-able provenance (sampler, seed, model, cuts, noise, ``model_units`` ...).

    Raises InputError on wrong shapes, N = 0, NaN/inf (naming the field and the first bad row),
    missing or unknown units, label names that do not match the labels, or non-JSON meta.
    """

    pos: np.ndarray
    vel: np.ndarray
    labels: np.ndarray | None = None
    label_names: tuple[str, ...] = ()
    units: Mapping[str, str] | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        pos = _finite_array(self.pos, "pos", "[N, 3]", width=3)
        vel = _finite_array(self.vel, "vel", "[N, 3]", width=3)
        if pos.shape[0] != vel.shape[0]:
            raise InputError(f"pos has {pos.shape[0]} rows but vel has {vel.shape[0]}; expected pos [N, 3] and "
                             f"vel [N, 3] with the same N")
        labels, names = self.labels, tuple(str(n) for n in (self.label_names or ()))
        if labels is not None:
            labels = np.asarray(labels)
            if labels.ndim == 1:
                labels = labels[:, None]
            labels = _finite_array(labels, "labels", f"[{pos.shape[0]}, C]")
            if labels.shape[0] != pos.shape[0]:
                raise InputError(f"labels have {labels.shape[0]} rows but pos has {pos.shape[0]}; expected labels "
                                 f"[{pos.shape[0]}, C]")
            width = labels.shape[1]
            if not names:
                names = tuple(f"label_{i}" for i in range(width))
            if len(names) != width:
                raise InputError(f"label_names has {len(names)} entries {list(names)} but labels have {width} "
                                 f"column(s); expected {width} names")
        elif names:
            raise InputError(f"label_names {list(names)} were given without labels; pass labels [N, {len(names)}]")
        object.__setattr__(self, "pos", pos)
        object.__setattr__(self, "vel", vel)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "label_names", names)
        object.__setattr__(self, "units", check_units(self.units))
        object.__setattr__(self, "meta", _jsonable(self.meta, "meta"))

    # ---- views ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.pos.shape[0]

    def __repr__(self) -> str:
        labels = f", labels={list(self.label_names)}" if self.labels is not None else ""
        return f"Catalogue(N={len(self)}, units={self.units}{labels})"

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
        """The stars ``rows`` (boolean mask [N] or integer indices) as a new catalogue; meta updated."""
        rows = np.asarray(rows)
        if rows.dtype == bool and rows.shape != (len(self),):
            raise InputError(f"a boolean row mask must have shape [{len(self)}], got {list(rows.shape)}")
        if rows.size == 0 or (rows.dtype == bool and not rows.any()):
            raise InputError(f"the selection keeps none of the {len(self)} stars; a catalogue needs N >= 1")
        return dataclasses.replace(self, pos=self.pos[rows], vel=self.vel[rows],
                                   labels=None if self.labels is None else self.labels[rows],
                                   meta={**self.meta, **meta_updates})

    # ---- units ------------------------------------------------------------------------------
    def to_units(self, length: str | None = None, velocity: str | None = None,
                 model_units: ModelUnits | Mapping[str, float] | None = None) -> "Catalogue":
        """The same stars in other units: x' = x * (kpc per old unit) / (kpc per new unit), likewise v.

        ``length``/``velocity`` default to the current ones. Converting from or to "model" (G = M = a = 1)
        needs a :class:`ModelUnits`: ``model_units``, or the one in ``meta["model_units"]`` (then recorded
        in the result's meta). Example: ``cat.to_units("kpc", "km/s")``; SI: ``cat.to_units("m", "m/s")``.
        """
        length = self.units["length"] if length is None else length
        velocity = self.units["velocity"] if velocity is None else velocity
        target = check_units({"length": length, "velocity": velocity})
        mu = _as_model_units(model_units) if model_units is not None else self.model_units
        needs_model = MODEL_UNIT in (self.units["length"], self.units["velocity"], length, velocity)
        if needs_model and mu is None:
            raise InputError(f"converting {self.units} to {target} involves model units; pass "
                             f"model_units=ModelUnits(mass_msun, length_kpc) or record it in meta['model_units']")
        fx = _length_to_kpc(self.units["length"], mu) / _length_to_kpc(length, mu)
        fv = _velocity_to_kms(self.units["velocity"], mu) / _velocity_to_kms(velocity, mu)
        meta = dict(self.meta)
        if mu is not None:
            meta["model_units"] = dataclasses.asdict(mu)
        return dataclasses.replace(self, pos=self.pos * fx, vel=self.vel * fv, units=target, meta=meta)

    # ---- files ------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write to ``path`` (.npz, or .h5/.hdf5) atomically: a crash leaves any previous file intact."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix in NPZ_SUFFIXES:
            with atomic_file(path, suffix=".npz") as tmp:
                _write_npz(tmp, self)
        elif suffix in HDF5_SUFFIXES:
            with atomic_file(path, suffix=suffix) as tmp:
                _write_hdf5(tmp, self)
        else:
            raise InputError(f"{path}: unsupported catalogue extension {suffix!r}; use .npz, .h5 or .hdf5")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, units: Mapping[str, str] | None = None) -> "Catalogue":
        """Read a catalogue from .npz or .h5/.hdf5 (tfgalflow or Gadget ``PartType4`` layout).

        ``units`` states the units of files that do not carry them (e.g. the reference datasets:
        ``{"length": "m", "velocity": "m/s"}``); it must agree with units a file does carry.
        Raises FileError (missing, unreadable or corrupt file; missing dataset; no units known) and
        InputError (bad contents: NaN, wrong shapes, unknown units).
        """
        path = _existing_file(path)
        suffix = path.suffix.lower()
        if suffix in NPZ_SUFFIXES:
            return _read_npz(path, units)
        if suffix in HDF5_SUFFIXES:
            return open_hdf5(path, units=units).read()
        raise InputError(f"{path}: unsupported catalogue extension {suffix!r}; use .npz, .h5 or .hdf5")

    @staticmethod
    def open_hdf5(path: str | os.PathLike, units: Mapping[str, str] | None = None) -> "HDF5Catalogue":
        """Lazy view of an HDF5 catalogue (see :func:`open_hdf5`)."""
        return open_hdf5(path, units=units)

    # ---- tf.data ----------------------------------------------------------------------------
    def to_dataset(self, batch_size: int, shuffle: bool = True, seed: int = 0,
                   with_labels: bool | None = None) -> "tf.data.Dataset":
        """In-memory pipeline of batches x [B, 6] float32 = (pos, vel), or (x, labels [B, C]) pairs.

        ``with_labels`` defaults to whether the catalogue has labels. With ``shuffle`` the order is a
        fresh permutation every epoch, reproducible from ``seed``.
        """
        import tensorflow as tf

        batch_size = _positive_int(batch_size, "batch_size")
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


# ---- lazy HDF5 access ---------------------------------------------------------------------------

@dataclass(frozen=True)
class HDF5Catalogue:
    """Lazy view of a catalogue in an HDF5 file: header facts now, rows only when asked for.

    Attributes: ``path``, ``n`` (= ``len``), ``units``, ``label_names``, ``meta``, ``layout``
    ("tfgalflow" or "gadget"). Stored values are multiplied by ``length_scale``/``velocity_scale`` on
    reading (1 except for Gadget files whose cgs unit attributes are converted to kpc, km/s).
    """

    path: Path
    n: int
    units: Mapping[str, str]
    label_names: tuple[str, ...]
    meta: Mapping[str, Any]
    layout: str
    pos_name: str
    vel_name: str
    labels_name: str | None
    chunk_rows: int
    length_scale: float = 1.0
    velocity_scale: float = 1.0

    def __len__(self) -> int:
        return self.n

    @property
    def label_dim(self) -> int:
        return len(self.label_names)

    def read(self, start: int = 0, stop: int | None = None, step: int = 1) -> Catalogue:
        """Rows start:stop:step as an in-memory :class:`Catalogue` (the whole file by default)."""
        import h5py

        rows = slice(start, stop, step)
        try:
            with h5py.File(self.path, "r") as f:
                pos = np.asarray(f[self.pos_name][rows], np.float64) * self.length_scale
                vel = np.asarray(f[self.vel_name][rows], np.float64) * self.velocity_scale
                labels = f[self.labels_name][rows] if self.labels_name else None
        except (OSError, KeyError, ValueError) as exc:
            raise FileError(f"{self.path}: cannot read rows {rows.start}:{rows.stop}:{rows.step}: {exc}") from None
        try:
            return Catalogue(pos, vel, labels=labels, label_names=self.label_names if labels is not None else (),
                             units=dict(self.units), meta=dict(self.meta))
        except InputError as exc:
            raise InputError(f"{self.path}: {exc}") from None

    def batches(self, batch_size: int, shuffle_buffer: int = 0, seed: int = 0, with_labels: bool | None = None,
                drop_remainder: bool = False, epoch: int = 0) -> Iterator[np.ndarray | tuple[np.ndarray, np.ndarray]]:
        """One epoch of float32 batches x [B, 6] (or (x, labels [B, C])), reading groups of chunks.

        ``shuffle_buffer = 0``: file order. ``shuffle_buffer > 0``: the chunk order is permuted and the
        rows of each group of ceil(shuffle_buffer / chunk) chunks are permuted together, with
        ``numpy.random.default_rng([seed, epoch])``. Every row appears exactly once per epoch (the last
        batch may be short unless ``drop_remainder``). Memory: about max(shuffle_buffer, chunk) rows.
        """
        import h5py

        batch_size = _positive_int(batch_size, "batch_size")
        with_labels = self._with_labels(with_labels)
        rng = np.random.default_rng([seed, epoch]) if shuffle_buffer > 0 else None
        block = self.chunk_rows
        starts = np.arange(0, self.n, block)
        group = max(1, math.ceil(shuffle_buffer / block)) if rng is not None else 1
        if rng is not None:
            starts = rng.permutation(starts)
        pending_x = np.empty((0, 6), np.float32)
        pending_l = np.empty((0, self.label_dim), np.float32)
        with _open_h5(self.path, h5py) as f:
            pos_ds, vel_ds = f[self.pos_name], f[self.vel_name]
            lab_ds = f[self.labels_name] if with_labels else None
            for g in range(0, len(starts), group):
                spans = [(int(s), min(int(s) + block, self.n)) for s in starts[g:g + group]]
                x = np.concatenate([np.concatenate([np.asarray(pos_ds[a:b], np.float64) * self.length_scale,
                                                    np.asarray(vel_ds[a:b], np.float64) * self.velocity_scale],
                                                   axis=1) for a, b in spans])
                _check_block(x, self.path, "pos/vel", spans)
                lab = (np.concatenate([lab_ds[a:b] for a, b in spans]).reshape(len(x), -1)
                       if with_labels else None)
                if lab is not None:
                    _check_block(lab, self.path, "labels", spans)
                if rng is not None:
                    perm = rng.permutation(len(x))
                    x = x[perm]
                    lab = None if lab is None else lab[perm]
                x = np.concatenate([pending_x, x.astype(np.float32)])
                if lab is not None:
                    lab = np.concatenate([pending_l, lab.astype(np.float32)])
                full = len(x) // batch_size * batch_size
                for i in range(0, full, batch_size):
                    yield (x[i:i + batch_size], lab[i:i + batch_size]) if with_labels else x[i:i + batch_size]
                pending_x = x[full:]
                if lab is not None:
                    pending_l = lab[full:]
        if len(pending_x) and not drop_remainder:
            yield (pending_x, pending_l) if with_labels else pending_x

    def dataset(self, batch_size: int, shuffle_buffer: int = 0, seed: int = 0, with_labels: bool | None = None,
                drop_remainder: bool = False) -> "tf.data.Dataset":
        """``tf.data.Dataset`` streaming :meth:`batches` from disk; epoch k (the k-th iteration) uses seed (seed, k)."""
        import tensorflow as tf

        batch_size = _positive_int(batch_size, "batch_size")
        if shuffle_buffer < 0:
            raise InputError(f"shuffle_buffer must be >= 0 rows, got {shuffle_buffer}")
        with_labels = self._with_labels(with_labels)
        epochs = itertools.count()

        def generator():
            yield from self.batches(batch_size, shuffle_buffer, seed, with_labels, drop_remainder, next(epochs))

        x_spec = tf.TensorSpec([batch_size if drop_remainder else None, 6], tf.float32)
        if with_labels:
            l_spec = tf.TensorSpec([x_spec.shape[0], self.label_dim], tf.float32)
            signature: Any = (x_spec, l_spec)
        else:
            signature = x_spec
        return tf.data.Dataset.from_generator(generator, output_signature=signature).prefetch(2)

    def _with_labels(self, with_labels: bool | None) -> bool:
        if with_labels is None:
            return self.labels_name is not None
        if with_labels and self.labels_name is None:
            raise InputError(f"{self.path}: with_labels=True but the file has no labels dataset")
        return bool(with_labels)


def open_hdf5(path: str | os.PathLike, units: Mapping[str, str] | None = None) -> HDF5Catalogue:
    """Open an HDF5 catalogue lazily: reads the header (N, units, labels, meta), no rows.

    Layouts: tfgalflow (``pos``, ``vel`` [, ``labels``] at the root) or Gadget (``PartType4/Coordinates``,
    ``PartType4/Velocities``). Units: the file's ``units`` attributes, Gadget's cgs unit attributes in
    ``Header``/``Parameters``/``Units`` (positions then scaled to kpc, velocities to km/s; comoving a and
    h factors are *not* applied), or ``units`` given here (which override Gadget's cgs attributes and must
    agree with tfgalflow units). FileError when the file is missing/corrupt or a dataset/units are missing.
    """
    import h5py

    path = _existing_file(path)
    with _open_h5(path, h5py) as f:
        if "pos" in f or "vel" in f:
            return _tfgalflow_layout(path, f, units)
        if GADGET_GROUP in f:
            return _gadget_layout(path, f, units)
        raise FileError(f"{path}: no catalogue found: expected datasets 'pos' and 'vel' [N, 3] at the root, or "
                        f"'{GADGET_GROUP}/{GADGET_POS}' and '{GADGET_GROUP}/{GADGET_VEL}'; the file holds "
                        f"{sorted(f.keys())}")


def hdf5_dataset(path: str | os.PathLike, batch_size: int, shuffle_buffer: int = 0, seed: int = 0,
                 with_labels: bool | None = None, drop_remainder: bool = False,
                 units: Mapping[str, str] | None = None) -> "tf.data.Dataset":
    """Stream an HDF5 catalogue as batches x [B, 6] float32 (or (x, labels)), never loading it whole.

    Same as ``open_hdf5(path, units).dataset(batch_size, shuffle_buffer, seed, with_labels, drop_remainder)``;
    each epoch yields every row exactly once, in a permuted order when ``shuffle_buffer > 0``.
    """
    return open_hdf5(path, units=units).dataset(batch_size, shuffle_buffer=shuffle_buffer, seed=seed,
                                                with_labels=with_labels, drop_remainder=drop_remainder)


# ---- units --------------------------------------------------------------------------------------

def check_units(units: Mapping[str, str] | None) -> dict[str, str]:
    """Validated ``{"length": L, "velocity": V}``; InputError when missing, incomplete or unknown."""
    allowed = (f"length in {sorted(LENGTH_UNITS) + [MODEL_UNIT]}, velocity in "
               f"{sorted(VELOCITY_UNITS) + [MODEL_UNIT]}")
    if units is None:
        raise InputError(f"units are missing; pass units={{'length': ..., 'velocity': ...}} with {allowed}")
    if not isinstance(units, Mapping):
        raise InputError(f"units must be a dict {{'length': ..., 'velocity': ...}}, got {units!r}")
    missing = [k for k in ("length", "velocity") if k not in units]
    if missing:
        raise InputError(f"units {dict(units)} lack {missing}; expected {allowed}")
    extra = sorted(set(units) - {"length", "velocity"})
    if extra:
        raise InputError(f"units {dict(units)} have unexpected keys {extra}; expected only 'length' and 'velocity'")
    length, velocity = units["length"], units["velocity"]
    if length not in LENGTH_UNITS and length != MODEL_UNIT:
        raise InputError(f"unknown length unit {length!r}; expected one of {sorted(LENGTH_UNITS) + [MODEL_UNIT]}")
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
        raise InputError(f"model_units {mu!r} is not a ModelUnits(mass_msun, length_kpc): {exc}") from None


# ---- validation ---------------------------------------------------------------------------------

def _finite_array(a: Any, name: str, expected: str, width: int | None = None) -> np.ndarray:
    """float64 read-only copy of a 2-D array; InputError naming ``name`` on bad shape, N = 0 or NaN/inf."""
    try:
        arr = np.array(a, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} cannot be read as a float array ({exc}); expected {expected}") from None
    if arr.ndim != 2 or (width is not None and arr.shape[1] != width) or arr.shape[1] == 0:
        raise InputError(f"{name} has shape {list(arr.shape)}; expected {expected}")
    if arr.shape[0] == 0:
        raise InputError(f"{name} is empty (shape {list(arr.shape)}); expected {expected} with N >= 1")
    finite = np.isfinite(arr)
    if not finite.all():
        bad = np.nonzero(~finite.all(axis=1))[0]
        raise InputError(f"{name} has non-finite values (NaN or inf) in {bad.size} row(s); first bad row "
                         f"{int(bad[0])}: {arr[bad[0]].tolist()}")
    arr.setflags(write=False)
    return arr


def _jsonable(meta: Any, name: str) -> dict:
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


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_block(a: np.ndarray, path: Path, what: str, spans: list[tuple[int, int]]) -> None:
    """InputError naming the file row when a streamed block holds NaN/inf."""
    finite = np.isfinite(a).all(axis=1)
    if not finite.all():
        i = int(np.nonzero(~finite)[0][0])
        offsets = np.cumsum([0] + [b - a_ for a_, b in spans])
        k = int(np.searchsorted(offsets, i, side="right") - 1)
        raise InputError(f"{path}: {what} has non-finite values (NaN or inf); first bad row "
                         f"{spans[k][0] + i - int(offsets[k])}")


# ---- npz ------------------------------------------------------------------------------------------

def _write_npz(tmp: Path, cat: Catalogue) -> None:
    arrays = {"pos": cat.pos, "vel": cat.vel, "units": np.array(json.dumps(cat.units)),
              "meta": np.array(json.dumps(cat.meta)), "format": np.array(FORMAT),
              "format_version": np.array(FORMAT_VERSION)}
    if cat.labels is not None:
        arrays["labels"] = cat.labels
        arrays["label_names"] = np.array(cat.label_names, dtype=str)
    np.savez(tmp, **arrays)


def _read_npz(path: Path, units: Mapping[str, str] | None) -> Catalogue:
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            missing = [k for k in ("pos", "vel") if k not in keys]
            if missing:
                raise FileError(f"{path}: missing array(s) {missing}; a catalogue .npz holds 'pos' [N, 3] and "
                                f"'vel' [N, 3] (it has {sorted(keys)})")
            if "format_version" in keys and int(z["format_version"]) > FORMAT_VERSION:
                raise FileError(f"{path}: catalogue format version {int(z['format_version'])} is newer than this "
                                f"tfgalflow reads ({FORMAT_VERSION})")
            pos, vel = z["pos"], z["vel"]
            labels = z["labels"] if "labels" in keys else None
            names = tuple(str(s) for s in z["label_names"]) if "label_names" in keys else ()
            file_units = _json_field(z["units"], path, "units") if "units" in keys else None
            meta = _json_field(z["meta"], path, "meta") if "meta" in keys else {}
    except FileError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as exc:
        raise FileError(f"{path}: not a readable .npz catalogue ({type(exc).__name__}: {exc})") from None
    return _labelled(Catalogue, path, pos, vel, labels, names, _resolve_units(path, file_units, units), meta)


def _json_field(value: np.ndarray, path: Path, name: str) -> Any:
    try:
        return json.loads(str(value))
    except ValueError as exc:
        raise FileError(f"{path}: attribute {name!r} is not valid JSON ({exc})") from None


def _resolve_units(path: Path, file_units: Any, given: Mapping[str, str] | None,
                   fallback: Mapping[str, str] | None = None) -> dict[str, str]:
    """The file's units, checked against the caller's; the caller's (or ``fallback``) when the file has none."""
    if file_units is not None:
        try:
            file_units = check_units(file_units)
        except InputError as exc:
            raise FileError(f"{path}: bad units in the file: {exc}") from None
        if given is not None and check_units(given) != file_units:
            raise InputError(f"{path}: the file says units {file_units} but units={dict(given)} were given; load "
                             f"without units= and convert with .to_units(...)")
        return file_units
    if given is not None:
        return check_units(given)
    if fallback is not None:
        return dict(fallback)
    raise FileError(f"{path}: the file records no units; pass them, e.g. Catalogue.load(path, units={{'length': "
                    f"'m', 'velocity': 'm/s'}}) for the SI reference datasets")


def _labelled(cls, path, pos, vel, labels, names, units, meta) -> Catalogue:
    try:
        return cls(pos, vel, labels=labels, label_names=names if labels is not None else (), units=units, meta=meta)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None


# ---- HDF5 -----------------------------------------------------------------------------------------

def _write_hdf5(tmp: Path, cat: Catalogue) -> None:
    import h5py

    n = len(cat)
    rows = min(n, CHUNK_ROWS)
    with h5py.File(tmp, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["units"] = json.dumps(cat.units)
        f.attrs["meta"] = json.dumps(cat.meta)
        f.attrs["label_names"] = json.dumps(list(cat.label_names))
        pos = f.create_dataset("pos", data=cat.pos, chunks=(rows, 3))
        pos.attrs["units"] = cat.units["length"]
        vel = f.create_dataset("vel", data=cat.vel, chunks=(rows, 3))
        vel.attrs["units"] = cat.units["velocity"]
        if cat.labels is not None:
            f.create_dataset("labels", data=cat.labels, chunks=(rows, cat.labels.shape[1]))


class _open_h5:
    """``h5py.File(path, "r")`` with unreadable/corrupt files turned into FileError."""

    def __init__(self, path: Path, h5py):
        self.path, self.h5py, self.file = path, h5py, None

    def __enter__(self):
        try:
            self.file = self.h5py.File(self.path, "r")
        except OSError as exc:
            raise FileError(f"{self.path}: not a readable HDF5 file ({exc})") from None
        return self.file

    def __exit__(self, *exc_info):
        self.file.close()
        return False


def _attr(obj, name: str, default: Any = None) -> Any:
    value = obj.attrs.get(name, default)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.shape == ():
        return value.item()
    return value


def _dataset(path: Path, f, name: str, width: int | None) -> Any:
    import h5py

    if name not in f or not isinstance(f[name], h5py.Dataset):
        raise FileError(f"{path}: missing dataset {name!r} (expected [N, {width or 'C'}]); the file holds "
                        f"{_listing(f)}")
    ds = f[name]
    if len(ds.shape) != 2 or (width is not None and ds.shape[1] != width):
        raise FileError(f"{path}: dataset {name!r} has shape {list(ds.shape)}; expected [N, {width or 'C'}]")
    return ds


def _listing(f) -> list[str]:
    names: list[str] = []
    f.visit(names.append)
    return names[:20]


def _block_rows(ds) -> int:
    """Rows read per block: a whole number of chunks, at least 16384 rows."""
    chunk = ds.chunks[0] if ds.chunks else CHUNK_ROWS
    return max(1, math.ceil(16384 / chunk)) * chunk


def _tfgalflow_layout(path: Path, f, units: Mapping[str, str] | None) -> HDF5Catalogue:
    pos, vel = _dataset(path, f, "pos", 3), _dataset(path, f, "vel", 3)
    if pos.shape[0] != vel.shape[0]:
        raise FileError(f"{path}: 'pos' has {pos.shape[0]} rows but 'vel' has {vel.shape[0]}")
    version = _attr(f, "format_version")
    if version is not None and int(version) > FORMAT_VERSION:
        raise FileError(f"{path}: catalogue format version {version} is newer than this tfgalflow reads "
                        f"({FORMAT_VERSION})")
    raw_units = _attr(f, "units")
    if raw_units is not None:
        file_units = _json_attr(raw_units, path, "units")
    elif _attr(pos, "units") is not None and _attr(vel, "units") is not None:
        file_units = {"length": _attr(pos, "units"), "velocity": _attr(vel, "units")}
    else:
        file_units = None
    labels_name, names = None, ()
    if "labels" in f:
        lab = _dataset(path, f, "labels", None)
        if lab.shape[0] != pos.shape[0]:
            raise FileError(f"{path}: 'labels' has {lab.shape[0]} rows but 'pos' has {pos.shape[0]}")
        labels_name = "labels"
        raw_names = _attr(f, "label_names")
        names = (tuple(_json_attr(raw_names, path, "label_names")) if raw_names is not None
                 else tuple(f"label_{i}" for i in range(lab.shape[1])))
        if len(names) != lab.shape[1]:
            raise FileError(f"{path}: {len(names)} label names for {lab.shape[1]} label columns")
    raw_meta = _attr(f, "meta")
    meta = dict(_json_attr(raw_meta, path, "meta")) if raw_meta is not None else {}
    return HDF5Catalogue(path=path, n=int(pos.shape[0]), units=_resolve_units(path, file_units, units),
                         label_names=names, meta=meta, layout="tfgalflow", pos_name="pos", vel_name="vel",
                         labels_name=labels_name, chunk_rows=_block_rows(pos))


def _gadget_layout(path: Path, f, units: Mapping[str, str] | None) -> HDF5Catalogue:
    pos_name, vel_name = f"{GADGET_GROUP}/{GADGET_POS}", f"{GADGET_GROUP}/{GADGET_VEL}"
    pos, vel = _dataset(path, f, pos_name, 3), _dataset(path, f, vel_name, 3)
    if pos.shape[0] != vel.shape[0]:
        raise FileError(f"{path}: {pos_name!r} has {pos.shape[0]} rows but {vel_name!r} has {vel.shape[0]}")
    meta: dict[str, Any] = {"layout": f"gadget:{GADGET_GROUP}", "source_file": str(path)}
    if "Header" in f:
        meta["gadget_header"] = {k: _attr(f["Header"], k) for k in f["Header"].attrs}
    named = None
    if _attr(pos, "units") is not None and _attr(vel, "units") is not None:
        named = {"length": _attr(pos, "units"), "velocity": _attr(vel, "units")}
    cgs = _gadget_cgs_units(f)
    length_scale = velocity_scale = 1.0
    if named is None and units is None and cgs is not None:
        length_scale, velocity_scale = cgs[0] * CM_KPC, cgs[1] * CM_S_KMS
        resolved = {"length": "kpc", "velocity": "km/s"}
        meta["unit_conversion"] = {"UnitLength_in_cm": cgs[0], "UnitVelocity_in_cm_per_s": cgs[1],
                                   "to": resolved, "comoving_factors_applied": False}
        hubble = meta.get("gadget_header", {}).get("HubbleParam")
        if hubble is not None and float(hubble) not in (0.0, 1.0):
            warnings.warn(f"{path}: HubbleParam = {hubble}: Gadget code units may be comoving kpc/h; tfgalflow "
                          f"applies only UnitLength_in_cm/UnitVelocity_in_cm_per_s. Pass units= if they differ.",
                          stacklevel=3)
    else:
        try:
            resolved = _resolve_units(path, named, units)
        except FileError:
            raise FileError(f"{path}: Gadget snapshot without units: no 'units' attribute on {pos_name!r}/"
                            f"{vel_name!r} and no UnitLength_in_cm/UnitVelocity_in_cm_per_s in Header, Parameters "
                            f"or Units; pass units={{'length': 'kpc', 'velocity': 'km/s'}}") from None
    return HDF5Catalogue(path=path, n=int(pos.shape[0]), units=resolved, label_names=(), meta=_jsonable(meta, "meta"),
                         layout="gadget", pos_name=pos_name, vel_name=vel_name, labels_name=None,
                         chunk_rows=_block_rows(pos), length_scale=length_scale, velocity_scale=velocity_scale)


def _gadget_cgs_units(f) -> tuple[float, float] | None:
    """(UnitLength_in_cm, UnitVelocity_in_cm_per_s) from the Header, Parameters or Units group, if present."""
    for group in ("Header", "Parameters", "Units"):
        if group in f:
            length = _attr(f[group], "UnitLength_in_cm")
            velocity = _attr(f[group], "UnitVelocity_in_cm_per_s")
            if length is not None and velocity is not None:
                return float(np.ravel(length)[0]), float(np.ravel(velocity)[0])
    return None


def _json_attr(value: Any, path: Path, name: str) -> Any:
    try:
        return json.loads(value)
    except (TypeError, ValueError) as exc:
        raise FileError(f"{path}: attribute {name!r} is not valid JSON ({exc})") from None


# ---- paths ----------------------------------------------------------------------------------------

def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileError(f"{path}: no such catalogue file")
    if not path.is_file():
        raise FileError(f"{path}: not a file (expected a catalogue .npz, .h5 or .hdf5)")
    return path


__all__ = ["Catalogue", "HDF5Catalogue", "open_hdf5", "hdf5_dataset", "check_units", "FORMAT", "FORMAT_VERSION"]
