"""HDF5 catalogues: the tfgalflow layout, written in chunks and read lazily or streamed to tf.data.

Layout: chunked datasets ``pos``, ``vel`` [, ``labels``, ``errors`` [N, 6] or [N, 6, 6] with an
``error_kind`` attribute] with the units, label names and meta as JSON attributes of the root group
(and a ``units`` attribute on ``pos``/``vel``). Gadget-style snapshots
are opened here too and read by :mod:`.gadget`.

Large files are never read whole by :func:`open_hdf5` / :func:`hdf5_dataset`: ``len`` and the
metadata come from the file header, and the ``tf.data`` pipeline reads one group of chunks at a
time.

Example::

    >>> cat.save("mock.h5")
    >>> ds = hdf5_dataset("mock.h5", batch_size=1024, shuffle_buffer=100_000, seed=0)  # [B, 6] f32
"""
from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import numpy as np

from .. import validation
from ..errors import FileError, InputError
from .core import FORMAT, FORMAT_VERSION, Catalogue, existing_file, resolve_units

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf

#: Rows per HDF5 chunk written by :meth:`Catalogue.save` (pos: 32768 x 3 x 8 B = 768 KiB).
CHUNK_ROWS = 32768


# ---- lazy access --------------------------------------------------------------------------------

@dataclass(frozen=True)
class HDF5Catalogue:
    """Lazy view of a catalogue in an HDF5 file: header facts now, rows only when asked for.

    Attributes: ``path``, ``n`` (= ``len``), ``units``, ``label_names``, ``meta``, ``layout``
    ("tfgalflow" or "gadget"). Stored values are multiplied by ``length_scale``/``velocity_scale``
    on reading (1 except for Gadget files whose cgs unit attributes are converted to kpc, km/s).
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
    errors_name: str | None = None
    error_kind: str | None = None

    def __len__(self) -> int:
        return self.n

    @property
    def label_dim(self) -> int:
        """C, the number of label columns (0 without labels)."""
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
                errors = f[self.errors_name][rows] if self.errors_name else None
        except (OSError, KeyError, ValueError) as exc:
            raise FileError(f"{self.path}: cannot read rows {rows.start}:{rows.stop}:{rows.step}: "
                            f"{exc}") from None
        try:
            return Catalogue(pos, vel, labels=labels,
                             label_names=self.label_names if labels is not None else (),
                             units=dict(self.units), meta=dict(self.meta), errors=errors,
                             error_kind=self.error_kind if errors is not None else None)
        except InputError as exc:
            raise InputError(f"{self.path}: {exc}") from None

    def batches(
        self,
        batch_size: int,
        shuffle_buffer: int = 0,
        seed: int = 0,
        with_labels: bool | None = None,
        drop_remainder: bool = False,
        epoch: int = 0,
        shard: tuple[int, int] | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> Iterator[np.ndarray | tuple[np.ndarray, np.ndarray]]:
        """One epoch of float32 batches x [B, 6] (or (x, labels [B, C])), reading groups of chunks.

        Rows start:stop are cut into blocks on the file's chunk grid (:meth:`shard_blocks`).
        ``shuffle_buffer = 0``: file order. ``shuffle_buffer > 0``: the block order is permuted and
        the rows of each group of ceil(shuffle_buffer / chunk) blocks are permuted together, with
        ``numpy.random.default_rng([seed, epoch])``. ``shard = (i, m)``: only the i-th of m
        contiguous runs of that (permuted) block order is read, so the m shards of one epoch
        partition the rows and a worker reads only its own. Every row of the shard appears exactly
        once per epoch (the last batch may be short unless ``drop_remainder``). Memory: about
        max(shuffle_buffer, chunk) rows.
        """
        import h5py

        batch_size = validation.integer(batch_size, "batch_size")
        with_labels = self._with_labels(with_labels)
        rng = np.random.default_rng([seed, epoch]) if shuffle_buffer > 0 else None
        block = self.chunk_rows
        blocks = self.shard_blocks(start, stop, shard, rng)
        group = max(1, math.ceil(shuffle_buffer / block)) if rng is not None else 1
        pending_x = np.empty((0, 6), np.float32)
        pending_l = np.empty((0, self.label_dim), np.float32)
        with _open_h5(self.path, h5py) as f:
            pos_ds, vel_ds = f[self.pos_name], f[self.vel_name]
            lab_ds = f[self.labels_name] if with_labels else None
            for g in range(0, len(blocks), group):
                spans = blocks[g:g + group]
                x = np.concatenate(
                    [
                        np.concatenate(
                            [
                                np.asarray(pos_ds[a:b], np.float64) * self.length_scale,
                                np.asarray(vel_ds[a:b], np.float64) * self.velocity_scale,
                            ],
                            axis=1,
                        )
                        for a, b in spans
                    ]
                )
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
                    yield (
                        (x[i : i + batch_size], lab[i : i + batch_size])
                        if with_labels
                        else x[i : i + batch_size]
                    )
                pending_x = x[full:]
                if lab is not None:
                    pending_l = lab[full:]
        if len(pending_x) and not drop_remainder:
            yield (pending_x, pending_l) if with_labels else pending_x

    def shard_blocks(
        self,
        start: int = 0,
        stop: int | None = None,
        shard: tuple[int, int] | None = None,
        rng: np.random.Generator | None = None,
    ) -> list[tuple[int, int]]:
        """Row spans [(a, b), ...] of shard ``(index, count)`` of rows start:stop, in read order.

        The rows are cut on the file's chunk grid (multiples of ``chunk_rows``, plus start and
        stop); with ``rng`` the block order is permuted (one permutation, the same in every
        worker); shard i gets the i-th of ``count`` contiguous runs of that order
        (``numpy.array_split``), so the shards partition start:stop whatever the permutation.
        """
        start, stop = self._row_range(start, stop)
        grid = np.arange((start // self.chunk_rows + 1) * self.chunk_rows, stop, self.chunk_rows)
        return shard_spans(np.concatenate([[start], grid, [stop]]), shard, rng)

    def _row_range(self, start: int, stop: int | None) -> tuple[int, int]:
        return row_range(start, stop, self.n, self.path)

    def dataset(
        self,
        batch_size: int,
        shuffle_buffer: int = 0,
        seed: int = 0,
        with_labels: bool | None = None,
        drop_remainder: bool = False,
        shard: tuple[int, int] | None = None,
        start: int = 0,
        stop: int | None = None,
        first_epoch: int = 0,
    ) -> "tf.data.Dataset":
        """``tf.data.Dataset`` streaming :meth:`batches` from disk.

        Epoch k (the k-th iteration over the dataset, counted from ``first_epoch``) shuffles with
        the seed (seed, k); ``shard``, ``start``, ``stop`` as in :meth:`batches`. tf.data's own
        auto-sharding is switched off (the shard is already this worker's rows).
        """
        import tensorflow as tf

        self.shard_blocks(start, stop, shard)   # validates start, stop and shard now

        batch_size = validation.integer(batch_size, "batch_size")
        if shuffle_buffer < 0:
            raise InputError(f"shuffle_buffer must be >= 0 rows, got {shuffle_buffer}")
        with_labels = self._with_labels(with_labels)
        epochs = itertools.count(first_epoch)

        def generator():
            yield from self.batches(batch_size, shuffle_buffer, seed, with_labels, drop_remainder,
                                    next(epochs), shard=shard, start=start, stop=stop)

        x_spec = tf.TensorSpec([batch_size if drop_remainder else None, 6], tf.float32)
        if with_labels:
            l_spec = tf.TensorSpec([x_spec.shape[0], self.label_dim], tf.float32)
            signature: Any = (x_spec, l_spec)
        else:
            signature = x_spec
        options = tf.data.Options()
        off = tf.data.experimental.AutoShardPolicy.OFF
        options.experimental_distribute.auto_shard_policy = off
        ds = tf.data.Dataset.from_generator(generator, output_signature=signature)
        return ds.with_options(options).prefetch(2)

    def _with_labels(self, with_labels: bool | None) -> bool:
        if with_labels is None:
            return self.labels_name is not None
        if with_labels and self.labels_name is None:
            raise InputError(f"{self.path}: with_labels=True but the file has no labels dataset")
        return bool(with_labels)


def open_hdf5(path: str | os.PathLike, units: Mapping[str, str] | None = None) -> HDF5Catalogue:
    """Open an HDF5 catalogue lazily: reads the header (N, units, labels, meta), no rows.

    Layouts: tfgalflow (``pos``, ``vel`` [, ``labels``] at the root) or Gadget
    (``PartType4/Coordinates``, ``PartType4/Velocities``). Units: the file's ``units`` attributes,
    Gadget's cgs unit attributes in ``Header``/``Parameters``/``Units`` (positions then scaled to
    kpc, velocities to km/s; comoving a and h factors are *not* applied), or ``units`` given here
    (which override Gadget's cgs attributes and must agree with tfgalflow units). FileError when
    the file is missing/corrupt or a dataset/units are missing.
    """
    import h5py

    from .gadget import GADGET_GROUP, GADGET_POS, GADGET_VEL, gadget_layout

    path = existing_file(path)
    with _open_h5(path, h5py) as f:
        if "pos" in f or "vel" in f:
            return _tfgalflow_layout(path, f, units)
        if GADGET_GROUP in f:
            return gadget_layout(path, f, units)
        raise FileError(f"{path}: no catalogue found: expected datasets 'pos' and 'vel' [N, 3] at "
                        f"the root, or '{GADGET_GROUP}/{GADGET_POS}' and "
                        f"'{GADGET_GROUP}/{GADGET_VEL}'; the file holds {sorted(f.keys())}")


def hdf5_dataset(path: str | os.PathLike, batch_size: int, shuffle_buffer: int = 0, seed: int = 0,
                 with_labels: bool | None = None, drop_remainder: bool = False,
                 units: Mapping[str, str] | None = None, shard: tuple[int, int] | None = None,
                 start: int = 0, stop: int | None = None) -> "tf.data.Dataset":
    """Stream an HDF5 catalogue as batches x [B, 6] float32 (or (x, labels)), never all at once.

    Same as ``open_hdf5(path, units).dataset(batch_size, shuffle_buffer, seed, with_labels,
    drop_remainder, shard, start, stop)``; each epoch yields every row of start:stop exactly
    once, in a permuted order when ``shuffle_buffer > 0``. ``shard=(i, m)``: worker i of m reads
    only its own blocks of the file; the m shards of an epoch partition start:stop (the same
    seed in every worker). Example: ``hdf5_dataset("big.h5", 1024, 2**18, seed=0,
    shard=(task_index, num_workers))``.
    """
    return open_hdf5(path, units=units).dataset(
        batch_size,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        with_labels=with_labels,
        drop_remainder=drop_remainder,
        shard=shard,
        start=start,
        stop=stop,
    )



# ---- writing and reading ------------------------------------------------------------------------

def write_hdf5(tmp: Path, cat: Catalogue) -> None:
    """Write ``cat`` to ``tmp`` in the tfgalflow HDF5 layout (chunked pos, vel [, labels])."""
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
        if cat.errors is not None:
            errors = f.create_dataset("errors", data=cat.errors,
                                      chunks=(rows,) + cat.errors.shape[1:])
            errors.attrs["error_kind"] = cat.error_kind


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


def attribute(obj, name: str, default: Any = None) -> Any:
    """HDF5 attribute ``name`` of ``obj`` as a plain value (bytes decoded, 0-d unwrapped)."""
    value = obj.attrs.get(name, default)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.shape == ():
        return value.item()
    return value


def dataset_2d(path: Path, f, name: str, width: int | None) -> Any:
    """The h5py dataset ``name`` of ``f``, checked to be [N, width] ([N, C] when width is None)."""
    import h5py

    if name not in f or not isinstance(f[name], h5py.Dataset):
        raise FileError(f"{path}: missing dataset {name!r} (expected [N, {width or 'C'}]); the "
                        f"file holds {_listing(f)}")
    ds = f[name]
    if len(ds.shape) != 2 or (width is not None and ds.shape[1] != width):
        raise FileError(f"{path}: dataset {name!r} has shape {list(ds.shape)}; expected [N, "
                        f"{width or 'C'}]")
    return ds


def _listing(f) -> list[str]:
    names: list[str] = []
    f.visit(names.append)
    return names[:20]


def block_rows(ds) -> int:
    """Rows read per block: a whole number of chunks, at least 16384 rows."""
    chunk = ds.chunks[0] if ds.chunks else CHUNK_ROWS
    return max(1, math.ceil(16384 / chunk)) * chunk


def _tfgalflow_layout(path: Path, f, units: Mapping[str, str] | None) -> HDF5Catalogue:
    pos, vel = dataset_2d(path, f, "pos", 3), dataset_2d(path, f, "vel", 3)
    if pos.shape[0] != vel.shape[0]:
        raise FileError(f"{path}: 'pos' has {pos.shape[0]} rows but 'vel' has {vel.shape[0]}")
    version = attribute(f, "format_version")
    if version is not None and int(version) > FORMAT_VERSION:
        raise FileError(f"{path}: catalogue format version {version} is newer than this tfgalflow "
                        f"reads ({FORMAT_VERSION})")
    raw_units = attribute(f, "units")
    if raw_units is not None:
        file_units = _json_attr(raw_units, path, "units")
    elif attribute(pos, "units") is not None and attribute(vel, "units") is not None:
        file_units = {"length": attribute(pos, "units"), "velocity": attribute(vel, "units")}
    else:
        file_units = None
    labels_name, names = None, ()
    if "labels" in f:
        lab = dataset_2d(path, f, "labels", None)
        if lab.shape[0] != pos.shape[0]:
            raise FileError(f"{path}: 'labels' has {lab.shape[0]} rows but 'pos' has "
                            f"{pos.shape[0]}")
        labels_name = "labels"
        raw_names = attribute(f, "label_names")
        names = (tuple(_json_attr(raw_names, path, "label_names")) if raw_names is not None
                 else tuple(f"label_{i}" for i in range(lab.shape[1])))
        if len(names) != lab.shape[1]:
            raise FileError(f"{path}: {len(names)} label names for {lab.shape[1]} label columns")
    raw_meta = attribute(f, "meta")
    meta = dict(_json_attr(raw_meta, path, "meta")) if raw_meta is not None else {}
    errors_name, error_kind = None, None
    if "errors" in f:
        err = f["errors"]
        if err.shape[0] != pos.shape[0] or err.shape[1:] not in ((6,), (6, 6)):
            raise FileError(f"{path}: dataset 'errors' has shape {list(err.shape)}; expected "
                            f"[{pos.shape[0]}, 6] or [{pos.shape[0]}, 6, 6]")
        errors_name, error_kind = "errors", attribute(err, "error_kind")
    return HDF5Catalogue(
        path=path,
        n=int(pos.shape[0]),
        units=resolve_units(path, file_units, units),
        label_names=names,
        meta=meta,
        layout="tfgalflow",
        pos_name="pos",
        vel_name="vel",
        labels_name=labels_name,
        chunk_rows=block_rows(pos),
        errors_name=errors_name,
        error_kind=error_kind,
    )


def row_range(start: Any, stop: Any, n: int, path: Any) -> tuple[int, int]:
    """(start, stop) of a file of n rows, checked to be 0 <= start <= stop <= n (stop None: n);
    InputError naming ``path`` otherwise.
    """
    stop = n if stop is None else stop
    start = validation.integer(start, "start", low=0)
    stop = validation.integer(stop, "stop", low=0)
    if not start <= stop <= n:
        raise InputError(f"{path}: rows start:stop = {start}:{stop}; expected "
                         f"0 <= start <= stop <= {n}")
    return start, stop


def shard_spans(edges: np.ndarray, shard: tuple[int, int] | None = None,
                rng: np.random.Generator | None = None) -> list[tuple[int, int]]:
    """Row spans [(a, b), ...] of shard ``(index, count)`` of the rows edges[0]:edges[-1], cut at
    the sorted ``edges`` (a file's chunk or row-group grid, plus start and stop), in read order.

    With ``rng`` the span order is permuted (one permutation: the same in every worker given the
    same seed); shard i gets the i-th of ``count`` contiguous runs of that order
    (``numpy.array_split``), so the shards partition the rows whatever the permutation. Used by
    HDF5 (:meth:`HDF5Catalogue.shard_blocks`) and Parquet catalogues alike.
    """
    index, count = check_shard(shard)
    edges = np.asarray(edges, np.int64)
    if len(edges) < 2 or edges[-1] <= edges[0]:
        spans = np.zeros((0, 2), np.int64)
    else:
        spans = np.stack([edges[:-1], edges[1:]], axis=1)
        spans = spans[spans[:, 1] > spans[:, 0]]
    if rng is not None:
        spans = spans[rng.permutation(len(spans))]
    mine = np.array_split(spans, count)[index] if count > 1 else spans
    return [(int(a), int(b)) for a, b in mine]


def check_shard(shard: tuple[int, int] | None) -> tuple[int, int]:
    """(index, count) of a shard, checked 0 <= index < count; None is (0, 1), the whole range."""
    if shard is None:
        return 0, 1
    try:
        index, count = shard
    except (TypeError, ValueError):
        raise InputError(f"shard = {shard!r}: expected (index, count), e.g. (0, 2)") from None
    count = validation.integer(count, "shard count")
    validation.integer(index, "shard index", low=0, high=count - 1)
    return int(index), count


def _json_attr(value: Any, path: Path, name: str) -> Any:
    try:
        return json.loads(value)
    except (TypeError, ValueError) as exc:
        raise FileError(f"{path}: attribute {name!r} is not valid JSON ({exc})") from None


def _check_block(a: np.ndarray, path: Path, what: str, spans: list[tuple[int, int]]) -> None:
    """InputError naming the file row when a streamed block holds NaN/inf."""
    finite = np.isfinite(a).all(axis=1)
    if not finite.all():
        i = int(np.nonzero(~finite)[0][0])
        offsets = np.cumsum([0] + [b - a_ for a_, b in spans])
        k = int(np.searchsorted(offsets, i, side="right") - 1)
        raise InputError(f"{path}: {what} has non-finite values (NaN or inf); first bad row "
                         f"{spans[k][0] + i - int(offsets[k])}")
