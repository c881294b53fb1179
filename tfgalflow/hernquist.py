"""The Hernquist (1990) sphere: density, potential, forces, exact DFs and Jeans profiles.

Model of total mass ``M`` and scale length ``a`` under gravitational constant ``G`` (model units
G = M = a = 1 by default; see :mod:`tfgalflow.units` for physical scales)::

    rho(r)  = M a / (2 pi r (r + a)^3)            M(<r) = M r^2 / (r + a)^2
    Phi(r)  = -G M / (r + a)                      Psi(r) = -Phi(r) > 0
    E(x, v) = Psi(r) - |v|^2 / 2                  (relative energy; bound iff E > 0)

Two self-consistent equilibria ("kinds"):

``"iso"``   isotropic f(E), Hernquist (1990, ApJ 356, 359, eq. 17). With q = sqrt(a E / (G M)) and
            v_g = sqrt(G M / a)::

                f(E) = M / (8 sqrt2 pi^3 a^3 v_g^3) (1 - q^2)^(-5/2)
                       * [3 arcsin q + q (1 - q^2)^(1/2) (1 - 2 q^2) (8 q^4 - 8 q^2 - 3)]

``"aniso"`` constant anisotropy beta = 1/2 (Baes & Dejonghe 2002, A&A 393, 485; Evans & An 2006,
            Phys. Rev. D 73, 023524). In model units f(E, L) = 3 E^2 / (4 pi^3 L). Measuring E in
            units of G M / a, L in units of a v_g = sqrt(G M a) and f in units of M / (a^3 v_g^3)
            gives::

                f(E, L) = 3 M (a E / G M)^2 / (4 pi^3 a^3 v_g^3 (L / (a v_g)))
                        = 3 (a E / G M)^2 / (4 pi^3 G a L)

            (check: integrating over velocities gives rho(r) for any G, M, a; tested).

Both DFs vanish for E <= 0 (``log_df`` = -inf there) and are normalised to M: the integral of f
over phase space is the total mass (f is a *mass* density in phase space).

Numerics. The bracket B(q) of eq. 17 is B(q) = 128 int_0^q t^4 (1 - t^2)^(3/2) dt (differentiate to
check), so B ~ 128 q^5 / 5 for small q while its two closed-form terms are O(q): evaluating eq. 17
directly loses ~q^-4 in relative precision. For q^2 < 1/2 we sum the binomial series of the
integral instead. Near the centre (q -> 1) we never form 1 - q^2 by subtraction from E: for a
phase-space point it is 1 - q^2 = r / (r + a) + a |v|^2 / (2 G M) exactly, and
arcsin q = atan2(q, sqrt(1 - q^2)). The same formulas are used in float64 (NumPy) and in
float32/float64 (TensorFlow).

NumPy methods take r of any shape and x, v of shape [N, 3]; TensorFlow methods (``tf_*``) import
TensorFlow lazily, follow the input dtype and are differentiable with ``tf.GradientTape``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .spherical import phase_space, radii, tf_phase_space, tf_safe_norm, tf_vectors
from .validation import finite_matrix, one_of, positive_number

#: The DFs of the model: isotropic f(E) and constant-β = ½ f(E, L).
DF_KINDS = ("iso", "aniso")

# ---- series coefficients ----------------------------------------------------------------------
# B(q) = 128 sum_k c_k q^(2k+5) / (2k+5),  c_k = (-1)^k binom(3/2, k)
# (the binomial series of (1-t^2)^(3/2)).
# For q^2 < 1/2 the terms fall at least as 2^-k k^-5/2; 60 terms leave a truncation error < 1e-20.
_N_SERIES = 60
_Q2_SERIES_MAX = 0.5


def _bracket_series_coefficients(n: int) -> np.ndarray:
    """s_k with B(q) = 128 q^5 sum_k s_k q^(2k): s_k = (-1)^k binom(3/2, k) / (2k + 5)."""
    c = np.empty(n)
    c[0] = 1.0
    for k in range(n - 1):
        # (-1)^(k+1) binom(3/2, k+1) from (-1)^k binom(3/2, k)
        c[k + 1] = c[k] * (k - 1.5) / (k + 1)
    return c / (2.0 * np.arange(n) + 5.0)


_BRACKET_SERIES = _bracket_series_coefficients(_N_SERIES)

# Jeans integral for the isotropic model (model units):
# rho sigma_r^2 = J(T) / (2 pi), T = a / (r + a),
# J(T) = int_0^T t^4 / (1 - t) dt = -ln(1 - T) - T - T^2/2 - T^3/3 - T^4/4 = sum_{k>=5} T^k / k.
# The series is used for T < 1/2 (r > a), where the closed form cancels; 64 terms: error < 2^-64.
_N_JEANS = 64
_T_SERIES_MAX = 0.5


def _horner(coefficients, z, one):
    """sum_k coefficients[k] z^k by Horner's rule; ``one`` sets the result's type and dtype."""
    result = one * coefficients[-1]
    for c in coefficients[-2::-1]:
        result = result * z + c
    return result


@dataclass(frozen=True)
class Hernquist:
    """Hernquist sphere of mass ``M``, scale length ``a``, gravitational constant ``G`` (all > 0).

    Units are whatever M, a, G are in (default: model units G = M = a = 1). Velocities are then in
    units of sqrt(G M / a) * (your velocity unit) etc.; see :class:`tfgalflow.units.ModelUnits`.

    Example::

        >>> h = Hernquist()
        >>> float(h.enclosed_mass(1.0))          # M r^2 / (r + a)^2 at r = a
        0.25

    Reference: Hernquist, L. 1990, ApJ 356, 359.
    """

    M: float = 1.0
    a: float = 1.0
    G: float = 1.0

    def __post_init__(self):
        for name in ("M", "a", "G"):
            positive_number(getattr(self, name), f"Hernquist parameter {name}")

    # ---- derived scales -----------------------------------------------------------------------
    @property
    def velocity_scale(self) -> float:
        """v_g = sqrt(G M / a)."""
        return math.sqrt(self.G * self.M / self.a)

    @property
    def energy_scale(self) -> float:
        """G M / a: the central relative potential Psi(0)."""
        return self.G * self.M / self.a

    # ---- structure (NumPy, r of any shape) ----------------------------------------------------
    def density(self, r) -> np.ndarray:
        """rho(r) = M a / (2 pi r (r + a)^3)   [mass / length^3]. Hernquist (1990) eq. 2."""
        r = radii(r)
        with np.errstate(divide="ignore"):
            return self.M * self.a / (2.0 * np.pi * r * (r + self.a) ** 3)

    def enclosed_mass(self, r) -> np.ndarray:
        """M(<r) = M r^2 / (r + a)^2. Hernquist (1990) eq. 3."""
        return self.M * _r_over_r_plus_a(radii(r), self.a) ** 2

    def potential(self, r) -> np.ndarray:
        """Phi(r) = -G M / (r + a)  (< 0). Hernquist (1990) eq. 5."""
        return -self.relative_potential(r)

    def relative_potential(self, r) -> np.ndarray:
        """Psi(r) = -Phi(r) = G M / (r + a)  (> 0)."""
        r = radii(r)
        return self.G * self.M / (r + self.a)

    def circular_speed(self, r) -> np.ndarray:
        """v_c(r) = sqrt(G M(<r) / r) = sqrt(G M r) / (r + a)."""
        r = radii(r)
        return np.sqrt(self.G * self.M * _r_over_r_plus_a(r, self.a) / (r + self.a))

    def escape_speed(self, r) -> np.ndarray:
        """v_esc(r) = sqrt(2 Psi(r))."""
        return np.sqrt(2.0 * self.relative_potential(r))

    def acceleration(self, x) -> np.ndarray:
        """g(x) = -grad Phi = -G M x / (r (r + a)^2);  x: [N, 3] -> [N, 3].

        Zero at x = 0 (by symmetry).
        """
        x = finite_matrix(x, "x", 3)
        r = np.linalg.norm(x, axis=1, keepdims=True)
        safe_r = np.where(r > 0, r, 1.0)
        return np.where(r > 0, -self.G * self.M * x / (safe_r * (safe_r + self.a) ** 2), 0.0)

    # ---- energies and DFs (NumPy) -------------------------------------------------------------
    def relative_energy(self, x, v) -> np.ndarray:
        """E = Psi(|x|) - |v|^2 / 2;  x, v: [N, 3] -> [N]. Bound iff E > 0."""
        x, v = phase_space(x, v)
        return self.relative_potential(np.linalg.norm(x, axis=1)) - 0.5 * np.sum(v * v, axis=1)

    def f_iso(self, E) -> np.ndarray:
        """Isotropic Hernquist DF f(E) (Hernquist 1990 eq. 17) at relative energies E (any shape).

        Zero for E <= 0; diverges as (1 - a E / G M)^(-5/2) at E -> G M / a (the centre).
        """
        E = np.asarray(E, dtype=np.float64)
        q2 = np.clip(E / self.energy_scale, 0.0, 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_f = self._log_f_iso(q2, 1.0 - q2)
            return np.where(E > 0, np.exp(log_f), 0.0)

    def f_aniso(self, E, L) -> np.ndarray:
        """beta = 1/2 Hernquist DF f(E, L) = 3 (a E / G M)^2 / (4 pi^3 G a L); 0 for E <= 0.

        Model units: 3 E^2 / (4 pi^3 L) (Baes & Dejonghe 2002; Evans & An 2006).
        """
        E, L = np.broadcast_arrays(
            np.asarray(E, dtype=np.float64), np.asarray(L, dtype=np.float64)
        )
        with np.errstate(divide="ignore"):
            f = 3.0 * (E / self.energy_scale) ** 2 / (4.0 * np.pi**3 * self.G * self.a * L)
        return np.where(E > 0, f, 0.0)

    def log_df(self, x, v, kind: str = "iso") -> np.ndarray:
        """log f(x, v) for ``kind`` in {"iso", "aniso"};  x, v: [N, 3] -> [N]; -inf where E <= 0.

        f is a phase-space mass density (integral over d^3x d^3v = M). For "aniso", L = |x cross v|
        and log f = +inf on radial orbits (L = 0), an integrable singularity.
        """
        _check_kind(kind)
        x, v = phase_space(x, v)
        r = np.linalg.norm(x, axis=1)
        v2 = np.sum(v * v, axis=1)
        scaled_v2 = 0.5 * v2 / self.energy_scale
        q2 = self.a / (r + self.a) - scaled_v2            # a E / (G M)
        p2 = _r_over_r_plus_a(r, self.a) + scaled_v2      # 1 - a E / (G M), without cancellation
        bound = q2 > 0
        safe_q2 = np.where(bound, q2, 0.25)
        safe_p2 = np.where(bound, p2, 0.75)
        with np.errstate(divide="ignore", invalid="ignore"):
            if kind == "iso":
                log_f = self._log_f_iso(safe_q2, safe_p2)
            else:
                L = np.linalg.norm(np.cross(x, v), axis=1)
                log_f = (math.log(3.0 / (4.0 * math.pi**3 * self.G * self.a))
                         + 2.0 * np.log(safe_q2) - np.log(L))
        return np.where(bound, log_f, -np.inf)

    def df(self, x, v, kind: str = "iso") -> np.ndarray:
        """f(x, v) = exp(log_df);  x, v: [N, 3] -> [N]; 0 where unbound."""
        return np.exp(self.log_df(x, v, kind))

    def _log_f_iso(self, q2, p2):
        """log f_iso from q^2 = a E / (G M) in (0, 1] and p^2 = 1 - q^2.

        p^2 is passed separately, for accuracy.
        """
        q2_series = np.where(q2 < _Q2_SERIES_MAX, q2, 0.25)
        q2_direct = np.where(q2 < _Q2_SERIES_MAX, 0.75, q2)
        p2_direct = np.where(q2 < _Q2_SERIES_MAX, 0.25, p2)
        log_b_series = (math.log(128.0) + 2.5 * np.log(q2_series)
                        + np.log(_horner(_BRACKET_SERIES, q2_series, np.ones_like(q2_series))))
        q, p = np.sqrt(q2_direct), np.sqrt(p2_direct)
        log_b_direct = np.log(
            3.0 * np.arctan2(q, p)
            + q * p * (1.0 - 2.0 * q2_direct) * (8.0 * q2_direct**2 - 8.0 * q2_direct - 3.0)
        )
        log_b = np.where(q2 < _Q2_SERIES_MAX, log_b_series, log_b_direct)
        return self._log_iso_prefactor + log_b - 2.5 * np.log(p2)

    @property
    def _log_iso_prefactor(self) -> float:
        """log[M / (8 sqrt2 pi^3 a^3 v_g^3)]."""
        return math.log(
            self.M / (8.0 * math.sqrt(2.0) * math.pi**3 * self.a**3 * self.velocity_scale**3)
        )

    # ---- Jeans profiles -----------------------------------------------------------------------
    def sigma_r(self, r, kind: str = "iso") -> np.ndarray:
        """Radial velocity dispersion sigma_r at radii ``r`` (any shape, same shape out).

        "iso" (Hernquist 1990 eq. 10), with T = a / (r + a):
            sigma_r^2 = (G M / a) (1 - T) T^-4 [-ln(1 - T) - T - T^2/2 - T^3/3 - T^4/4]
                      = (G M / a) (1 - T) sum_{k>=5} T^(k-4) / k      (series used for r > a)
        "aniso" (beta = 1/2): the Jeans equation (1/r) d(r rho sigma_r^2)/dr = -rho dPhi/dr
        integrates to
            r rho sigma_r^2 = G M^2 a / (8 pi (r + a)^4), i.e.  sigma_r^2 = G M / (4 (r + a)).
        """
        _check_kind(kind)
        r = radii(r)
        if kind == "aniso":
            return np.sqrt(self.G * self.M / (4.0 * (r + self.a)))
        T = self.a / (r + self.a)
        series = np.where(T < _T_SERIES_MAX, T, 0.25)
        # T^(k-4)/k, k = 5, 6, ...
        coefficients = 1.0 / np.arange(5, 5 + _N_JEANS)
        s2_series = (1.0 - series) * series * _horner(coefficients, series, np.ones_like(series))
        direct_r = np.where((T >= _T_SERIES_MAX) & (r > 0), r, self.a)
        Td = self.a / (direct_r + self.a)
        with np.errstate(divide="ignore", invalid="ignore"):
            J = np.log1p(self.a / direct_r) - Td * (1 + Td * (1 / 2 + Td * (1 / 3 + Td / 4)))
            s2_direct = (direct_r / (direct_r + self.a)) * J / Td**4
        s2 = np.where(T < _T_SERIES_MAX, s2_series, np.where(r > 0, s2_direct, 0.0))
        return np.sqrt(self.energy_scale * s2)

    def sigma_t(self, r, kind: str = "iso") -> np.ndarray:
        """One tangential dispersion sigma_theta = sigma_phi = sqrt(1 - beta) sigma_r."""
        return np.sqrt(1.0 - self.beta(r, kind)) * self.sigma_r(r, kind)

    def beta(self, r, kind: str = "iso") -> np.ndarray:
        """Anisotropy beta = 1 - sigma_t^2 / sigma_r^2: 0 ("iso") or 1/2 ("aniso") at every r."""
        _check_kind(kind)
        return np.full(np.shape(radii(r)), 0.0 if kind == "iso" else 0.5)

    # ---- TensorFlow ---------------------------------------------------------------------------
    def tf_log_df(self, x, v, kind: str = "iso"):
        """TensorFlow log f(x, v): x, v [N, 3] -> [N], dtype of x (v cast to it); -inf at E <= 0.

        Differentiable: gradients are finite at bound points with r > 0 (and L > 0 for "aniso") and
        exactly zero at unbound points, so one unbound star cannot put NaN into a batch gradient.
        """
        import tensorflow as tf

        _check_kind(kind)
        x, v = tf_phase_space(x, v)
        dtype = x.dtype
        a = tf.constant(self.a, dtype)
        r = tf_safe_norm(x)
        scaled_v2 = tf.reduce_sum(v * v, axis=1) * tf.constant(0.5 / self.energy_scale, dtype)
        q2 = a / (r + a) - scaled_v2
        p2 = r / (r + a) + scaled_v2
        bound = q2 > 0
        safe_q2 = tf.where(bound, q2, tf.constant(0.25, dtype))
        safe_p2 = tf.where(bound, p2, tf.constant(0.75, dtype))
        if kind == "iso":
            log_f = self._tf_log_f_iso(safe_q2, safe_p2)
        else:
            L2 = tf.reduce_sum(tf.square(tf.linalg.cross(x, v)), axis=1)
            has_l = L2 > 0
            log_l = tf.where(has_l, 0.5 * tf.math.log(tf.where(has_l, L2, tf.ones_like(L2))),
                             tf.constant(-np.inf, dtype))
            log_f = (tf.constant(math.log(3.0 / (4.0 * math.pi**3 * self.G * self.a)), dtype)
                     + 2.0 * tf.math.log(safe_q2) - log_l)
        return tf.where(bound, log_f, tf.constant(-np.inf, dtype))

    def tf_df(self, x, v, kind: str = "iso"):
        """TensorFlow f(x, v) = exp(tf_log_df): [N], 0 where unbound."""
        import tensorflow as tf

        return tf.exp(self.tf_log_df(x, v, kind))

    def tf_acceleration(self, x):
        """TensorFlow g(x) = -G M x / (r (r + a)^2): x [N, 3] -> [N, 3], dtype of x; 0 at x = 0."""
        import tensorflow as tf

        x = tf_vectors(x, "x")
        dtype = x.dtype
        r = tf_safe_norm(x)[:, None]
        safe_r = tf.where(r > 0, r, tf.ones_like(r))
        a = tf.constant(self.a, dtype)
        g = -tf.constant(self.G * self.M, dtype) * x / (safe_r * tf.square(safe_r + a))
        return tf.where(r > 0, g, tf.zeros_like(g))

    def _tf_log_f_iso(self, q2, p2):
        """TensorFlow twin of :meth:`_log_f_iso`: same branches, safe inputs in the unused one."""
        import tensorflow as tf

        dtype = q2.dtype
        use_series = q2 < _Q2_SERIES_MAX
        q2_series = tf.where(use_series, q2, tf.constant(0.25, dtype))
        q2_direct = tf.where(use_series, tf.constant(0.75, dtype), q2)
        p2_direct = tf.where(use_series, tf.constant(0.25, dtype), p2)
        coefficients = [tf.constant(c, dtype) for c in _BRACKET_SERIES]
        log_b_series = (tf.constant(math.log(128.0), dtype) + 2.5 * tf.math.log(q2_series)
                        + tf.math.log(_horner(coefficients, q2_series, tf.ones_like(q2_series))))
        q, p = tf.sqrt(q2_direct), tf.sqrt(p2_direct)
        log_b_direct = tf.math.log(
            3.0 * tf.math.atan2(q, p)
            + q * p * (1.0 - 2.0 * q2_direct) * (8.0 * q2_direct**2 - 8.0 * q2_direct - 3.0)
        )
        log_b = tf.where(use_series, log_b_series, log_b_direct)
        return tf.constant(self._log_iso_prefactor, dtype) + log_b - 2.5 * tf.math.log(p2)

    # ---- adapter ------------------------------------------------------------------------------
    def exact_density(self, kind: str = "iso") -> Any:
        """The exact DF as a phase-space :class:`~tfgalflow.density.Density`
        (:class:`~tfgalflow.exact.ExactDF`), interchangeable with a learned flow.
        """
        from .exact import ExactDF

        return ExactDF(self, kind)

    @staticmethod
    def check_kind(kind: str) -> None:
        """InputError unless ``kind`` is one of :data:`DF_KINDS`."""
        _check_kind(kind)


def _r_over_r_plus_a(r: np.ndarray, a: float) -> np.ndarray:
    """r / (r + a) = 1 - a / (r + a), accurate at r -> 0 and finite (1) at r = inf."""
    with np.errstate(divide="ignore"):
        return 1.0 / (1.0 + a / r)


# ---- validation -------------------------------------------------------------------------------

def _check_kind(kind: str) -> None:
    one_of(kind, "DF kind", DF_KINDS)











