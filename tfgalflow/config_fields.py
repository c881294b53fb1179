"""Fields of the frozen config dataclasses: one declaration gives a field, its flag, its parser.

:class:`~tfgalflow.training.TrainConfig`, every task's :class:`~tfgalflow.tasks.TaskConfig` and
:class:`~tfgalflow.interpolation_study.InterpolationConfig` declare each setting once,
``name: type = option(default, help, kind)``. The ``kind`` says how a value given as Python, JSON,
YAML or command-line text becomes the field's value, and the CLI builds each ``--flag`` from
:func:`field_help`:

    =========  ==============================================  ===================================
    kind       accepts                                          gives
    =========  ==============================================  ===================================
    int        3, 3.0, "3", "1e6" (integer-valued)              int
    float      finite numbers, "2e-3"                           float
    int?       as int, or None / "none" / "null" / ""           int or None
    float?     as float, or None / "none" / "null" / ""         float or None
    bool       True/False, "true/yes/on/1", "false/no/off/0"    bool
    str        text                                             str
    ints       "64,64", [64, 64], 64 (empty allowed)            tuple of int
    floats     "0.5,1,1.5", [0.5, 1] (non-empty)                tuple of float
    pairs      "0.75:0.25,1.25:0.75", [(0.75, 0.25), ...]       tuple of (float, float)
    =========  ==============================================  ===================================

Booleans are never numbers here (``True`` is not the integer 1). A value that does not parse is an
:class:`~tfgalflow.errors.InputError` naming the owner, the field and what was expected:
``TrainConfig.layers = 'x': expected an integer``.

Standard library, NumPy and :mod:`tfgalflow.errors` only, so ``tfgalflow --help`` stays fast.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from .errors import InputError

KINDS = ("int", "float", "int?", "float?", "bool", "str", "ints", "floats", "pairs", "pairs?")
TRUE = ("true", "yes", "on", "1")
FALSE = ("false", "no", "off", "0")
NONE = ("none", "null", "")


def option(default: Any, help: str, kind: str, *, evaluation_only: bool = False) -> Any:
    """A config field with its default, its help text (the ``--flag``'s) and its ``kind``
    (one of :data:`KINDS`). ``evaluation_only``: the field changes how a trained model is
    measured, not the data or the training, so a finished run may be evaluated again with
    another value (:func:`evaluation_only_fields`).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown field kind {kind!r}; expected one of {KINDS}")
    return dataclasses.field(default=default, metadata={"help": help, "kind": kind,
                                                        "evaluation_only": evaluation_only})


def evaluation_only_fields(cls: type) -> frozenset[str]:
    """Names of the fields of config class ``cls`` declared with ``evaluation_only=True``."""
    return frozenset(f.name for f in dataclasses.fields(cls)
                     if f.metadata.get("evaluation_only", False))


def coerce(owner: str, name: str, kind: str, value: Any) -> Any:
    """``value`` (Python, JSON, YAML or command-line text) as the field ``owner.name`` of kind
    ``kind``; InputError naming the field and what was expected if it does not parse.
    """

    def fail(expected: str) -> InputError:
        return InputError(f"{owner}.{name} = {value!r}: expected {expected}")

    def number(v: Any, expected: str) -> float:
        if isinstance(v, (bool, np.bool_)):
            raise fail(expected)
        try:
            out = float(v.strip() if isinstance(v, str) else v)
        except (TypeError, ValueError):
            raise fail(expected) from None
        if not math.isfinite(out):
            raise fail(expected)
        return out

    def integer(v: Any) -> int:
        out = number(v, "an integer")
        if not out.is_integer():
            raise fail("an integer")
        return int(out)

    def items(separator: str = ",") -> list:
        if isinstance(value, str):
            return [v for v in value.replace(" ", "").split(separator) if v]
        if isinstance(value, (list, tuple, np.ndarray)):
            return list(value)
        return [value]

    text = value.strip().lower() if isinstance(value, str) else None
    if kind in ("int?", "float?") and (value is None or text in NONE):
        return None
    if kind in ("int", "int?"):
        return integer(value)
    if kind in ("float", "float?"):
        return number(value, "a number")
    if kind == "bool":
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        if text in TRUE + FALSE:
            return text in TRUE
        raise fail("true or false")
    if kind == "str":
        if not isinstance(value, str):
            raise fail("a string")
        return value
    if kind == "ints":
        if isinstance(value, (bool, np.bool_)):
            raise fail("integers like 64,64")
        return tuple(integer(v) for v in items())
    if kind == "floats":
        out = tuple(number(v, "numbers like 0.5,1") for v in items())
        if not out:
            raise fail("numbers like 0.5,1")
        return out
    if kind in ("pairs", "pairs?"):
        # "pairs": a non-empty list of label pairs; "pairs?": a possibly empty one (none or "")
        example = ("label pairs like 0.75:0.25,1.25:0.75" if kind == "pairs"
                   else "pairs like 1:0.01 (or none)")
        if kind == "pairs?" and (value is None or text in NONE or (
                isinstance(value, (list, tuple)) and not value)):
            return ()
        try:
            pairs = [p.split(":") if isinstance(p, str) else list(p) for p in items()]
        except TypeError:
            raise fail(example) from None
        if not pairs or any(len(p) != 2 for p in pairs):
            raise fail(example)
        return tuple((number(g, example), number(k, example)) for g, k in pairs)
    raise AssertionError(f"unknown field kind {kind!r}")


def coerce_fields(config: Any) -> None:
    """Parse every field of the frozen dataclass instance ``config`` in place (call it first in
    ``__post_init__``).
    """
    for f in dataclasses.fields(config):
        value = coerce(type(config).__name__, f.name, f.metadata["kind"], getattr(config, f.name))
        object.__setattr__(config, f.name, value)


def check_keys(cls: type, d: Any, where: str | None = None) -> None:
    """InputError unless ``d`` is a mapping whose keys are all fields of the config dataclass
    ``cls``; the message names the unknown keys and the allowed ones (``where`` defaults to the
    class name: "TrainConfig: unknown key(s) ['hiden']; allowed: [...]").
    """
    where = where or cls.__name__
    if not isinstance(d, Mapping):
        raise InputError(f"{where}: expected a mapping of field names, got {type(d).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise InputError(f"{where}: unknown key(s) {unknown}; allowed: {names}")


def field_help(cls: type) -> dict[str, tuple[str, str]]:
    """{field: (kind, help)} of a config dataclass, for building its command-line flags
    (evaluation-only fields say so in their help).
    """
    return {f.name: (f.metadata["kind"], f.metadata["help"]
                     + ("; evaluation only: may change when re-running a finished run"
                        if f.metadata.get("evaluation_only") else ""))
            for f in dataclasses.fields(cls)}
