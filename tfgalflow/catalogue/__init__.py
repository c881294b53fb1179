"""Star catalogues: positions, velocities, labels, explicit units; files and tf.data pipelines.

:mod:`.core` holds the :class:`Catalogue` type (validation, units, views, in-memory ``tf.data``);
the readers and writers are one module per format, chosen by extension (files are written
atomically through :mod:`tfgalflow.atomic`):

``.npz``        :mod:`.npz` - arrays ``pos``, ``vel`` [, ``labels``, ``label_names``] as in the
                reference datasets of An, Naik, Evans & Burrage (2021) (only ``pos``/``vel``, in
                m and m/s), plus JSON ``units`` and ``meta``. A file without ``units`` loads only
                when the caller states them: ``Catalogue.load("hq_iso_orig.npz",
                units={"length": "m", "velocity": "m/s"})``.
``.h5/.hdf5``   :mod:`.hdf5` - chunked datasets ``pos``, ``vel`` [, ``labels``] with units, label
                names and meta as JSON attributes; read lazily (:func:`open_hdf5`) or streamed
                (:func:`hdf5_dataset`), never whole. :mod:`.gadget` reads Gadget-style snapshots
                (``PartType4/Coordinates``, ``PartType4/Velocities``; units from the datasets, the
                header's ``UnitLength_in_cm`` / ``UnitVelocity_in_cm_per_s``, or the caller).
``.root``       :mod:`.root` - chosen branches of TTrees (a file or a directory tree) into an
                :class:`EventTable` of N-D events + labels (optional ``uproot``: tfgalflow[root]).
``.parquet``    :mod:`.parquet` - event tables (named event columns + dictionary-encoded label
                columns, e.g. a population-synthesis grid): :func:`read_parquet`,
                :func:`write_parquet`, streamed with a cross-label shuffle (and sharded,
                ``shard=(i, m)``) by :func:`parquet_dataset` / :func:`open_parquet` (needs
                the ``parquet`` extra, pyarrow).

Example::

    >>> cat = Catalogue(pos, vel, units={"length": "kpc", "velocity": "km/s"})
    >>> cat.save("mock.h5"); Catalogue.load("mock.h5").phase_space.shape
    (N, 6)
    >>> ds = hdf5_dataset("mock.h5", batch_size=1024, shuffle_buffer=100_000, seed=0)  # [B, 6] f32
"""
from __future__ import annotations

from .core import (
    ERROR_KINDS, FORMAT, FORMAT_VERSION, HDF5_SUFFIXES, NPZ_SUFFIXES, Catalogue, check_units,
)
from .gadget import GADGET_GROUP, GADGET_POS, GADGET_VEL
from .hdf5 import CHUNK_ROWS, HDF5Catalogue, hdf5_dataset, open_hdf5
from .events import EventTable
from .parquet import (
    PARQUET_SUFFIXES, ParquetCatalogue, iter_parquet_batches, open_parquet, parquet_dataset,
    read_parquet, write_parquet,
)
from .root import read_root

__all__ = [
    "Catalogue",
    "HDF5Catalogue",
    "open_hdf5",
    "hdf5_dataset",
    "check_units",
    "FORMAT",
    "FORMAT_VERSION",
    "HDF5_SUFFIXES",
    "NPZ_SUFFIXES",
    "GADGET_GROUP",
    "GADGET_POS",
    "GADGET_VEL",
    "CHUNK_ROWS",
    "ERROR_KINDS",
    "EventTable",
    "read_root",
    "PARQUET_SUFFIXES",
    "ParquetCatalogue",
    "open_parquet",
    "read_parquet",
    "write_parquet",
    "iter_parquet_batches",
    "parquet_dataset",
]
