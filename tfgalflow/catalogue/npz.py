"""The ``.npz`` catalogue format: NumPy arrays plus JSON strings for the units and meta.

Arrays ``pos``, ``vel`` [, ``labels``, ``label_names``, ``errors`` with the 0-d string
``error_kind``] as in the reference datasets of An, Naik,
Evans & Burrage (2021) (which hold only ``pos``/``vel``, in m and m/s), plus 0-d string arrays
``units`` and ``meta`` (JSON) and ``format``/``format_version``. A file without ``units`` loads
only when the caller states them: ``Catalogue.load("hq_iso_orig.npz", units={"length": "m",
"velocity": "m/s"})``.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import FileError, InputError
from .core import FORMAT, FORMAT_VERSION, Catalogue, resolve_units


def write_npz(tmp: Path, cat: Catalogue) -> None:
    """Write ``cat`` to ``tmp`` as an uncompressed .npz (arrays plus JSON units and meta)."""
    arrays = {"pos": cat.pos, "vel": cat.vel, "units": np.array(json.dumps(cat.units)),
              "meta": np.array(json.dumps(cat.meta)), "format": np.array(FORMAT),
              "format_version": np.array(FORMAT_VERSION)}
    if cat.labels is not None:
        arrays["labels"] = cat.labels
        arrays["label_names"] = np.array(cat.label_names, dtype=str)
    if cat.errors is not None:
        arrays["errors"] = cat.errors
        arrays["error_kind"] = np.array(cat.error_kind)
    np.savez(tmp, **arrays)


def read_npz(path: Path, units: Mapping[str, str] | None) -> Catalogue:
    """The :class:`Catalogue` stored in a .npz file, its units checked against ``units``."""
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            missing = [k for k in ("pos", "vel") if k not in keys]
            if missing:
                raise FileError(f"{path}: missing array(s) {missing}; a catalogue .npz holds "
                                f"'pos' [N, 3] and 'vel' [N, 3] (it has {sorted(keys)})")
            if "format_version" in keys and int(z["format_version"]) > FORMAT_VERSION:
                raise FileError(f"{path}: catalogue format version {int(z['format_version'])} is "
                                f"newer than this tfgalflow reads ({FORMAT_VERSION})")
            pos, vel = z["pos"], z["vel"]
            labels = z["labels"] if "labels" in keys else None
            names = tuple(str(s) for s in z["label_names"]) if "label_names" in keys else ()
            file_units = _json_field(z["units"], path, "units") if "units" in keys else None
            meta = _json_field(z["meta"], path, "meta") if "meta" in keys else {}
            errors = z["errors"] if "errors" in keys else None
            error_kind = str(z["error_kind"]) if "error_kind" in keys else None
    except FileError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as exc:
        raise FileError(f"{path}: not a readable .npz catalogue ({type(exc).__name__}: "
                        f"{exc})") from None
    try:
        resolved = resolve_units(path, file_units, units)
    except FileError:
        # A file's real problem (NaN rows, wrong columns) is reported before its missing units.
        _labelled(
            Catalogue,
            path,
            pos,
            vel,
            labels,
            names,
            {"length": "model", "velocity": "model"},
            meta,
            errors,
            error_kind,
        )
        raise
    return _labelled(Catalogue, path, pos, vel, labels, names, resolved, meta, errors, error_kind)


def _json_field(value: np.ndarray, path: Path, name: str) -> Any:
    try:
        return json.loads(str(value))
    except ValueError as exc:
        raise FileError(f"{path}: attribute {name!r} is not valid JSON ({exc})") from None


def _labelled(cls, path, pos, vel, labels, names, units, meta, errors=None,
              error_kind=None) -> Catalogue:
    try:
        return cls(pos, vel, labels=labels, label_names=names if labels is not None else (),
                   units=units, meta=meta, errors=errors, error_kind=error_kind)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
