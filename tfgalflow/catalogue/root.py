"""ROOT input (FEDHEX's data) through ``uproot``: chosen branches of TTrees -> events and labels.

Events here are N-D (e.g. reconstructed masses), not phase space, so the reader returns an
:class:`EventTable` (events [N, D], labels [N, C] | None, their names, the files read and the files
skipped), whose arrays go straight to :func:`tfgalflow.training.train`::

    >>> table = read_root("grid/", tree="Events", branches=["phi_mass", "omega_mass"],
    ...                   label_branches=["gen_phi", "gen_omega"])
    >>> train(table.events, TrainConfig(), "run", labels=table.labels,
    label_names=table.label_names)

A directory is searched recursively (files in sorted order). Files that are not ROOT files, or
ROOT files without the tree, are skipped and listed in ``EventTable.skipped`` (FEDHEX's loader died
on the first such file); a tree without a requested branch, an empty tree, or labels of the wrong
width are errors, each one line naming the file.

Labels come either per event from ``label_branches``, or per file from ``file_labels`` (a mapping
from file name or path to the label [C], or a function of the path): FEDHEX's grid stores one
generated-mass point per file.

Needs the optional dependency ``uproot`` (``pip install tfgalflow[root]``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .events import EventTable
from ..errors import FileError, InputError

INSTALL_HINT = (
    "reading ROOT files needs uproot: pip install 'tfgalflow[root]' (or pip install 'uproot>=5')"
)


def _uproot() -> Any:
    try:
        import uproot
    except ImportError:
        raise InputError(INSTALL_HINT) from None
    return uproot


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    raise FileError(
        f"{path}: no such file or directory (expected a ROOT file or a directory of them)"
    )


def _columns(tree: Any, names: Sequence[str], where: str, what: str) -> np.ndarray:
    """The branches ``names`` of ``tree`` as float64 columns [N, len(names)]; InputError if
    absent.
    """
    available = list(tree.keys())
    missing = [n for n in names if n not in available]
    if missing:
        raise InputError(
            f"{where} has no {what} branch {missing[0]!r}; its branches are {available}"
        )
    arrays = tree.arrays(list(names), library="np")
    columns = []
    for n in names:
        try:
            column = np.asarray(arrays[n], dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(
                f"{where}: branch {n!r} is not a flat numeric branch (one number per entry)"
            ) from None
        if column.ndim != 1:
            raise InputError(
                f"{where}: branch {n!r} has shape {column.shape}; expected one number per entry"
            )
        columns.append(column)
    return np.stack(columns, axis=1)


def _file_label(
    file_labels: Mapping[str, Any] | Callable[[Path], Any], path: Path, root: Path, where: str
) -> np.ndarray | None:
    """The label [C] of one file from a mapping (by path relative to root, name or full path) or a
    function of the path; None if the mapping has no entry for it.
    """
    if callable(file_labels):
        value = file_labels(path)
    else:
        keys = (str(path.relative_to(root)) if path != root else path.name, path.name, str(path))
        value = next((file_labels[k] for k in keys if k in file_labels), None)
        if value is None:
            return None
    try:
        label = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise InputError(f"{where}: file label {value!r} is not a list of numbers") from None
    return label


def read_root(
    path: str | os.PathLike,
    tree: str,
    branches: Sequence[str],
    label_branches: Sequence[str] = (),
    file_labels: Mapping[str, Any] | Callable[[Path], Any] | None = None,
    label_dim: int | None = None,
    label_names: Sequence[str] | None = None,
) -> EventTable:
    """Read ``branches`` (and labels) of the TTree ``tree`` from a ROOT file or a directory tree.

    Args:
        path: a ROOT file, or a directory searched recursively (non-ROOT files and ROOT files
            without ``tree`` are skipped and reported in ``EventTable.skipped``).
        tree: the TTree's name (a path inside the file, e.g. "Events" or "dir/Events").
        branches: the D event branches (one number per entry each) -> events [N, D].
        label_branches: per-event label branches -> labels [N, C] (not with ``file_labels``).
        file_labels: one label [C] per file: a mapping from the file's path relative to ``path``
            (or its name, or its full path) to the label, or a function of the file's Path; every
            file read must get one.
        label_dim: the expected C (checked), or None to take it from the first file.
        label_names: names of the C label columns (default: the label branches, or label_0, ...).

    Returns:
        EventTable(events [N, D], labels [N, C] | None, names, sources, skipped).

    Raises:
        InputError (one line naming the file) for: uproot missing, no branches, a missing branch,
        an empty tree, labels of the wrong width, no file with the tree; FileError for a missing
        path.
    """
    uproot = _uproot()
    branches, label_branches = list(branches), list(label_branches)
    if not branches or not all(isinstance(b, str) for b in branches):
        raise InputError(f"branches = {branches!r}: expected a non-empty list of branch names")
    if label_branches and file_labels is not None:
        raise InputError(
            "give labels either per event (label_branches) or per file (file_labels), not both"
        )
    if label_dim is not None and not (label_branches or file_labels is not None):
        raise InputError(
            f"label_dim = {label_dim} but no labels were asked for; give label_branches or "
            f"file_labels"
        )
    root = Path(path)
    files = _files(root)
    events, labels, sources, skipped = [], [], [], {}
    width = label_dim
    for file in files:
        try:
            handle = uproot.open(file)
        except (
            Exception
        ) as exc:  # uproot raises ValueError/OSError/its own types for non-ROOT bytes
            skipped[str(file)] = f"not a ROOT file ({type(exc).__name__})"
            continue
        with handle:
            if tree not in handle:
                skipped[str(file)] = f"no tree {tree!r}"
                continue
            t = handle[tree]
            where = f"{file}:{tree}"
            if not hasattr(t, "arrays") or not hasattr(t, "num_entries"):
                skipped[str(file)] = f"{tree!r} is a {type(t).__name__}, not a tree"
                continue
            if t.num_entries == 0:
                raise InputError(f"{where} is empty (0 entries); remove the file or fill the tree")
            x = _columns(t, branches, where, "event")
            if label_branches:
                c = _columns(t, label_branches, where, "label")
            elif file_labels is not None:
                label = _file_label(file_labels, file, root, where)
                if label is None:
                    raise InputError(
                        f"{where}: file_labels has no label for this file (keys are paths "
                        f"relative to {root}, file names, or full paths)"
                    )
                c = np.tile(label, (len(x), 1))
            else:
                c = None
        if c is not None:
            if width is None:
                width = c.shape[1]
            if c.shape[1] != width:
                raise InputError(
                    f"{where}: label has width {c.shape[1]} but {width} was expected "
                    f"(labels [N, {width}])"
                )
        events.append(x)
        labels.append(c)
        sources.append((str(file), len(x)))
    if not events:
        raise InputError(
            f"{root}: no file has a tree {tree!r} ({len(skipped)} file(s) skipped: "
            f"{sorted(set(skipped.values()))[:3]})"
        )
    c = None if labels[0] is None else np.concatenate(labels)
    names = label_names
    if c is not None and names is None:
        names = label_branches or [f"label_{j}" for j in range(c.shape[1])]
    names = tuple(names or ())
    if c is not None and len(names) != c.shape[1]:
        raise InputError(
            f"label_names has {len(names)} entries but the labels have {c.shape[1]} columns"
        )
    return EventTable(np.concatenate(events), c, tuple(branches), names, tuple(sources), skipped)


__all__ = ["EventTable", "read_root", "INSTALL_HINT"]
