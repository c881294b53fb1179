"""Parquet event tables: event + label columns, read whole or streamed with a cross-label shuffle.

A population-synthesis grid (e.g. SEVN-NF, REFERENCES.md 002) comes as one Parquet table with an
event column per data dimension (``m0``, ``m1``) and a label column per hyperparameter (``Z``,
``alpha``). Label columns take a handful of distinct values, so they are stored dictionary-encoded
(an index per row into a small dictionary of values; Parquet's RLE_DICTIONARY encoding) and read as
such: a column that arrives as an Arrow dictionary (e.g. category labels written by pandas, numeric
or text like "1e-4") is decoded by converting its few dictionary values once and gathering them by
index, never parsed row by row; pyarrow decodes numeric dictionary pages itself.

Such files are usually sorted by label. :func:`iter_parquet_batches` / :func:`parquet_dataset`
stream a file larger than memory with a two-level shuffle, so that every batch mixes many label
values: (1) the row groups are visited in a random order (fresh per epoch), (2) rows are gathered
into a buffer of at least ``buffer_rows`` rows spanning several row groups and permuted before
being cut into batches. Each epoch yields every row exactly once; memory is bounded by
``buffer_rows`` plus one row group. (A plain row-level shuffle buffer smaller than a label block
would keep each batch inside one or two grid nodes -- the reference pipeline's problem.)

Sharding, as for HDF5 (:func:`tfgalflow.catalogue.hdf5_dataset`): ``shard=(i, m)`` makes worker i
of m read only the i-th of m runs of the epoch's row-group order (the same seeded permutation in
every worker), so the m shards of an epoch partition the rows, each still mixing label values;
``start``/``stop`` restrict to a row range (cut inside row groups where needed).
:func:`open_parquet` gives the lazy :class:`ParquetCatalogue` that training streams
(:mod:`tfgalflow.training.data`).

Needs ``pyarrow`` (the ``parquet`` extra: ``pip install 'tfgalflow[parquet]'``).

Example::

    >>> write_parquet("grid.parquet", events, labels, ("m0", "m1"), ("Z", "alpha"))
    >>> table = read_parquet("grid.parquet", ("m0", "m1"), ("Z", "alpha"))
    >>> table.events.shape, table.labels.shape                     # [N, 2], [N, 2] float64
    >>> ds = parquet_dataset("grid.parquet", ("m0", "m1"), ("Z", "alpha"), batch_size=1024,
    ...                      buffer_rows=200_000, seed=0)           # (x [B, 2], labels [B, 2]) f32
    >>> ds = parquet_dataset("grid.parquet", "m0,m1", "Z,alpha", 1024, shard=(i, m))  # worker i
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from .. import validation
from ..atomic import atomic_file
from .events import EventTable
from .hdf5 import row_range, shard_spans
from ..errors import FileError, InputError

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf

PARQUET_SUFFIXES = (".parquet", ".pq")
#: Rows per row group written by :func:`write_parquet`.
ROW_GROUP_ROWS = 65536


def require_pyarrow():
    """``pyarrow.parquet``, or InputError naming the ``parquet`` extra when pyarrow is missing."""
    try:
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise InputError(
            "reading or writing Parquet needs pyarrow: install the 'parquet' extra, "
            "pip install 'tfgalflow[parquet]' (pyarrow>=14)"
        ) from None
    return pq


def _names(columns: Any, what: str, allow_empty: bool = False) -> tuple[str, ...]:
    """A tuple of distinct column names from a sequence or a comma-separated string."""
    if isinstance(columns, str):
        columns = [c.strip() for c in columns.split(",") if c.strip()]
    names = tuple(str(c) for c in (columns or ()))
    if (not names and not allow_empty) or len(set(names)) != len(names):
        raise InputError(f"{what} = {list(names)}: expected distinct column names, e.g. m0,m1")
    return names


def _open(path: Path, pq, read_dictionary: Sequence[str] = ()):
    if not path.exists():
        raise FileError(f"{path}: no such Parquet file")
    try:
        return pq.ParquetFile(path, read_dictionary=list(read_dictionary) or None)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for corrupt files
        raise FileError(f"{path}: not a readable Parquet file ({exc})") from None


def _check_columns(path: Path, pf, wanted: Sequence[str]) -> None:
    have = pf.schema_arrow.names
    missing = [c for c in wanted if c not in have]
    if missing:
        raise InputError(f"{path}: no column(s) {missing}; the file has columns {have}")


def _column_values(column: Any, path: Path, name: str) -> np.ndarray:
    """float64 values of an Arrow (chunked) column; dictionary-encoded columns by gathering."""
    import pyarrow as pa

    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = []
    for chunk in chunks:
        if chunk.null_count:
            raise InputError(
                f"{path}: column {name!r} has {chunk.null_count} missing (null) value(s)"
            )
        if pa.types.is_dictionary(chunk.type):
            try:
                values = np.asarray(chunk.dictionary.to_pylist(), dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise InputError(
                    f"{path}: dictionary column {name!r} has non-numeric values ({exc})"
                ) from None
            parts.append(values[chunk.indices.to_numpy(zero_copy_only=False)])
        else:
            try:
                parts.append(chunk.to_numpy(zero_copy_only=False).astype(np.float64))
            except (TypeError, ValueError) as exc:
                raise InputError(
                    f"{path}: column {name!r} of type {chunk.type} is not numeric ({exc})"
                ) from None
    return np.concatenate(parts) if parts else np.zeros(0)


def _matrix(table: Any, names: Sequence[str], path: Path, what: str) -> np.ndarray:
    cols = [_column_values(table.column(n), path, n) for n in names]
    m = np.stack(cols, axis=1) if cols else np.zeros((table.num_rows, 0))
    validation.check_finite_rows(m, f"{what} {list(names)} in {path}")
    return m


def _open_columns(path: Path, event_columns: Any, label_columns: Any
                  ) -> tuple[Any, tuple, tuple]:
    """(ParquetFile, event names, label names) of ``path`` with the columns checked: present,
    distinct, no column both event and label (labels read as dictionaries).
    """
    pq = require_pyarrow()
    events = _names(event_columns, "event_columns")
    labels = _names(label_columns, "label_columns", allow_empty=True)
    overlap = sorted(set(events) & set(labels))
    if overlap:
        raise InputError(f"column(s) {overlap} are both event and label columns")
    pf = _open(path, pq, read_dictionary=labels)
    _check_columns(path, pf, events + labels)
    return pf, events, labels


def read_parquet(
    path: str | os.PathLike, event_columns: Any, label_columns: Any = ()
) -> EventTable:
    """Read event columns [N, D] and label columns [N, C] (float64) of a Parquet file into memory.

    Label columns are read as dictionaries (``read_dictionary``) and decoded by gathering, whether
    or not the file stored them dictionary-encoded. Raises FileError for a missing/corrupt file,
    InputError for missing columns (listing the file's columns), nulls, non-numeric values or
    NaN/inf.
    """
    path = Path(path)
    pf, events, labels = _open_columns(path, event_columns, label_columns)
    table = pf.read(columns=list(events + labels))
    if table.num_rows == 0:
        raise InputError(f"{path}: the table has no rows")
    x = _matrix(table, events, path, "event columns")
    c = _matrix(table, labels, path, "label columns") if labels else None
    return EventTable(x, c, events, labels)


def write_parquet(
    path: str | os.PathLike,
    events: Any,
    labels: Any = None,
    event_names: Sequence[str] = (),
    label_names: Sequence[str] = (),
    row_group_size: int = ROW_GROUP_ROWS,
) -> Path:
    """Write events [N, D] (float64) and labels [N, C] as a Parquet table, atomically.

    Label columns are dictionary-encoded (an int32 index per row into the sorted distinct values,
    stored with Parquet's RLE_DICTIONARY encoding), so a grid of a few nodes costs a few bits per
    row. Rows are written in the given order (sort by label beforehand to reproduce a grid's
    file). Returns the path.
    """
    pq = require_pyarrow()
    import pyarrow as pa

    x = validation.finite_matrix(events, "events")
    n, d = x.shape
    event_names = _names(event_names or [f"x{j}" for j in range(d)], "event_names")
    if len(event_names) != d:
        raise InputError(
            f"event_names has {len(event_names)} entries but events have {d} column(s)"
        )
    columns = {name: pa.array(x[:, j]) for j, name in enumerate(event_names)}
    if labels is not None:
        c = np.asarray(labels, dtype=np.float64)
        c = validation.finite_matrix(
            c[:, None] if c.ndim == 1 else c, "labels", expected=f"[{n}, C]"
        )
        if c.shape[0] != n:
            raise InputError(
                f"labels have {c.shape[0]} rows but events have {n}; expected [{n}, C]"
            )
        label_names = _names(
            label_names or [f"label_{k}" for k in range(c.shape[1])], "label_names"
        )
        if len(label_names) != c.shape[1] or set(label_names) & set(event_names):
            raise InputError(
                f"label_names {list(label_names)}: expected {c.shape[1]} names distinct "
                f"from the event names {list(event_names)}"
            )
        for k, name in enumerate(label_names):
            values, index = np.unique(c[:, k], return_inverse=True)
            columns[name] = pa.DictionaryArray.from_arrays(
                pa.array(index.astype(np.int32)), pa.array(values)
            )
    table = pa.table(columns)
    path = Path(path)
    rows = validation.integer(row_group_size, "row_group_size")
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp, row_group_size=rows)
    return path


@dataclass(frozen=True)
class ParquetCatalogue:
    """Lazy view of a Parquet event table: its header (rows, row groups) now, rows only when
    asked for.

    Attributes: ``path``, ``n`` (= ``len``), ``event_columns`` (D names), ``label_columns``
    (C names, maybe none), ``group_offsets`` (first row of every row group, then N).
    Opened by :func:`open_parquet`; streamed by :meth:`batches` / :meth:`dataset`.
    """

    path: Path
    n: int
    event_columns: tuple[str, ...]
    label_columns: tuple[str, ...]
    group_offsets: tuple[int, ...]

    def __len__(self) -> int:
        return self.n

    @property
    def dim(self) -> int:
        """D, the number of event columns."""
        return len(self.event_columns)

    @property
    def label_dim(self) -> int:
        """C, the number of label columns (0 without labels)."""
        return len(self.label_columns)

    def _file(self):
        return _open(self.path, require_pyarrow(), read_dictionary=self.label_columns)

    def _rows(self, pf: Any, a: int, b: int) -> np.ndarray:
        """File rows a:b (inside one row group) as [b - a, D + C] float64, events then labels."""
        g = int(np.searchsorted(self.group_offsets, a, side="right")) - 1
        table = pf.read_row_group(g, columns=list(self.event_columns + self.label_columns))
        table = table.slice(a - self.group_offsets[g], b - a)
        x = _matrix(table, self.event_columns, self.path, "event columns")
        if not self.label_columns:
            return x
        return np.concatenate([x, _matrix(table, self.label_columns, self.path,
                                          "label columns")], axis=1)

    def _row_range(self, start: int, stop: int | None) -> tuple[int, int]:
        return row_range(start, stop, self.n, self.path)

    def spans(self, start: int = 0, stop: int | None = None,
              shard: tuple[int, int] | None = None,
              rng: np.random.Generator | None = None) -> list[tuple[int, int]]:
        """Row spans [(a, b), ...] of shard ``(index, count)`` of rows start:stop, in read order:
        the rows cut on the row-group grid, the spans permuted by ``rng`` (the same permutation
        in every worker) and split into ``count`` contiguous runs
        (:func:`tfgalflow.catalogue.hdf5.shard_spans`, as for HDF5 chunks).
        """
        start, stop = self._row_range(start, stop)
        grid = [o for o in self.group_offsets if start < o < stop]
        return shard_spans(np.array([start, *grid, stop]), shard, rng)

    def read(self, start: int = 0, stop: int | None = None, step: int = 1) -> EventTable:
        """Rows start:stop:step into memory (events [M, D], labels [M, C] float64), one row group
        at a time (memory: the rows returned plus one row group).
        """
        start, stop = self._row_range(start, stop)
        step = validation.integer(step, "step")
        pf = self._file()
        parts = []
        for a, b in self.spans(start, stop):
            first = a + (start - a) % step          # first row of a:b on the grid start + k·step
            if first < b:
                rows = self._rows(pf, a, b)
                parts.append(rows[first - a::step])
        block = (np.concatenate(parts) if parts
                 else np.zeros((0, self.dim + self.label_dim)))
        c = block[:, self.dim:] if self.label_columns else None
        return EventTable(block[:, :self.dim], c, self.event_columns, self.label_columns)

    def batches(
        self,
        batch_size: int,
        buffer_rows: int = 262_144,
        seed: int = 0,
        epoch: int = 0,
        drop_remainder: bool = False,
        shard: tuple[int, int] | None = None,
        start: int = 0,
        stop: int | None = None,
        keep: Callable[[int, int], np.ndarray] | None = None,
    ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """One epoch of shuffled batches (x [B, D], labels [B, C] | None) float32.

        Rows start:stop are cut on the row-group grid into spans (:meth:`spans`); with
        ``buffer_rows > 0`` the span order is a permutation seeded by (seed, epoch) and rows are
        gathered until the buffer holds >= ``buffer_rows`` rows, permuted, cut into batches (the
        < batch_size rows left over stay for the next round); ``buffer_rows = 0`` reads the rows in
        file order. ``shard = (i, m)``: only the i-th of m contiguous runs of the (permuted) span
        order is read, so the m shards of one epoch partition the rows and a worker reads only its
        own row groups. ``keep(a, b)`` -> bool [b - a]: only those rows of each span a:b are used
        (e.g. the training rows of a split). Every (kept) row of the shard appears exactly once
        per epoch (the last short batch is dropped with ``drop_remainder``). Memory: about
        ``buffer_rows`` + one row group.
        """
        batch = validation.integer(batch_size, "batch_size")
        buffer_rows = validation.integer(buffer_rows, "buffer_rows", low=0)
        seed = validation.seed(seed)
        epoch = validation.integer(epoch, "epoch", low=0)
        rng = np.random.default_rng([seed, epoch]) if buffer_rows > 0 else None
        spans = self.spans(start, stop, shard, rng)
        pf = self._file()
        width = self.dim
        held: list[np.ndarray] = []
        held_rows = 0

        def emit(final: bool):
            nonlocal held, held_rows
            block = np.concatenate(held)
            if rng is not None:
                block = block[rng.permutation(held_rows)]
            stop = held_rows if final else held_rows - held_rows % batch
            for i in range(0, stop, batch):
                rows = block[i : i + batch]
                if len(rows) < batch and drop_remainder:
                    break
                x = rows[:, :width].astype(np.float32)
                yield (x, rows[:, width:].astype(np.float32) if self.label_columns else None)
            held = [block[stop:]]
            held_rows = held_rows - stop

        for a, b in spans:
            rows = self._rows(pf, a, b)
            if keep is not None:
                rows = rows[keep(a, b)]
            held.append(rows)
            held_rows += len(rows)
            if held_rows >= max(buffer_rows, batch):
                yield from emit(final=False)
        if held_rows:
            yield from emit(final=True)

    def dataset(
        self,
        batch_size: int,
        buffer_rows: int = 262_144,
        seed: int = 0,
        drop_remainder: bool = False,
        shard: tuple[int, int] | None = None,
        start: int = 0,
        stop: int | None = None,
        first_epoch: int = 0,
    ) -> "tf.data.Dataset":
        """``tf.data.Dataset`` of :meth:`batches`: (x [B, D], labels [B, C]) float32 (x alone
        without label columns).

        Epoch k (the k-th iteration over the dataset, counted from ``first_epoch``) shuffles with
        the seed (seed, k); ``shard``, ``start``, ``stop`` as in :meth:`batches`. tf.data's own
        auto-sharding is switched off (the shard is already this worker's rows).
        """
        import tensorflow as tf

        self.spans(start, stop, shard)            # validates start, stop and shard now
        validation.integer(batch_size, "batch_size")
        epochs = itertools.count(first_epoch)

        def generator():
            for x, c in self.batches(batch_size, buffer_rows, seed, next(epochs),
                                     drop_remainder, shard, start, stop):
                yield (x, c) if self.label_columns else x

        rows = batch_size if drop_remainder else None
        x_spec = tf.TensorSpec([rows, self.dim], tf.float32)
        spec = ((x_spec, tf.TensorSpec([rows, self.label_dim], tf.float32))
                if self.label_columns else x_spec)
        options = tf.data.Options()
        off = tf.data.experimental.AutoShardPolicy.OFF
        options.experimental_distribute.auto_shard_policy = off
        return tf.data.Dataset.from_generator(generator, output_signature=spec).with_options(
            options)


def open_parquet(path: str | os.PathLike, event_columns: Any,
                 label_columns: Any = ()) -> ParquetCatalogue:
    """Open a Parquet event table lazily: checks the columns and reads the row-group sizes, no
    rows.

    Raises FileError for a missing/corrupt file, InputError for missing or repeated columns.
    """
    path = Path(path)
    pf, events, labels = _open_columns(path, event_columns, label_columns)
    sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
    offsets = tuple(int(o) for o in np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]))
    if offsets[-1] == 0:
        raise InputError(f"{path}: the table has no rows")
    return ParquetCatalogue(path.resolve(), offsets[-1], events, labels, offsets)


def iter_parquet_batches(
    path: str | os.PathLike,
    event_columns: Any,
    label_columns: Any = (),
    batch_size: int = 1024,
    buffer_rows: int = 262_144,
    seed: int = 0,
    epoch: int = 0,
    drop_remainder: bool = False,
    shard: tuple[int, int] | None = None,
    start: int = 0,
    stop: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """One epoch of shuffled batches (x [B, D], labels [B, C] | None) float32 from a Parquet file.

    Two-level shuffle (module docstring): row groups in the order of a permutation seeded by
    (seed, epoch); rows gathered until the buffer holds >= ``buffer_rows`` rows, permuted, cut into
    batches; the < batch_size rows left over stay in the buffer for the next round. Every row of
    start:stop appears exactly once per epoch (the last short batch is dropped with
    ``drop_remainder``). ``shard = (i, m)``: worker i of m reads only its own row groups; the m
    shards of an epoch partition start:stop (the same seed in every worker). Memory: about
    ``buffer_rows`` + one row group. Same as ``open_parquet(path, event_columns,
    label_columns).batches(...)``.
    """
    return open_parquet(path, event_columns, label_columns).batches(
        batch_size, buffer_rows, seed, epoch, drop_remainder, shard, start, stop)


def parquet_dataset(
    path: str | os.PathLike,
    event_columns: Any,
    label_columns: Any = (),
    batch_size: int = 1024,
    buffer_rows: int = 262_144,
    seed: int = 0,
    drop_remainder: bool = False,
    shard: tuple[int, int] | None = None,
    start: int = 0,
    stop: int | None = None,
) -> "tf.data.Dataset":
    """A ``tf.data.Dataset`` of (x [B, D], labels [B, C]) float32 (x alone without label columns).

    Each iteration over the dataset (each Keras epoch) is one :func:`iter_parquet_batches` pass
    with the next epoch number, hence a fresh row-group order and permutation; ``shard``,
    ``start``, ``stop`` as there. Example: ``parquet_dataset("grid.parquet", "m0,m1", "Z,alpha",
    1024, seed=0, shard=(task_index, num_workers))``.
    """
    return open_parquet(path, event_columns, label_columns).dataset(
        batch_size, buffer_rows, seed, drop_remainder, shard, start, stop)


__all__ = [
    "EventTable",
    "ParquetCatalogue",
    "open_parquet",
    "PARQUET_SUFFIXES",
    "ROW_GROUP_ROWS",
    "read_parquet",
    "write_parquet",
    "iter_parquet_batches",
    "parquet_dataset",
    "require_pyarrow",
]
