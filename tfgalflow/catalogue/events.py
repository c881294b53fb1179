"""Event tables: N-D events with labels, the form non-phase-space data take (ROOT trees, Parquet).

A :class:`~tfgalflow.catalogue.Catalogue` is 6-D phase space with units; an :class:`EventTable` is
any [N, D] events with [N, C] labels and column names, as a grid of simulations writes them. Both
readers (:func:`~tfgalflow.catalogue.read_root`, :func:`~tfgalflow.catalogue.read_parquet`) return
one, and ``train(table.events, config, run_dir, labels=table.labels,
label_names=table.label_names)`` fits it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np


@dataclass(frozen=True)
class EventTable:
    """Events read from files: ``events`` [N, D] float64, ``labels`` [N, C] float64 | None.

    ``event_names`` [D] and ``label_names`` [C] name the columns; ``sources`` lists the files read
    (in order) with their row counts; ``skipped`` maps each skipped file to the reason.
    """

    events: np.ndarray
    labels: np.ndarray | None
    event_names: tuple[str, ...]
    label_names: tuple[str, ...]
    sources: tuple[tuple[str, int], ...] = ()
    skipped: Mapping[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.events.shape[0])

    @property
    def n_skipped(self) -> int:
        """How many files were skipped (not readable as the format, or without the table)."""
        return len(self.skipped)
