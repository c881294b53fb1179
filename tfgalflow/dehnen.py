"""Dehnen (1993) gamma-models with Osipkov-Merritt anisotropy: structure, exact DFs, Jeans.

Model of mass ``M``, scale length ``a``, inner log-slope ``gamma`` in [0, 3) under gravitational
constant ``G`` (model units G = M = a = 1 by default). gamma = 1 is Hernquist (1990), gamma = 2 is
Jaffe (1983). With y = r / (r + a) and g = 2 - gamma::

    rho(r)  = (3 - gamma) M a / (4 pi r^gamma (r + a)^(4 - gamma))        Dehnen (1993) eq. 1
    M(<r)   = M y^(3 - gamma)                                             eq. 2
    Psi(r)  = -Phi(r) = (G M / a) (1 - y^g) / g   (g != 0);   (G M / a) ln(1 + a / r)   (g = 0)

Osipkov-Merritt (Osipkov 1979; Merritt 1985) anisotropy radius r_a, label ``ra_inverse`` = a / r_a
(0: isotropic). The DF depends on x, v only through::

    Q = Psi(r) - |v|^2 / 2 - |x cross v|^2 / (2 r_a^2),      beta(r) = r^2 / (r^2 + r_a^2)

and follows from Eddington's inversion of rho_Q(Psi) = (1 + r^2 / r_a^2) rho(r(Psi)) (Binney &
Tremaine 2008, eqs. 4.46b and 4.67; the boundary term vanishes as d rho_Q / d Psi -> 0 at 0)::

    f(Q) = 1 / (sqrt8 pi^2) int_0^Q (d^2 rho_Q / d Psi^2) dPsi / sqrt(Q - Psi).

Closed-form integrand. In model units d/dPsi = -y^(gamma-1) d/dy, and with w = 1 - y::

    d^2 rho_Q / dPsi^2 = C y^(gamma-4) [R0(y) + (a/r_a)^2 R1(y)],   C = (3 - gamma) / (4 pi),
    R0 = w^2 (2 gamma + 4 y + (8 - 2 gamma) y^2)     (>= 0: the isotropic DF is positive),
    R1 = y^3 (2 - (8 - 2 gamma) w).

Substituting y = y_Q exp(L t^2), L = -ln y_Q = ln(1 + a / r_Q) (r_Q: the radius where Psi = Q),
removes the inverse square root (Q - Psi = y_Q^g L t^2 exprel(g L t^2), exprel(z) = (e^z - 1) / z)
and the central cusp at once::

    f(Q) = 2 C / (sqrt8 pi^2) sqrt(L) e^{(2 + g/2) L}
           int_0^1 [R0(w) + (a/r_a)^2 R1(w)] e^{-2 L t^2} exprel(g L t^2)^(-1/2) dt,
    y = exp(-L (1 - t^2)),  w = -expm1(-L (1 - t^2)).

The integrand is smooth and even in t (no endpoint singularity, every factor evaluated without
cancellation), so ``N_NODES`` = 48-point Gauss-Legendre gives f to ~1e-12 relative for the
isotropic part at every Q (tests: Hernquist's closed forms, the density from integrating f over
velocities, galpy). The same quadrature runs in NumPy (float64) and TensorFlow (any float dtype,
differentiable), so the TF density needs no tables, is exact for *any* label per row, and its
gradient is the derivative of the quadrature (no interpolation error in grad log f). Memory:
[N, N_NODES] intermediates per call.

Since R is linear in (a/r_a)^2, f = f0 + (a/r_a)^2 f1 with f0 > 0. Where f1 < 0 the DF turns
negative for a / r_a > :func:`max_ra_inverse` (gamma) = min sqrt(f0 / -f1): such labels raise
InputError.

Labels c = (gamma, a/r_a) (``LABEL_NAMES``). NumPy methods take r of any shape and x, v of shape
[N, 3]; TensorFlow functions (``tf_*``) import TensorFlow lazily and follow the dtype of x.

References: Dehnen 1993, MNRAS 265, 250; Tremaine et al. 1994, AJ 107, 634; Osipkov 1979, SvAL 5,
42; Merritt 1985, AJ 90, 1027; Hernquist 1990, ApJ 356, 359; Binney & Tremaine 2008, Galactic
Dynamics, 2nd ed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputError
from .spherical import phase_space, radii, tf_phase_space, tf_safe_norm, tf_vectors
from .validation import finite_matrix, positive_number

#: Names of the label columns (gamma, a / r_a) of conditional Dehnen catalogues and densities.
LABEL_NAMES = ("gamma", "ra_inverse")
#: gamma must lie in [0, GAMMA_MAX).
GAMMA_MAX = 3.0
#: Gauss-Legendre nodes of the Eddington quadrature (relative error <= 2e-9 for f1, ~1e-12 for f0).
N_NODES = 48

_t, _w = np.polynomial.legendre.leggauss(N_NODES)
_NODES = 0.5 * (_t + 1.0)  # on [0, 1]
_WEIGHTS = 0.5 * _w
_ONE_MINUS_T2 = (1.0 - _NODES) * (1.0 + _NODES)
_LOG_NORM = math.log(2.0 / (math.sqrt(8.0) * math.pi**2))
# Grid of ln(r_Q / a) on which max_ra_inverse searches for the most negative f1 / f0, then refines.
_LIMIT_GRID = np.linspace(-25.0, 25.0, 2001)


# ---- the dimensionless DF (G = M = a = 1) ------------------------------------------------------


def _log_exprel(z: np.ndarray) -> np.ndarray:
    """ln[(e^z - 1) / z] without overflow or cancellation (0 at z = 0)."""
    az = np.abs(z)
    safe = np.where(az > 0, az, 1.0)
    return np.where(az > 0, np.maximum(z, 0.0) + np.log(-np.expm1(-safe)) - np.log(safe), 0.0)


def _df_integrals(L: np.ndarray, gamma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log prefactor, I0, I1) with f0 = e^prefactor I0, f1 = e^prefactor I1 (module docstring)."""
    L = np.asarray(L, dtype=np.float64)
    g = 2.0 - gamma
    Lc = L[..., None]
    s = Lc * _ONE_MINUS_T2
    y, w = np.exp(-s), -np.expm1(-s)
    u = Lc * _NODES**2
    kernel = np.exp(-2.0 * u - 0.5 * _log_exprel(g * u))
    r0 = w * w * (2.0 * gamma + y * (4.0 + (8.0 - 2.0 * gamma) * y))
    r1 = y**3 * (2.0 - (8.0 - 2.0 * gamma) * w)
    with np.errstate(divide="ignore"):
        log_pre = (
            _LOG_NORM
            + math.log((3.0 - gamma) / (4.0 * math.pi))
            + 0.5 * np.log(L)
            + (2.0 + 0.5 * g) * L
        )
    return log_pre, (r0 * kernel) @ _WEIGHTS, (r1 * kernel) @ _WEIGHTS


def _log_f_of_l(L: np.ndarray, gamma: float, ra_inverse: float) -> np.ndarray:
    """log f(Q) in model units as a function of L = -ln y_Q > 0 (-inf for L <= 0 or f <= 0)."""
    L = np.asarray(L, dtype=np.float64)
    positive = L > 0
    log_pre, i0, i1 = _df_integrals(np.where(positive, L, 1.0), gamma)
    total = i0 + ra_inverse**2 * i1
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(
            positive & (total > 0), log_pre + np.log(np.where(total > 0, total, 1.0)), -np.inf
        )


def _l_of_q(q: np.ndarray, g: float) -> np.ndarray:
    """L = -ln y_Q = -ln(1 - g Q) / g for Q > 0 in model units (Q for g = 0); Q where Q <= 0."""
    q = np.asarray(q, dtype=np.float64)
    z = g * q
    use = (z != 0) & (q > 0)
    safe = np.where(use, z, 0.5)
    return q * np.where(use, -np.log1p(-safe) / safe, 1.0)


def _psi_of_lambda(lam: np.ndarray, g: float) -> np.ndarray:
    """Psi (model units) from lambda = -ln y = ln(1 + a/r): (1 - e^{-g lambda}) / g.

    Written lambda exprel(-g lambda), which has no cancellation and covers g = 0.
    """
    return lam * np.exp(_log_exprel(-g * lam))


def _l_of_phase_space(r: np.ndarray, kinetic: np.ndarray, gamma: float) -> np.ndarray:
    """L = -ln y_Q for radius r and 'kinetic' term K = Psi - Q (model units); L <= 0 iff unbound.

    Away from the centre L = Q h(g Q) with Q = Psi - K, h(z) = -ln(1 - z) / z. Near the centre of a
    gamma < 2 model (g Q > 1/2) Psi -> 1/g and 1 - g Q would cancel; there 1 - g Q = y^g + g K
    exactly,
    so L = -ln(y^g + g K) / g. At r = 0 that is -ln(g K) / g (gamma < 2) and +inf for gamma >= 2.
    """
    g = 2.0 - gamma
    centre = r <= 0
    lam = np.log1p(1.0 / np.where(centre, 1.0, r))
    q = _psi_of_lambda(lam, g) - kinetic
    central = (g > 0) & ((g * q > 0.5) | centre)
    with np.errstate(divide="ignore", invalid="ignore"):
        near = -np.log(np.where(centre, 0.0, np.exp(-g * lam)) + g * kinetic) / (
            g if g > 0 else 1.0
        )
    outer = np.where(centre, np.inf, _l_of_q(np.where(central | centre, 0.0, q), g))
    return np.where(central, near, outer)


@functools.lru_cache(maxsize=256)
def _ra_inverse_limit(gamma: float) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):
        return _limit_search(gamma)


def _limit_search(gamma: float) -> float:
    from scipy.optimize import minimize_scalar

    def log_ratio(ell):  # ln[f0 / (-f1)] where f1 < 0, else +inf
        L = np.log1p(np.exp(-np.asarray(ell, dtype=np.float64)))
        _, i0, i1 = _df_integrals(L, gamma)
        return np.where(i1 < 0, np.log(i0) - np.log(np.where(i1 < 0, -i1, 1.0)), np.inf)

    values = log_ratio(_LIMIT_GRID)
    if not np.isfinite(values).any():
        return math.inf
    k = int(np.argmin(values))
    lo, hi = _LIMIT_GRID[max(k - 1, 0)], _LIMIT_GRID[min(k + 1, _LIMIT_GRID.size - 1)]
    best = minimize_scalar(
        lambda e: float(log_ratio(e)), bounds=(lo, hi), method="bounded", options={"xatol": 1e-10}
    )
    return math.exp(0.5 * min(float(best.fun), float(values[k])))


def max_ra_inverse(gamma: float) -> float:
    """Largest a / r_a for which the Osipkov-Merritt gamma-model has f(Q) >= 0 (inf if none).

    f = f0 + (a/r_a)^2 f1 is linear in (a/r_a)^2 with f0 > 0, so the limit is the minimum over Q
    with f1 < 0 of sqrt(f0(Q) / -f1(Q)), found on a grid in ln r_Q in [-25, 25] a and refined with
    a bounded scalar
    minimiser (relative accuracy ~1e-9). E.g. the Hernquist model needs r_a >= 0.2027 a.
    """
    return _ra_inverse_limit(check_gamma(gamma))


def check_gamma(gamma: Any) -> float:
    """gamma as a float in [0, 3), else InputError."""
    try:
        value = float(gamma)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(gamma, (bool, np.bool_)) or not (0.0 <= value < GAMMA_MAX):
        raise InputError(f"gamma = {gamma!r}: expected the Dehnen inner slope in [0, 3)")
    return value


def check_label(gamma: Any, ra_inverse: Any) -> tuple[float, float]:
    """(gamma, a/r_a) as floats if they give a valid model (f >= 0), else InputError naming the
    limit.
    """
    gamma = check_gamma(gamma)
    try:
        kappa = float(ra_inverse)
    except (TypeError, ValueError):
        kappa = math.nan
    if isinstance(ra_inverse, (bool, np.bool_)) or not (math.isfinite(kappa) and kappa >= 0):
        raise InputError(f"ra_inverse = {ra_inverse!r}: expected a / r_a >= 0 (0 for isotropic)")
    limit = _ra_inverse_limit(gamma)
    if kappa > limit:
        raise InputError(
            f"ra_inverse = {kappa:g} (a/r_a) gives a negative Osipkov-Merritt DF for "
            f"gamma = {gamma:g}: need a/r_a <= {limit:.6g} (r_a >= {1.0 / limit:.6g} a)"
        )
    return gamma, kappa


def check_labels(labels: Any) -> np.ndarray:
    """labels [N, 2] = (gamma, a/r_a) as float64, each row checked by :func:`check_label`."""
    labels = finite_matrix(labels, "labels", 2, "[N, 2] = (gamma, a/r_a)")
    for gamma, kappa in np.unique(labels, axis=0):
        check_label(gamma, kappa)
    return labels


# ---- the model ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dehnen:
    """Dehnen gamma-model with Osipkov-Merritt anisotropy (a/r_a = ``ra_inverse``; 0 = isotropic).

    Example::

        >>> d = Dehnen(gamma=1.5, ra_inverse=0.5)
        >>> float(d.enclosed_mass(1.0))          # M (r / (r + a))^(3 - gamma) at r = a
        0.3535533905932738

    Reference: Dehnen 1993, MNRAS 265, 250; Osipkov 1979; Merritt 1985.
    """

    gamma: float = 1.0
    ra_inverse: float = 0.0
    M: float = 1.0
    a: float = 1.0
    G: float = 1.0

    def __post_init__(self):
        gamma, kappa = check_label(self.gamma, self.ra_inverse)
        object.__setattr__(self, "gamma", gamma)
        object.__setattr__(self, "ra_inverse", kappa)
        for name in ("M", "a", "G"):
            positive_number(getattr(self, name), f"Dehnen parameter {name}")

    # ---- derived scales -----------------------------------------------------------------------
    @property
    def label(self) -> tuple[float, float]:
        """(gamma, a / r_a), the conditioning label (``LABEL_NAMES``)."""
        return (self.gamma, self.ra_inverse)

    @property
    def anisotropy_radius(self) -> float:
        """r_a = a / ra_inverse (inf for the isotropic model)."""
        return self.a / self.ra_inverse if self.ra_inverse > 0 else math.inf

    @property
    def velocity_scale(self) -> float:
        """v_g = sqrt(G M / a)."""
        return math.sqrt(self.G * self.M / self.a)

    @property
    def energy_scale(self) -> float:
        """G M / a."""
        return self.G * self.M / self.a

    @property
    def _g(self) -> float:
        return 2.0 - self.gamma

    @property
    def _log_df_scale(self) -> float:
        """log[M / (a^3 v_g^3)]: f in physical units over f in model units."""
        return math.log(self.M / (self.a**3 * self.velocity_scale**3))

    # ---- structure (NumPy, r of any shape) ----------------------------------------------------
    def density(self, r) -> np.ndarray:
        """rho(r) = (3 - gamma) M a / (4 pi r^gamma (r + a)^(4 - gamma)). Dehnen (1993) eq. 1."""
        r = radii(r)
        with np.errstate(divide="ignore"):
            return (
                (3.0 - self.gamma)
                * self.M
                * self.a
                / (4.0 * np.pi)
                * r ** (-self.gamma)
                * (r + self.a) ** (self.gamma - 4.0)
            )

    def enclosed_mass(self, r) -> np.ndarray:
        """M(<r) = M (r / (r + a))^(3 - gamma). Dehnen (1993) eq. 2."""
        return self.M * _y(radii(r), self.a) ** (3.0 - self.gamma)

    def relative_potential(self, r) -> np.ndarray:
        """Psi(r) = (G M / a) (1 - (r/(r+a))^(2-gamma)) / (2 - gamma); (G M / a) ln(1 + a/r) at
        gamma = 2. Dehnen (1993) eq. 3 (sign flipped). Finite at r = 0 only for gamma < 2.
        """
        r = radii(r)
        with np.errstate(divide="ignore"):
            lam = np.log1p(self.a / r)
        finite = np.isfinite(lam)
        psi0 = 1.0 / self._g if self._g > 0 else np.inf
        return self.energy_scale * np.where(
            finite, _psi_of_lambda(np.where(finite, lam, 1.0), self._g), psi0
        )

    def potential(self, r) -> np.ndarray:
        """Phi(r) = -Psi(r) (< 0)."""
        return -self.relative_potential(r)

    def circular_speed(self, r) -> np.ndarray:
        """v_c(r) = sqrt(G M(<r) / r)."""
        r = radii(r)
        with np.errstate(divide="ignore", invalid="ignore"):
            v2 = self.G * self.enclosed_mass(r) / r
        return np.sqrt(
            np.where(
                r > 0,
                v2,
                0.0 if self.gamma < 1 else (self.energy_scale if self.gamma == 1 else np.inf),
            )
        )

    def escape_speed(self, r) -> np.ndarray:
        """v_esc(r) = sqrt(2 Psi(r)) (infinite at r = 0 for gamma >= 2)."""
        return np.sqrt(2.0 * self.relative_potential(r))

    def acceleration(self, x) -> np.ndarray:
        """g(x) = -G M(<r) x / r^3 = -G M (r/(r+a))^(3-gamma) x / r^3;  x: [N, 3] -> [N, 3].

        Zero at x = 0.
        """
        x = finite_matrix(x, "x", 3)
        r = np.linalg.norm(x, axis=1, keepdims=True)
        safe_r = np.where(r > 0, r, 1.0)
        m = self.M * _y(safe_r, self.a) ** (3.0 - self.gamma)
        return np.where(r > 0, -self.G * m * x / safe_r**3, 0.0)

    def beta(self, r) -> np.ndarray:
        """Osipkov-Merritt anisotropy beta(r) = r^2 / (r^2 + r_a^2)."""
        k2r2 = (self.ra_inverse * radii(r) / self.a) ** 2
        return k2r2 / (1.0 + k2r2)

    # ---- DF (NumPy) -----------------------------------------------------------------------------
    def om_energy(self, x, v) -> np.ndarray:
        """Q = Psi(|x|) - |v|^2/2 - |x cross v|^2 / (2 r_a^2): x, v [N, 3] -> [N]; bound: Q > 0."""
        x, v = phase_space(x, v)
        return self.relative_potential(np.linalg.norm(x, axis=1)) - self._kinetic(x, v)

    def _kinetic(self, x: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Psi - Q = |v|^2 / 2 + (a/r_a)^2 |x cross v|^2 / (2 a^2)  (physical units)."""
        l2 = np.sum(np.cross(x, v) ** 2, axis=1)
        return 0.5 * np.sum(v * v, axis=1) + 0.5 * (self.ra_inverse / self.a) ** 2 * l2

    def log_f(self, Q) -> np.ndarray:
        """log f(Q) for Q of any shape (physical units); -inf for Q <= 0 (module docstring)."""
        q = np.asarray(Q, dtype=np.float64) / self.energy_scale
        with np.errstate(invalid="ignore"):
            L = np.where(q > 0, _l_of_q(np.where(q > 0, q, 0.0), self._g), 0.0)
        return _log_f_of_l(L, self.gamma, self.ra_inverse) + self._log_df_scale

    def f(self, Q) -> np.ndarray:
        """f(Q) = exp(log_f(Q)): the DF as a function of Q (0 for Q <= 0)."""
        return np.exp(self.log_f(Q))

    def log_df(self, x, v) -> np.ndarray:
        """log f(x, v);  x, v: [N, 3] -> [N]; -inf where Q <= 0. A mass density (integral = M)."""
        x, v = phase_space(x, v)
        r = np.linalg.norm(x, axis=1) / self.a
        kinetic = self._kinetic(x, v) / self.energy_scale
        L = _l_of_phase_space(r, kinetic, self.gamma)
        finite = np.isfinite(L)
        log_f = _log_f_of_l(np.where(finite, L, 1.0), self.gamma, self.ra_inverse)
        return np.where(finite, log_f, np.inf) + self._log_df_scale

    def df(self, x, v) -> np.ndarray:
        """f(x, v) = exp(log_df): [N], 0 where unbound."""
        return np.exp(self.log_df(x, v))

    # ---- Jeans profiles -----------------------------------------------------------------------
    def sigma_r(self, r) -> np.ndarray:
        """Radial dispersion from the Osipkov-Merritt Jeans equation (Binney & Tremaine 2008).

            (1 + r^2/r_a^2) rho sigma_r^2 = int_r^inf (1 + r'^2/r_a^2) rho(r') G M(<r') / r'^2 dr'.

        In y = r / (r + a) (model units) the integrand is C y^(1 - 2 gamma) P(y) dy with
        P = (1 - y)^4 + (a/r_a)^2 y^2 (1 - y)^2, integrated by 96-point Gauss-Legendre in
        s = ln y' / ln y (log-spaced y' in [y, 1]); sigma_r^2 = int / (y^-gamma P(y)).
        """
        r = radii(r)
        shape = r.shape
        rr = np.where(r > 0, r / self.a, 1.0).ravel()
        t, w = np.polynomial.legendre.leggauss(96)
        s, w = 0.5 * (t + 1.0), 0.5 * w
        ln_y = -np.log1p(1.0 / rr)[:, None]  # ln y < 0
        ln_t = ln_y * (1.0 - s)  # y' = y^(1 - s), from y to 1
        yt, wt = np.exp(ln_t), -np.expm1(ln_t)
        k2 = self.ra_inverse**2

        def p(y_, w_):
            return w_**4 + k2 * y_**2 * w_**2

        integrand = np.exp((2.0 - 2.0 * self.gamma) * ln_t) * p(yt, wt)
        integral = -ln_y[:, 0] * (integrand @ w)
        y, wy = np.exp(ln_y[:, 0]), -np.expm1(ln_y[:, 0])
        s2 = integral / (np.exp(-self.gamma * ln_y[:, 0]) * p(y, wy))
        s2 = np.where(r.ravel() > 0, s2, np.nan)
        return np.sqrt(self.energy_scale * s2).reshape(shape)

    def sigma_t(self, r) -> np.ndarray:
        """One tangential dispersion sigma_theta = sigma_phi = sqrt(1 - beta(r)) sigma_r(r)."""
        return np.sqrt(1.0 - self.beta(r)) * self.sigma_r(r)

    # ---- TensorFlow ---------------------------------------------------------------------------
    def tf_log_df(self, x, v):
        """TensorFlow log f(x, v): x, v [N, 3] -> [N] in the dtype of x; -inf where Q <= 0.

        Differentiable (gradients finite at bound points with r > 0, zero at unbound points). Same
        quadrature as :meth:`log_df`; agrees with it to float32 round-off in float32.
        """
        import tensorflow as tf

        x, v = tf_phase_space(x, v)
        dtype = x.dtype
        log_f = tf_log_df(
            x / tf.constant(self.a, dtype),
            v / tf.constant(self.velocity_scale, dtype),
            tf.constant(self.label, dtype),
        )
        return log_f + tf.constant(self._log_df_scale, dtype)

    def tf_df(self, x, v):
        """TensorFlow f(x, v) = exp(tf_log_df)."""
        import tensorflow as tf

        return tf.exp(self.tf_log_df(x, v))

    def tf_acceleration(self, x):
        """TensorFlow g(x) = -G M (r/(r+a))^(3-gamma) x / r^3: x [N, 3] -> [N, 3]; 0 at x = 0."""
        import tensorflow as tf

        x = tf_vectors(x, "x")
        dtype = x.dtype
        r = tf_safe_norm(x)[:, None]
        safe_r = tf.where(r > 0, r, tf.ones_like(r))
        a = tf.constant(self.a, dtype)
        m = tf.constant(self.M, dtype) * tf.pow(
            safe_r / (safe_r + a), tf.constant(3.0 - self.gamma, dtype)
        )
        g = -tf.constant(self.G, dtype) * m * x / safe_r**3
        return tf.where(r > 0, g, tf.zeros_like(g))


# ---- TensorFlow DF for any labels (model units) ------------------------------------------------


def tf_log_df(x, v, labels):
    """log f(x, v | gamma, a/r_a) in model units (G = M = a = 1), TensorFlow, differentiable.

    Args:
        x: [N, 3] positions in model units (a = 1); the result has x's dtype.
        v: [N, 3] velocities in model units (sqrt(G M / a)).
        labels: [N, 2] per-row (gamma, a/r_a), or [2] one label for all rows. Not validated in the
            graph: check them once with :func:`check_labels` (f < 0 beyond :func:`max_ra_inverse`).

    Returns:
        [N] log f, -inf where Q <= 0 (unbound). Per-row labels cost nothing extra: the Eddington
        integral is evaluated by the same N_NODES-point quadrature for every row (module
        docstring), [N, N_NODES] intermediates; usable inside ``tf.function`` and under XLA.
    """
    import tensorflow as tf

    x, v = tf_phase_space(x, v)
    dtype = x.dtype
    labels = tf.cast(tf.convert_to_tensor(labels), dtype)
    if labels.shape.rank == 1:
        labels = labels[None, :]
    if labels.shape.rank != 2 or (labels.shape[1] is not None and labels.shape[1] != 2):
        raise InputError(
            f"labels must have shape [N, 2] or [2] = (gamma, a/r_a), got {labels.shape}"
        )
    gamma, kappa = labels[:, 0], labels[:, 1]
    g = 2.0 - gamma
    k2 = kappa * kappa
    r = tf_safe_norm(x)
    l2 = tf.reduce_sum(tf.square(tf.linalg.cross(x, v)), axis=1)
    kinetic = 0.5 * tf.reduce_sum(v * v, axis=1) + 0.5 * k2 * l2
    L = _tf_l_of_phase_space(r, kinetic, g)
    bound = L > 0
    safe_L = tf.where(bound, L, tf.ones_like(L))
    log_pre, i0, i1 = _tf_df_integrals(safe_L, gamma, g)
    total = i0 + k2 * i1
    positive = bound & (total > 0)
    log_f = log_pre + tf.math.log(tf.where(positive, total, tf.ones_like(total)))
    return tf.where(positive, log_f, tf.constant(-np.inf, dtype))


def _tf_exprel_log(z):
    """TF twin of :func:`_log_exprel` (zero gradient at z = 0)."""
    import tensorflow as tf

    az = tf.abs(z)
    nonzero = az > 0
    safe = tf.where(nonzero, az, tf.ones_like(az))
    value = tf.nn.relu(z) + tf.math.log(-tf.math.expm1(-safe)) - tf.math.log(safe)
    return tf.where(nonzero, value, tf.zeros_like(z))


def _tf_df_integrals(L, gamma, g):
    """TF twin of :func:`_df_integrals` for per-row gamma (all [N])."""
    import tensorflow as tf

    dtype = L.dtype
    nodes2 = tf.constant(_NODES**2, dtype)
    one_minus = tf.constant(_ONE_MINUS_T2, dtype)
    weights = tf.constant(_WEIGHTS, dtype)
    Lc, gc, gam = L[:, None], g[:, None], gamma[:, None]
    s = Lc * one_minus
    y, w = tf.exp(-s), -tf.math.expm1(-s)
    u = Lc * nodes2
    kernel = tf.exp(-2.0 * u - 0.5 * _tf_exprel_log(gc * u))
    r0 = w * w * (2.0 * gam + y * (4.0 + (8.0 - 2.0 * gam) * y))
    r1 = y * y * y * (2.0 - (8.0 - 2.0 * gam) * w)
    i0 = tf.reduce_sum(r0 * kernel * weights, axis=1)
    i1 = tf.reduce_sum(r1 * kernel * weights, axis=1)
    log_pre = (
        tf.constant(_LOG_NORM, dtype)
        + tf.math.log((3.0 - gamma) / (4.0 * math.pi))
        + 0.5 * tf.math.log(L)
        + (2.0 + 0.5 * g) * L
    )
    return log_pre, i0, i1


def _tf_l_of_phase_space(r, kinetic, g):
    """TF twin of :func:`_l_of_phase_space` with per-row g; L <= 0 when unbound."""
    import tensorflow as tf

    dtype = r.dtype
    positive_r = r > 0
    safe_r = tf.where(positive_r, r, tf.ones_like(r))
    lam = tf.math.log1p(1.0 / safe_r)
    psi = lam * tf.exp(_tf_exprel_log(-g * lam))
    q = psi - kinetic
    z = g * q
    central = (g > 0) & (z > 0.5)
    nonzero = tf.not_equal(z, 0.0) & ~central & (q > 0)
    safe_z = tf.where(nonzero, z, tf.ones_like(z) * 0.25)
    L_outer = q * tf.where(nonzero, -tf.math.log1p(-safe_z) / safe_z, tf.ones_like(z))
    safe_g = tf.where(central, g, tf.ones_like(g))
    arg = tf.where(central, tf.exp(-safe_g * lam) + safe_g * kinetic, tf.ones_like(g) * 0.5)
    L_central = -tf.math.log(arg) / safe_g
    L = tf.where(central, L_central, L_outer)
    # r = 0: L = +inf for gamma >= 2 (Psi infinite); for gamma < 2 the central formula with y = 0.
    return tf.where(
        positive_r,
        L,
        tf.where(
            g > 0,
            -tf.math.log(
                tf.maximum(g * kinetic, tf.constant(np.finfo(dtype.as_numpy_dtype).tiny, dtype))
            )
            / tf.where(g > 0, g, tf.ones_like(g)),
            tf.constant(np.inf, dtype),
        ),
    )


# ---- shared helpers -----------------------------------------------------------------------------


def _y(r: np.ndarray, a: float) -> np.ndarray:
    """y = r / (r + a), accurate at r -> 0 and 1 at r = inf."""
    with np.errstate(divide="ignore"):
        return 1.0 / (1.0 + a / r)














__all__ = [
    "Dehnen",
    "tf_log_df",
    "max_ra_inverse",
    "check_gamma",
    "check_label",
    "check_labels",
    "LABEL_NAMES",
    "GAMMA_MAX",
    "N_NODES",
]
