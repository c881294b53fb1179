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

Needs ``pyarrow`` (the ``parquet`` extra: ``pip install 'tfgalflow[parquet]'``).

Example::

    >>> write_parquet("grid.parquet", events, labels, ("m0", "m1"), ("Z", "alpha"))
    >>> table = read_parquet("grid.parquet", ("m0", "m1"), ("Z", "alpha"))
    >>> table.events.shape, table.labels.shape                     # [N, 2], [N, 2] float64
    >>> ds = parquet_dataset("grid.parquet", ("m0", "m1"), ("Z", "alpha"), batch_size=1024,
    ...                      buffer_rows=200_000, seed=0)           # (x [B, 2], labels [B, 2]) f32
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from .. import validation
from ..atomic import atomic_file
from .events import EventTable
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


def read_parquet(
    path: str | os.PathLike, event_columns: Any, label_columns: Any = ()
) -> EventTable:
    """Read event columns [N, D] and label columns [N, C] (float64) of a Parquet file into memory.

    Label columns are read as dictionaries (``read_dictionary``) and decoded by gathering, whether
    or not the file stored them dictionary-encoded. Raises FileError for a missing/corrupt file,
    InputError for missing columns (listing the file's columns), nulls, non-numeric values or
    NaN/inf.
    """
    pq = require_pyarrow()
    path = Path(path)
    events = _names(event_columns, "event_columns")
    labels = _names(label_columns, "label_columns", allow_empty=True)
    overlap = sorted(set(events) & set(labels))
    if overlap:
        raise InputError(f"column(s) {overlap} are both event and label columns")
    pf = _open(path, pq, read_dictionary=labels)
    _check_columns(path, pf, events + labels)
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


def iter_parquet_batches(
    path: str | os.PathLike,
    event_columns: Any,
    label_columns: Any = (),
    batch_size: int = 1024,
    buffer_rows: int = 262_144,
    seed: int = 0,
    epoch: int = 0,
    drop_remainder: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """One epoch of shuffled batches (x [B, D], labels [B, C] | None) float32 from a Parquet file.

    Two-level shuffle (module docstring): row groups in the order of a permutation seeded by
    (seed, epoch); rows gathered until the buffer holds >= ``buffer_rows`` rows, permuted, cut into
    batches; the < batch_size rows left over stay in the buffer for the next round. Every row
    appears exactly once per epoch (the last short batch is dropped with ``drop_remainder``).
    Memory: about ``buffer_rows`` + one row group.
    """
    pq = require_pyarrow()
    path = Path(path)
    events = _names(event_columns, "event_columns")
    labels = _names(label_columns, "label_columns", allow_empty=True)
    batch = validation.integer(batch_size, "batch_size")
    buffer_rows = validation.integer(buffer_rows, "buffer_rows")
    pf = _open(path, pq, read_dictionary=labels)
    _check_columns(path, pf, events + labels)
    rng = np.random.default_rng([validation.seed(seed), validation.integer(epoch, "epoch", low=0)])
    width = len(events)
    held: list[np.ndarray] = []
    held_rows = 0

    def emit(final: bool):
        nonlocal held, held_rows
        block = np.concatenate(held)[rng.permutation(held_rows)]
        stop = held_rows if final else held_rows - held_rows % batch
        for i in range(0, stop, batch):
            rows = block[i : i + batch]
            if len(rows) < batch and drop_remainder:
                break
            x = rows[:, :width].astype(np.float32)
            yield (x, rows[:, width:].astype(np.float32) if labels else None)
        held = [block[stop:]]
        held_rows = held_rows - stop

    for g in rng.permutation(pf.num_row_groups):
        table = pf.read_row_group(int(g), columns=list(events + labels))
        x = _matrix(table, events, path, "event columns")
        c = _matrix(table, labels, path, "label columns") if labels else x[:, :0]
        held.append(np.concatenate([x, c], axis=1))
        held_rows += table.num_rows
        if held_rows >= buffer_rows:
            yield from emit(final=False)
    if held_rows:
        yield from emit(final=True)


def parquet_dataset(
    path: str | os.PathLike,
    event_columns: Any,
    label_columns: Any = (),
    batch_size: int = 1024,
    buffer_rows: int = 262_144,
    seed: int = 0,
    drop_remainder: bool = False,
) -> "tf.data.Dataset":
    """A ``tf.data.Dataset`` of (x [B, D], labels [B, C]) float32 (x alone without label columns).

    Each iteration over the dataset (each Keras epoch) is one :func:`iter_parquet_batches` pass
    with
    the next epoch number, hence a fresh row-group order and permutation.
    """
    import tensorflow as tf

    events = _names(event_columns, "event_columns")
    labels = _names(label_columns, "label_columns", allow_empty=True)
    epochs = itertools.count()

    def generator():
        for x, c in iter_parquet_batches(
            path, events, labels, batch_size, buffer_rows, seed, next(epochs), drop_remainder
        ):
            yield (x, c) if labels else x

    rows = batch_size if drop_remainder else None
    x_spec = tf.TensorSpec([rows, len(events)], tf.float32)
    spec = (x_spec, tf.TensorSpec([rows, len(labels)], tf.float32)) if labels else x_spec
    return tf.data.Dataset.from_generator(generator, output_signature=spec)


__all__ = [
    "EventTable",
    "PARQUET_SUFFIXES",
    "ROW_GROUP_ROWS",
    "read_parquet",
    "write_parquet",
    "iter_parquet_batches",
    "parquet_dataset",
    "require_pyarrow",
]
