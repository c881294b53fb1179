"""Physical constants and unit systems, in one place.

Model ("N-body") units set G = M = a = 1 for a Hernquist model of total mass M and scale length a.
The physical scales follow from M and a:

    velocity unit  v0 = sqrt(G M / a)          (km/s when M is in Msun, a in kpc)
    time unit      t0 = a / v0
    accel. unit    a0 = v0**2 / a = G M / a**2

Constants are CODATA 2018 / IAU 2015 nominal values. The reference study (An, Naik, Evans & Burrage
2021) stored its mocks in SI units, hence the SI conversions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

G_SI = 6.67430e-11                 # m^3 kg^-1 s^-2 (CODATA 2018)
MSUN_KG = 1.988409870698051e30     # kg (IAU 2015 nominal GM_sun / G)
KPC_M = 3.0856775814913673e19      # m
KM_M = 1.0e3                       # m
GYR_S = 3.15576e16                 # s (Julian gigayear)

#: G in kpc (km/s)^2 / Msun, derived from the SI values above (= 4.3009e-6).
G_KPC_KMS2_MSUN = G_SI * MSUN_KG / (KPC_M * KM_M**2)

#: Length units understood in catalogue metadata, as multiples of 1 kpc.
LENGTH_UNITS = {"kpc": 1.0, "pc": 1.0e-3, "Mpc": 1.0e3, "m": 1.0 / KPC_M, "km": KM_M / KPC_M}
#: Velocity units understood in catalogue metadata, as multiples of 1 km/s.
VELOCITY_UNITS = {"km/s": 1.0, "m/s": 1.0 / KM_M, "kpc/Gyr": KPC_M / GYR_S / KM_M}
#: Name of model units (G = M = a = 1) for both length and velocity in catalogue metadata. They
#: have no fixed factor: converting them needs a :class:`ModelUnits` (length unit ``length_kpc``
#: kpc, velocity unit ``velocity_kms`` km/s).
MODEL_UNIT = "model"
#: 1 cm in kpc and 1 cm/s in km/s (Gadget snapshots state their units in cgs).
CM_KPC = 1.0e-2 / KPC_M
CM_S_KMS = 1.0e-2 / KM_M


def length_factor(unit: str) -> float:
    """Multiplier taking a length in ``unit`` to kpc. Raises ``ValueError`` for unknown units."""
    try:
        return LENGTH_UNITS[unit]
    except KeyError:
        raise ValueError(
            f"unknown length unit {unit!r}; expected one of {sorted(LENGTH_UNITS)}"
        ) from None


def velocity_factor(unit: str) -> float:
    """Multiplier taking a velocity in ``unit`` to km/s. Raises ``ValueError`` for unknown
    units.
    """
    try:
        return VELOCITY_UNITS[unit]
    except KeyError:
        raise ValueError(
            f"unknown velocity unit {unit!r}; expected one of {sorted(VELOCITY_UNITS)}"
        ) from None


@dataclass(frozen=True)
class ModelUnits:
    """Model units with G = 1 for a system of mass ``mass_msun`` [Msun] and length ``length_kpc``
    [kpc].

    Example: a Hernquist galaxy with M = 1e11 Msun, a = 2 kpc has
    ``ModelUnits(1e11, 2.0).velocity_kms`` ≈ 464 km/s.
    """

    mass_msun: float = 1.0e10
    length_kpc: float = 1.0

    def __post_init__(self):
        if not (self.mass_msun > 0 and self.length_kpc > 0):
            raise ValueError(
                f"ModelUnits needs positive mass and length, got {self.mass_msun}, "
                f"{self.length_kpc}"
            )

    @property
    def velocity_kms(self) -> float:
        """v0 = sqrt(G M / a) in km/s."""
        return math.sqrt(G_KPC_KMS2_MSUN * self.mass_msun / self.length_kpc)

    @property
    def time_gyr(self) -> float:
        """t0 = a / v0 in Gyr."""
        return self.length_kpc * KPC_M / (self.velocity_kms * KM_M) / GYR_S

    @property
    def acceleration_kms2_per_kpc(self) -> float:
        """a0 = v0^2 / a in (km/s)^2 / kpc."""
        return self.velocity_kms**2 / self.length_kpc

    @property
    def acceleration_si(self) -> float:
        """a0 in m/s^2."""
        return self.acceleration_kms2_per_kpc * KM_M**2 / KPC_M
