"""Checks at the package's boundaries, one copy each: every public function validates with these.

Each check either returns the value in the form the caller computes with, or raises
:class:`~tfgalflow.errors.InputError` with one line that names the argument, what it got and what
it expected. NumPy only (no TensorFlow import), so configuration code can use it at import time.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import InputError


def finite_matrix(value: Any, name: str, width: int | None = None, expected: str | None = None,
                  dtype: Any = np.float64) -> np.ndarray:
    """``value`` as a 2-D finite float array [N, width] with N >= 1 (a new array in ``dtype``).

    Args:
        value: anything ``np.asarray`` reads as floats (lists, arrays, eager tensors).
        name: what the message calls the argument (e.g. ``"positions"``, ``"pos in mock.h5"``).
        width: required number of columns (None: any width >= 1).
        expected: the expected shape as the message should show it (default ``"[N, width]"``).
        dtype: dtype of the returned array (float64 by default; float32 for model inputs).

    Raises:
        InputError: unreadable as floats, not 2-D, wrong width, no rows, or NaN/inf in some row
        (the message gives the number of bad rows and the first few).
    """
    expected = expected or f"[N, {width if width is not None else 'D'}]"
    if hasattr(value, "numpy") and callable(value.numpy):
        value = value.numpy()
    try:
        array = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"{name} cannot be read as a float array ({exc}); expected {expected}"
        ) from None
    if array.ndim != 2 or array.shape[1] == 0 or (width is not None and array.shape[1] != width):
        raise InputError(f"{name} has shape {list(array.shape)}; expected {expected}")
    if array.shape[0] == 0:
        raise InputError(
            f"{name} is empty (shape {list(array.shape)}); expected {expected} with N >= 1"
        )
    check_finite_rows(array, name)
    if np.dtype(dtype) != np.float64:
        with np.errstate(over="ignore"):
            array = array.astype(dtype)
        check_finite_rows(array, name, note=f" (beyond {np.dtype(dtype).name} range)")
    return array


def check_finite_rows(array: np.ndarray, name: str, note: str = "") -> None:
    """InputError if ``array`` [N, ...] holds NaN or inf, naming how many rows and the first
    few.
    """
    finite = np.isfinite(array)
    if finite.all():
        return
    bad = np.nonzero(~finite.reshape(finite.shape[0], -1).all(axis=1))[0] if finite.ndim > 1 \
        else np.nonzero(~finite)[0]
    raise InputError(
        f"{name} contains NaN or inf{note} in {bad.size} row(s), first rows {bad[:5].tolist()}"
    )


def integer(value: Any, name: str, low: int = 1, high: int | None = None) -> int:
    """``value`` as a Python int in [low, high]; bools, floats and strings are refused.

    ``integer(n, "n")`` is the positive-count check (n >= 1); ``integer(s, "seed", low=0)`` a seed.
    """
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, (int, np.integer))
        or value < low
        or (high is not None and value > high)
    ):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise InputError(f"{name} = {value!r}: expected an integer {bound}")
    return int(value)


def seed(value: Any, name: str = "seed") -> int:
    """The seed to use and record: an integer >= 0, or fresh OS entropy for None."""
    if value is None:
        return int(np.random.SeedSequence().entropy)
    return integer(value, name, low=0)


def positive_number(value: Any, name: str, allow_zero: bool = False) -> float:
    """``value`` as a finite float > 0 (>= 0 with ``allow_zero``)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, (bool, np.bool_)) or not math.isfinite(number) or number < 0 \
            or (number == 0 and not allow_zero):
        raise InputError(
            f"{name} = {value!r}: expected a finite number {'>= 0' if allow_zero else '> 0'}"
        )
    return number


def boolean(value: Any, name: str) -> bool:
    """``value`` as a Python bool (True/False or a NumPy bool); InputError for anything else."""
    if not isinstance(value, (bool, np.bool_)):
        raise InputError(f"{name} = {value!r}: expected True or False")
    return bool(value)


def one_of(value: Any, name: str, allowed: tuple[str, ...]) -> str:
    """``value`` if it is one of ``allowed``, else InputError listing them."""
    if value not in allowed:
        raise InputError(
            f"unknown {name} {value!r}; allowed values are {', '.join(repr(a) for a in allowed)}"
        )
    return value


def unit_vectors(n: int, rng: np.random.Generator) -> np.ndarray:
    """n directions uniform on the unit sphere, [n, 3] float64 (normalised Gaussian draws, Muller
    1959).
    """
    d = rng.normal(size=(n, 3))
    return d / np.linalg.norm(d, axis=1, keepdims=True)
