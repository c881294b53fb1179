"""Gadget-style HDF5 snapshots: stars from ``PartType4/Coordinates`` and ``PartType4/Velocities``.

Units come from a ``units`` attribute of the datasets, the ``UnitLength_in_cm`` /
``UnitVelocity_in_cm_per_s`` attributes of the ``Header``, ``Parameters`` or ``Units`` group
(converted to kpc and km/s; comoving a and h factors are *not* applied), or the caller.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import FileError
from ..units import CM_KPC, CM_S_KMS
from .core import jsonable, resolve_units
from .hdf5 import HDF5Catalogue, attribute, block_rows, dataset_2d

#: Gadget-style particle group and datasets understood by :meth:`Catalogue.load`.
GADGET_GROUP = "PartType4"
GADGET_POS, GADGET_VEL = "Coordinates", "Velocities"


def gadget_layout(path: Path, f, units: Mapping[str, str] | None) -> HDF5Catalogue:
    """Lazy view of the stars ``PartType4/{Coordinates, Velocities}`` [N, 3] of an open file ``f``.

    Units, in order: ``units`` attributes on both datasets (checked against ``units``), then
    ``units`` given by the caller, then the cgs unit attributes (rows scaled to kpc and km/s on
    reading); FileError when none is available.
    """
    pos_name, vel_name = f"{GADGET_GROUP}/{GADGET_POS}", f"{GADGET_GROUP}/{GADGET_VEL}"
    pos, vel = dataset_2d(path, f, pos_name, 3), dataset_2d(path, f, vel_name, 3)
    if pos.shape[0] != vel.shape[0]:
        raise FileError(f"{path}: {pos_name!r} has {pos.shape[0]} rows but {vel_name!r} has "
                        f"{vel.shape[0]}")
    meta: dict[str, Any] = {"layout": f"gadget:{GADGET_GROUP}", "source_file": str(path)}
    if "Header" in f:
        meta["gadget_header"] = {k: attribute(f["Header"], k) for k in f["Header"].attrs}
    named = None
    if attribute(pos, "units") is not None and attribute(vel, "units") is not None:
        named = {"length": attribute(pos, "units"), "velocity": attribute(vel, "units")}
    cgs = _gadget_cgs_units(f)
    length_scale = velocity_scale = 1.0
    if named is None and units is None and cgs is not None:
        length_scale, velocity_scale = cgs[0] * CM_KPC, cgs[1] * CM_S_KMS
        resolved = {"length": "kpc", "velocity": "km/s"}
        meta["unit_conversion"] = {"UnitLength_in_cm": cgs[0], "UnitVelocity_in_cm_per_s": cgs[1],
                                   "to": resolved, "comoving_factors_applied": False}
        hubble = meta.get("gadget_header", {}).get("HubbleParam")
        if hubble is not None and float(hubble) not in (0.0, 1.0):
            warnings.warn(f"{path}: HubbleParam = {hubble}: Gadget code units may be comoving "
                          "kpc/h; tfgalflow applies only "
                          "UnitLength_in_cm/UnitVelocity_in_cm_per_s. Pass units= if they "
                          "differ.",
                          stacklevel=3)
    else:
        try:
            resolved = resolve_units(path, named, units)
        except FileError:
            raise FileError(f"{path}: Gadget snapshot without units: no 'units' attribute on "
                            f"{pos_name!r}/{vel_name!r} and no "
                            "UnitLength_in_cm/UnitVelocity_in_cm_per_s in Header, Parameters or "
                            "Units; pass units={'length': 'kpc', 'velocity': 'km/s'}") from None
    return HDF5Catalogue(
        path=path,
        n=int(pos.shape[0]),
        units=resolved,
        label_names=(),
        meta=jsonable(meta, "meta"),
        layout="gadget",
        pos_name=pos_name,
        vel_name=vel_name,
        labels_name=None,
        chunk_rows=block_rows(pos),
        length_scale=length_scale,
        velocity_scale=velocity_scale,
    )


def _gadget_cgs_units(f) -> tuple[float, float] | None:
    """(UnitLength_in_cm, UnitVelocity_in_cm_per_s) from the Header, Parameters or Units group.

    None when no group holds both.
    """
    for group in ("Header", "Parameters", "Units"):
        if group in f:
            length = attribute(f[group], "UnitLength_in_cm")
            velocity = attribute(f[group], "UnitVelocity_in_cm_per_s")
            if length is not None and velocity is not None:
                return float(np.ravel(length)[0]), float(np.ravel(velocity)[0])
    return None
