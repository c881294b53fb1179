"""Arrays of points on disk: read [N, D] points (and labels) from any supported file, write
results.

What the command line reads and writes, as library functions (the CLI only calls these):

* :func:`read_points` ``.npy``, ``.npz`` (one array, or a catalogue with ``pos``/``vel``),
  ``.txt``/``.dat`` (spaces), ``.csv`` (commas), catalogue ``.h5``/``.hdf5`` ->
  (array [N, D], labels | None);
* :func:`write_array` an array as ``.npy`` or text, atomically;
* :func:`write_samples` draws as a :class:`~tfgalflow.catalogue.Catalogue` (6-D, ``.npz``/``.h5``)
  or a plain array;
* :func:`check_output` the checks an output path must pass *before* any work is done (known suffix,
  existing directory), so a long computation never ends in "cannot write".
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .atomic import atomic_file
from .errors import FileError, InputError, TfgalflowError

#: Suffixes :func:`write_array` writes.
ARRAY_SUFFIXES = (".npy", ".txt", ".dat", ".csv")
#: Suffixes :func:`write_samples` writes (a catalogue for 6-D points in .npz/.h5/.hdf5).
SAMPLE_SUFFIXES = ARRAY_SUFFIXES + (".npz", ".h5", ".hdf5")
#: Suffixes :func:`read_points` reads.
POINT_SUFFIXES = SAMPLE_SUFFIXES


def check_output(path: str | os.PathLike, suffixes: tuple[str, ...], what: str) -> Path:
    """``path`` as a Path if its suffix is one of ``suffixes`` and its directory exists; else
    InputError (unknown suffix) or FileError (missing directory: nothing is created silently).
    """
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise InputError(f"{path}: unsupported extension {path.suffix!r} for {what}; use "
                         f"{', '.join(suffixes)}")
    if not path.parent.is_dir():
        raise FileError(f"{path}: the directory {path.parent} does not exist")
    return path


def read_points(path: str | os.PathLike, units: Mapping[str, str] | None = None,
                column_ok: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Points [N, D] (and a catalogue's labels [N, C], else None) from a file.

    Args:
        path: ``.npy``, ``.npz`` (one array, or a catalogue: ``pos`` and ``vel``),
            ``.txt``/``.dat`` (whitespace), ``.csv`` (commas), or a catalogue ``.h5``/``.hdf5``.
        units: the units of a catalogue file that does not carry them
            (``{"length": "kpc", "velocity": "km/s"}``, as :meth:`Catalogue.load`); ignored for
            plain arrays.
        column_ok: a 1-D array is read as one column [N, 1] (for labels).

    Raises:
        FileError: missing or unreadable file (the message says what the file holds instead).
        InputError: unsupported extension, or an .npz with several arrays that is not a catalogue.
    """
    p = Path(path)
    if not p.is_file():
        raise FileError(f"{path}: no such file")
    suffix = p.suffix.lower()
    if suffix not in POINT_SUFFIXES:
        raise InputError(
            f"{path}: unsupported extension {suffix!r}; use {', '.join(POINT_SUFFIXES)}"
        )
    try:
        if suffix in (".h5", ".hdf5"):
            return _catalogue_points(p, units)
        if suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                keys = list(z.files)
                if "pos" in keys and "vel" in keys:
                    return _catalogue_points(p, units)
                if len(keys) != 1:
                    raise InputError(
                        f"{path}: holds arrays {keys}; expected one [N, D] array or a "
                        f"catalogue (pos, vel)"
                    )
                array = z[keys[0]]
        elif suffix == ".npy":
            array = np.load(p, allow_pickle=False)
        else:
            array = np.loadtxt(p, delimiter="," if suffix == ".csv" else None, ndmin=2)
    except zipfile.BadZipFile:
        raise FileError(f"{path}: not an .npz file (not a zip archive of .npy arrays)") from None
    except (OSError, ValueError) as exc:
        if isinstance(exc, TfgalflowError):      # already names the file and the problem
            raise
        raise FileError(f"{path}: cannot read points: {_short(exc)}") from None
    if column_ok and array.ndim == 1:
        array = array[:, None]
    return array, None


def _catalogue_points(
    path: Path, units: Mapping[str, str] | None
) -> tuple[np.ndarray, np.ndarray | None]:
    from .catalogue import Catalogue
    cat = Catalogue.load(path, units=units)
    return cat.phase_space, cat.labels


def _short(exc: Exception) -> str:
    text = str(exc)
    # np.load's answer to a file that is not .npy at all
    if "pickled" in text:
        return "not a NumPy .npy file"
    return text.splitlines()[0] if text else type(exc).__name__


def write_array(path: str | os.PathLike, values: Any, what: str) -> None:
    """Write ``values`` as ``.npy`` or text (``.txt``/``.dat`` spaces, ``.csv`` commas),
    atomically.
    """
    path = check_output(path, ARRAY_SUFFIXES, what)
    if path.suffix.lower() == ".npy":
        with atomic_file(path, suffix=".npy") as tmp:
            np.save(tmp, np.asarray(values))
        return
    with atomic_file(path) as tmp:
        np.savetxt(
            tmp,
            np.asarray(values),
            fmt="%.9g",
            delimiter="," if path.suffix.lower() == ".csv" else " ",
        )


def write_samples(path: str | os.PathLike, x: np.ndarray, labels: np.ndarray | None = None, *,
                  units: Mapping[str, str] | None = None, label_names: tuple[str, ...] = (),
                  meta: Mapping[str, Any] | None = None) -> None:
    """Write draws x [N, D]: a :class:`~tfgalflow.catalogue.Catalogue` for 6-D points in
    ``.npz``/``.h5`` (with ``units``, the ``labels`` [N, C] and their names, ``meta``), else an
    array ``samples``.
    """
    path = check_output(path, SAMPLE_SUFFIXES, "samples")
    suffix = path.suffix.lower()
    if suffix in (".npz", ".h5", ".hdf5") and x.shape[1] == 6:
        from .catalogue import Catalogue

        Catalogue(
            pos=x[:, :3],
            vel=x[:, 3:],
            labels=labels,
            label_names=tuple(label_names) if labels is not None else (),
            units=dict(units or {"length": "model", "velocity": "model"}),
            meta=dict(meta or {}),
        ).save(path)
    elif suffix == ".npz":
        with atomic_file(path, suffix=".npz") as tmp:
            np.savez(tmp, samples=x)
    elif suffix in (".h5", ".hdf5"):
        raise InputError(
            f"{path}: HDF5 output holds 6-D catalogues; these samples are {x.shape[1]}-D "
            f"(use .npy, .npz, .txt or .csv)"
        )
    else:
        write_array(path, x, "samples")


def parse_units(text: str | None) -> dict[str, str] | None:
    """``"kpc,km/s"`` -> ``{"length": "kpc", "velocity": "km/s"}`` (the CLI's ``--units``), None
    for None.
    """
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not all(parts):
        raise InputError(f"--units {text!r}: expected LENGTH,VELOCITY, e.g. kpc,km/s or m,m/s")
    from .catalogue import check_units
    return check_units({"length": parts[0], "velocity": parts[1]})


__all__ = [
    "read_points",
    "write_array",
    "write_samples",
    "check_output",
    "parse_units",
    "ARRAY_SUFFIXES",
    "SAMPLE_SUFFIXES",
    "POINT_SUFFIXES",
]
