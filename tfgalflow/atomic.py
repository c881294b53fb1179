"""Atomic writes: a file or directory appears complete under its final name, or not at all.

Everything is first written to a temporary sibling (same filesystem, so ``os.replace`` is atomic on
POSIX) and renamed into place only after it was written successfully. A crash or kill part-way
leaves at most a ``.tmp-*`` sibling behind, never a half-written file under the real name.

The temporary file and directory are created private (``mkstemp``: 0600, ``mkdtemp``: 0700); before
the rename they get the permissions a plain ``open``/``mkdir`` would have given them under the
process umask (0644 and 0755 under the usual 022; a replaced file keeps its own), so a run, report
or SavedModel is readable by the group and by a TensorFlow Serving process running as another
user, as any other output is.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import numpy as np


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask (read without changing it where Linux allows, else set and restored)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def _plain_file_mode(path: Path) -> int:
    """The permissions ``open(path, "w")`` would leave: an existing file's own (a file rewritten
    in place keeps its mode), else 0666 under the umask.
    """
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it onto ``path``
    (replacing any old file).

    ``suffix`` lets writers that insist on an extension (``np.savez`` appends ``.npz``) keep it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:      # make the bytes durable before the rename publishes them
            os.fsync(fh.fileno())
        os.chmod(tmp, _plain_file_mode(path))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success rename it to ``path``.

    With ``overwrite=False`` an existing ``path`` is an error (checked before and after writing).
    With ``overwrite=True`` the old directory is moved aside and deleted only after the new one is
    in place, so a good directory is never lost to a failed write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; refusing to overwrite it")
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}.", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # what mkdir(path) would have created
        if path.exists():
            if not overwrite:
                raise FileExistsError(
                    f"{path} appeared while it was being written; refusing to overwrite it"
                )
            old = Path(tempfile.mkdtemp(prefix=f".tmp-old-{path.name}.", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def json_ready(value: Any, nonfinite_as_null: bool = True) -> Any:
    """A JSON-able copy of ``value``: mappings to dicts with string keys, NumPy arrays, tuples and
    lists to lists, NumPy scalars to Python bools, ints and floats; anything else as it is.

    ``nonfinite_as_null``: NaN and ±inf become None (null), so the file is strict JSON (RFC 8259
    has no NaN); False keeps them (Python's json writes them as NaN / Infinity).
    """
    if isinstance(value, Mapping):
        return {str(k): json_ready(v, nonfinite_as_null) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist(), nonfinite_as_null)
    if isinstance(value, (list, tuple)):
        return [json_ready(v, nonfinite_as_null) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) or not nonfinite_as_null else None
    return value


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
