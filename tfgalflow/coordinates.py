"""What a flow learns of a catalogue (``TrainConfig.coordinates``) and the DF that turns it back
into a density of the catalogue's own columns.

    cartesian     the columns as they are; the model is the flow itself
    spherical     (r, v_r, v_t) of 6-D phase space (x, v): a steady spherical system,
                  :class:`tfgalflow.spherical_df.SphericalDF`
    cylindrical   (R, z, v_R, v_φ, v_z, e) of (x, y, z, v_x, v_y, v_z, e): an axisymmetric system
                  with any further columns e (metallicity, age, ...),
                  :class:`tfgalflow.axisymmetric_df.AxisymmetricDF`

The training reduces the data with :func:`reduce`, the flow learns the logs of
:func:`flow_log_columns`, and :func:`wrap` turns the trained flow (or ensemble) into the model a
user, the CBE, the export and the server see. :func:`options` describes a wrapped model for its
SavedModel metadata (a copy over another base is ``model.with_base(base)``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InputError

#: TrainConfig.coordinates values.
COORDINATES = ("cartesian", "spherical", "cylindrical")
#: SavedModel metadata key of each reduced-coordinate DF (its options, or null).
METADATA_KEYS = {"spherical": "spherical_df", "cylindrical": "axisymmetric_df"}


def _classes() -> dict[str, type]:
    from .axisymmetric_df import AxisymmetricDF
    from .spherical_df import SphericalDF
    return {"spherical": SphericalDF, "cylindrical": AxisymmetricDF}


def check_dim(coordinates: str, dim: int) -> None:
    """InputError unless data of ``dim`` columns can be reduced to ``coordinates``."""
    if coordinates == "spherical" and dim != 6:
        raise InputError(f"TrainConfig.coordinates = 'spherical' needs 6-D phase-space data "
                         f"(x, v) [N, 6]; got [N, {dim}]")
    if coordinates == "cylindrical" and dim < 6:
        raise InputError(f"TrainConfig.coordinates = 'cylindrical' needs catalogue rows (x, y, z, "
                         f"v_x, v_y, v_z, ...) [N, >= 6]; got [N, {dim}]")


def reduce(coordinates: str, w: Any) -> np.ndarray:
    """The columns the flow learns of catalogue rows w [N, D]: float64 [N, D'] (D' = D for
    cartesian, 3 for spherical, D - 1 for cylindrical).
    """
    if coordinates == "cartesian":
        return np.asarray(w, np.float64)
    check_dim(coordinates, np.shape(w)[1])
    if coordinates == "spherical":
        from .spherical_df import reduced_coordinates
        return reduced_coordinates(w)
    from .axisymmetric_df import cylindrical_coordinates
    return cylindrical_coordinates(w)


def column_names(coordinates: str, names: list[str] | None, dim: int) -> list[str] | None:
    """Names of the reduced columns (cylindrical: the catalogue's names of the extra columns)."""
    if coordinates == "spherical":
        from .spherical_df import REDUCED_COLUMNS
        return list(REDUCED_COLUMNS)
    if coordinates == "cylindrical":
        from .axisymmetric_df import CYLINDRICAL_COLUMNS
        extra = list(names[6:]) if names and len(names) == dim else [
            f"col{j}" for j in range(6, dim)]
        return list(CYLINDRICAL_COLUMNS) + extra
    return names


def flow_log_columns(coordinates: str, log_columns: tuple[int, ...]) -> tuple[int, ...]:
    """The flow's log columns for the catalogue's ``log_columns`` (InputError where they cannot
    be: spherical takes none, cylindrical only columns after the sixth).
    """
    if coordinates == "spherical":
        if log_columns:
            raise InputError("TrainConfig.log_columns: expected none with coordinates = "
                             "'spherical' (it learns log r and log v_t itself)")
        from .spherical_df import REDUCED_LOG_COLUMNS
        return REDUCED_LOG_COLUMNS
    if coordinates == "cylindrical":
        from .axisymmetric_df import flow_log_columns as cylindrical_log_columns
        return cylindrical_log_columns(tuple(log_columns))
    return tuple(log_columns)


def wrap(coordinates: str, base: Any, **options: Any) -> Any:
    """The model of a flow/ensemble ``base`` trained on ``coordinates`` (the base itself for
    cartesian); ``options`` are the DF's (e.g. ``even``).
    """
    if coordinates == "cartesian":
        return base
    return _classes()[coordinates](base, **options)


def coordinates_of(model: Any) -> str:
    """The coordinates a model's base learned ('cartesian' for a plain Flow/Ensemble)."""
    for name, cls in _classes().items():
        if isinstance(model, cls):
            return name
    return "cartesian"


def options(model: Any) -> dict | None:
    """The options that rebuild a reduced-coordinate DF from its base ({"even": ...}), None for
    any other model.
    """
    return {"even": model.even} if coordinates_of(model) != "cartesian" else None
