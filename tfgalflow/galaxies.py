"""A toy galaxy population whose star distribution is known exactly (issue #16, GalacticFlow use).

Each galaxy has five physical parameters θ = (log M*, R_d, f_b, g, s) drawn from priors
(:func:`draw_parameters`), and its stars are 8-D events

    w = (x, y, z [kpc], v_x, v_y, v_z [km/s], [Fe/H] [dex], age τ [Gyr])

drawn exactly from a mixture p(w | θ) = (1 - f_b) p_disc(w | θ) + f_b p_bulge(w | θ) whose
components are products of known conditionals (so the log density is exact, :func:`log_prob`):

Disc (R, φ cylindrical; all scales from θ):

    p(x, y, z)      = exp(-R / R_d) / (2π R_d^2)  ·  sech^2(z / z_0) / (2 z_0),   z_0 = 0.15 R_d
    (v_R, v_φ, v_z) ~ N((0, v_c(R), 0), diag(σ_R^2, σ_φ^2, σ_z^2)) given the position,
    v_c(R)          = V_f R / sqrt(R^2 + r_t^2),   r_t = 0.5 R_d,   V_f = 200 (M*/10^10.5)^(1/4)
    σ_R(R)          = V_f (0.08 + 0.3 exp(-R / 2R_d)),   σ_φ = 0.7 σ_R,   σ_z = 0.5 σ_R
    ln τ            ~ N(ln τ_d(R), s^2),   τ_d(R) = 6 exp(-0.2 R / R_d)   (inside-out ages)
    [Fe/H]          ~ N(Z_0 + g R - 0.04 (τ - 5), 0.08^2),   Z_0 = 0.1 + 0.3 (log M* - 10.5)

Bulge (Hernquist 1990 sphere of scale a_b = 0.2 R_d, non-rotating):

    p(x, y, z)      = a_b / (2π r (r + a_b)^3)
    v               ~ N(0, σ_b(r)^2 I_3),   σ_b(r) = V_f (0.15 + 0.35 a_b / (r + a_b))
    ln τ            ~ N(ln 10, 0.1^2)
    [Fe/H]          ~ N(Z_0 + 0.1 - 0.04 (τ - 5), 0.2^2)

The velocity map (v_R, v_φ) -> (v_x, v_y) is a rotation (unit Jacobian), the age density carries
the 1/τ of the log-normal. Toy, not dynamically self-consistent (no Jeans equilibrium, no
asymmetric drift): what matters is that p(w | θ) is exact and smooth in θ.

Labels: the five parameters, plus ``n_projections`` noisy linear projections of the standardised
parameters (noise 0.3) and ``n_noise`` pure N(0, 1) columns, fixed per galaxy, standing in for the
reference pipeline's image latents (:func:`draw_labels`).

Input as GalacticFlow keeps it (:func:`write_population` / :func:`load_population`): one ``.npy``
of stars [n, 8] per galaxy and a CSV table of galaxy properties; cleaning keeps stars with
r = |x| below the galaxy's ``radius_percentile`` percentile radius and drops galaxies with fewer
than ``min_stars`` stars. Given the cut radius r_c (the first excluded order statistic), the kept
stars are i.i.d. from p(w | θ) 1[r < r_c] / F(r_c); :func:`log_prob` takes ``r_cut`` for that
density (F by 200-point Gauss-Legendre quadrature for the disc, closed form for the bulge).

Reference: Hernquist, L. 1990, ApJ 356, 359 (bulge); Freeman 1970 (exponential disc); van der
Kruit & Searle 1981 (sech^2 vertical profile); GalacticFlow (Buck et al.) for the data layout.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import validation
from .errors import FileError, InputError

EVENT_NAMES = ("x", "y", "z", "vx", "vy", "vz", "feh", "age")
PARAM_NAMES = ("log_mstar", "r_disc", "bulge_fraction", "feh_gradient", "age_spread")
TABLE_FILE = "galaxies.csv"
DIM = len(EVENT_NAMES)

# priors: log M* ~ U(9.5, 11), log10 R_d = 0.4 + 0.25 (log M* - 10) + U(-0.12, 0.12), ...
LOG_MSTAR_RANGE = (9.5, 11.0)
SIZE_SCATTER = 0.12
BULGE_RANGE = (0.05, 0.35)
GRADIENT_RANGE = (-0.08, -0.02)     # dex / kpc
AGE_SPREAD_RANGE = (0.15, 0.45)     # sigma of ln(age)
PROJECTION_NOISE = 0.3
FEH_SCATTER_DISC = 0.08
FEH_SCATTER_BULGE = 0.2
_LOG_2PI = math.log(2.0 * math.pi)


# ---- parameters and labels ----------------------------------------------------------------------

def draw_parameters(n: int, rng: np.random.Generator) -> np.ndarray:
    """θ [n, 5] = (log M*, R_d [kpc], f_b, g [dex/kpc], s) from the priors of the docstring."""
    n = validation.integer(n, "n")
    log_m = rng.uniform(*LOG_MSTAR_RANGE, n)
    r_d = 10.0 ** (0.4 + 0.25 * (log_m - 10.0) + rng.uniform(-SIZE_SCATTER, SIZE_SCATTER, n))
    return np.stack([log_m, r_d, rng.uniform(*BULGE_RANGE, n), rng.uniform(*GRADIENT_RANGE, n),
                     rng.uniform(*AGE_SPREAD_RANGE, n)], axis=1)


def standardised_parameters(params: np.ndarray) -> np.ndarray:
    """θ mapped to roughly zero mean, unit spread using the prior ranges: [n, 5]."""
    p = _params(params)
    lo = np.array([LOG_MSTAR_RANGE[0], 0.0, BULGE_RANGE[0], GRADIENT_RANGE[0],
                   AGE_SPREAD_RANGE[0]])
    hi = np.array([LOG_MSTAR_RANGE[1], 0.0, BULGE_RANGE[1], GRADIENT_RANGE[1],
                   AGE_SPREAD_RANGE[1]])
    u = (p - (lo + hi) / 2) / ((hi - lo) / math.sqrt(12.0) + (hi == lo))
    u[:, 1] = (np.log10(p[:, 1]) - 0.4 - 0.25 * (p[:, 0] - 10.0)) / (SIZE_SCATTER / math.sqrt(3))
    return u


def draw_labels(params: np.ndarray, rng: np.random.Generator, n_projections: int = 4,
                n_noise: int = 4) -> tuple[np.ndarray, tuple[str, ...]]:
    """Labels [n, 5 + n_projections + n_noise] and their names: θ, then "image latents".

    latent_proj_k = W_k · u + 0.3 ε (u the standardised θ, W_k a random unit vector, one W for
    the population, ε ~ N(0, 1) per galaxy); latent_noise_k ~ N(0, 1): no information at all.
    """
    p = _params(params)
    w = rng.standard_normal((n_projections, len(PARAM_NAMES)))
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    proj = standardised_parameters(p) @ w.T + PROJECTION_NOISE * rng.standard_normal(
        (len(p), n_projections))
    noise = rng.standard_normal((len(p), n_noise))
    names = PARAM_NAMES + tuple(f"latent_proj_{k}" for k in range(n_projections)) + tuple(
        f"latent_noise_{k}" for k in range(n_noise))
    return np.concatenate([p, proj, noise], axis=1), names


def _params(params: Any) -> np.ndarray:
    p = validation.finite_matrix(params, "params", expected="[n, >= 5] (log M*, R_d, f_b, g, s)")
    if p.shape[1] < len(PARAM_NAMES):
        raise InputError(f"params: expected [n, >= 5] (log M*, R_d, f_b, g, s), got {p.shape}")
    return p[:, :len(PARAM_NAMES)]


@dataclass(frozen=True)
class Scales:
    """Derived scales of each row of θ (arrays [n]): see the module docstring."""

    log_m: np.ndarray
    r_d: np.ndarray
    f_b: np.ndarray
    gradient: np.ndarray
    age_spread: np.ndarray

    @classmethod
    def of(cls, params: Any) -> "Scales":
        """The scales of θ rows [n, >= 5]; InputError unless R_d > 0, f_b in [0, 1], s > 0."""
        p = _params(params)
        if np.any(p[:, 1] <= 0) or np.any((p[:, 2] < 0) | (p[:, 2] > 1)) or np.any(p[:, 4] <= 0):
            raise InputError("params: expected R_d > 0, 0 <= f_b <= 1 and s > 0 in every row")
        return cls(*p.T)

    def rows(self, mask: np.ndarray) -> "Scales":
        """The scales of the rows selected by ``mask``."""
        return Scales(*(getattr(self, f)[mask] for f in
                        ("log_m", "r_d", "f_b", "gradient", "age_spread")))

    @property
    def z0(self) -> np.ndarray:
        """Disc scale height z_0 = 0.15 R_d (sech^2 profile) [kpc]."""
        return 0.15 * self.r_d

    @property
    def a_b(self) -> np.ndarray:
        """Bulge Hernquist scale a_b = 0.2 R_d [kpc]."""
        return 0.2 * self.r_d

    @property
    def v_flat(self) -> np.ndarray:
        """Flat rotation speed V_f = 200 (M*/10^10.5)^(1/4) [km/s]."""
        return 200.0 * 10.0 ** (0.25 * (self.log_m - 10.5))

    @property
    def z_0(self) -> np.ndarray:
        """Central metallicity Z_0 = 0.1 + 0.3 (log M* - 10.5) [dex]."""
        return 0.1 + 0.3 * (self.log_m - 10.5)

    def v_circ(self, r_cyl: np.ndarray) -> np.ndarray:
        """v_c(R) = V_f R / sqrt(R^2 + r_t^2), r_t = R_d / 2 [km/s]."""
        return self.v_flat * r_cyl / np.sqrt(r_cyl**2 + (0.5 * self.r_d) ** 2)

    def sigma_disc(self, r_cyl: np.ndarray) -> np.ndarray:
        """(σ_R, σ_φ, σ_z) [n, 3] of the disc at R [km/s]."""
        s_r = self.v_flat * (0.08 + 0.3 * np.exp(-r_cyl / (2.0 * self.r_d)))
        return np.stack([s_r, 0.7 * s_r, 0.5 * s_r], axis=1)

    def sigma_bulge(self, r: np.ndarray) -> np.ndarray:
        """σ_b(r) = V_f (0.15 + 0.35 a_b / (r + a_b)) [km/s]."""
        return self.v_flat * (0.15 + 0.35 * self.a_b / (r + self.a_b))

    def disc_age(self, r_cyl: np.ndarray) -> np.ndarray:
        """Median disc age τ_d(R) = 6 exp(-0.2 R / R_d) [Gyr]."""
        return 6.0 * np.exp(-0.2 * r_cyl / self.r_d)


# ---- exact sampling -----------------------------------------------------------------------------

def sample(params: Any, rng: np.random.Generator) -> np.ndarray:
    """One star w [8] per row of θ [n, >= 5] (extra label columns ignored): [n, 8] float64."""
    sc = Scales.of(params)
    n = len(sc.r_d)
    bulge = rng.random(n) < sc.f_b
    w = np.empty((n, DIM))
    # disc: R ~ Gamma(2, R_d) (Σ ∝ e^{-R/R_d}), φ uniform, z logistic of scale z_0/2 (sech^2)
    r_cyl = rng.gamma(2.0, sc.r_d)
    phi = rng.uniform(0.0, 2.0 * np.pi, n)
    u = rng.random(n)
    u = np.clip(u, np.finfo(float).tiny, 1.0 - np.finfo(float).epsneg)
    z = 0.5 * sc.z0 * np.log(u / (1.0 - u))
    sig = sc.sigma_disc(r_cyl)
    v_r, v_phi, v_z = (np.array([0.0, 1.0, 0.0])[None] * sc.v_circ(r_cyl)[:, None]
                       + sig * rng.standard_normal((n, 3))).T
    c, s = np.cos(phi), np.sin(phi)
    ln_age = np.log(sc.disc_age(r_cyl)) + sc.age_spread * rng.standard_normal(n)
    age = np.exp(ln_age)
    feh = (sc.z_0 + sc.gradient * r_cyl - 0.04 * (age - 5.0)
           + FEH_SCATTER_DISC * rng.standard_normal(n))
    w[:] = np.stack([r_cyl * c, r_cyl * s, z, v_r * c - v_phi * s, v_r * s + v_phi * c, v_z,
                     feh, age], axis=1)
    # bulge: Hernquist radii from M(<r)/M = r^2/(r+a)^2 = q, isotropic directions
    k = int(bulge.sum())
    if k:
        sb = sc.rows(bulge)
        a = sb.a_b
        q = np.maximum(rng.random(k), np.finfo(float).tiny)
        sq = np.sqrt(q)
        r = a * sq * (1.0 + sq) / (1.0 - q)
        direction = validation.unit_vectors(k, rng)
        vel = sb.sigma_bulge(r)[:, None] * rng.standard_normal((k, 3))
        age_b = np.exp(math.log(10.0) + 0.1 * rng.standard_normal(k))
        feh_b = (sb.z_0 + 0.1 - 0.04 * (age_b - 5.0)
                 + FEH_SCATTER_BULGE * rng.standard_normal(k))
        w[bulge] = np.concatenate([r[:, None] * direction, vel, feh_b[:, None], age_b[:, None]],
                                  axis=1)
    return w


# ---- exact density ------------------------------------------------------------------------------

def component_log_probs(w: Any, params: Any) -> tuple[np.ndarray, np.ndarray]:
    """(log p_disc, log p_bulge) [n] at stars w [n, 8] for θ rows [n, >= 5] (per kpc^3 (km/s)^3
    dex Gyr).
    """
    w = validation.finite_matrix(w, "w", width=DIM, expected="[n, 8] (x,y,z,vx,vy,vz,feh,age)")
    sc = Scales.of(params)
    if len(sc.r_d) != len(w):
        raise InputError(f"params: expected {len(w)} rows (one per star), got {len(sc.r_d)}")
    x, y, z, vx, vy, vz, feh, age = w.T
    with np.errstate(divide="ignore", invalid="ignore"):
        ln_age = np.log(age)
    r_cyl = np.hypot(x, y)
    r = np.sqrt(r_cyl**2 + z**2)
    phi = np.arctan2(y, x)
    c, s = np.cos(phi), np.sin(phi)
    v_r, v_phi = vx * c + vy * s, -vx * s + vy * c
    # disc
    log_pos = -r_cyl / sc.r_d - np.log(2.0 * np.pi * sc.r_d**2)
    log_pos += -2.0 * _log_cosh(z / sc.z0) - np.log(2.0 * sc.z0)
    sig = sc.sigma_disc(r_cyl)
    log_vel = (_log_normal(v_r, 0.0, sig[:, 0]) + _log_normal(v_phi, sc.v_circ(r_cyl), sig[:, 1])
               + _log_normal(vz, 0.0, sig[:, 2]))
    log_age = _log_normal(ln_age, math.log(6.0) - 0.2 * r_cyl / sc.r_d, sc.age_spread) - ln_age
    log_feh = _log_normal(feh, sc.z_0 + sc.gradient * r_cyl - 0.04 * (age - 5.0),
                          FEH_SCATTER_DISC)
    disc = log_pos + log_vel + log_age + log_feh
    # bulge
    with np.errstate(divide="ignore"):
        log_pos_b = np.log(sc.a_b) - np.log(2.0 * np.pi * r) - 3.0 * np.log(r + sc.a_b)
    sb = sc.sigma_bulge(r)
    log_vel_b = (_log_normal(vx, 0.0, sb) + _log_normal(vy, 0.0, sb)
                 + _log_normal(vz, 0.0, sb))
    log_age_b = _log_normal(ln_age, math.log(10.0), 0.1) - ln_age
    log_feh_b = _log_normal(feh, sc.z_0 + 0.1 - 0.04 * (age - 5.0), FEH_SCATTER_BULGE)
    bulge = log_pos_b + log_vel_b + log_age_b + log_feh_b
    bad = ~(age > 0)
    disc[bad] = -np.inf
    bulge[bad] = -np.inf
    return disc, bulge


def log_prob(w: Any, params: Any, r_cut: Any = None) -> np.ndarray:
    """Exact log p(w | θ) [n] of the disc + bulge mixture (module docstring).

    With ``r_cut`` (scalar or [n], kpc) the density of the cleaned stars: p 1[r < r_c] / F(r_c),
    F the mixture's mass fraction inside the sphere r_c (:func:`mass_fraction_within`).
    """
    disc, bulge = component_log_probs(w, params)
    f_b = _params(params)[:, 2]
    with np.errstate(divide="ignore"):
        out = np.logaddexp(np.log1p(-f_b) + disc, np.log(f_b) + bulge)
    if r_cut is None:
        return out
    r_c = np.broadcast_to(np.asarray(r_cut, np.float64), out.shape)
    r = np.linalg.norm(np.asarray(w, np.float64)[:, :3], axis=1)
    # F(r_c) once per distinct (θ, r_c): catalogues repeat one galaxy's row for all its stars
    rows, inverse = np.unique(np.c_[_params(params), r_c], axis=0, return_inverse=True)
    out = out - np.log(mass_fraction_within(rows[:, -1], rows[:, :-1]))[inverse.ravel()]
    return np.where(r < r_c, out, -np.inf)


def mass_fraction_within(r_cut: Any, params: Any, nodes: int = 200) -> np.ndarray:
    """F(r_c) = P(r < r_c | θ) [n] for the mixture: (1 - f_b) F_disc + f_b r_c^2 / (r_c + a_b)^2.

    F_disc(r_c) = ∫_{-r_c}^{r_c} sech^2(z/z_0)/(2 z_0) [1 - (1 + ρ/R_d) e^{-ρ/R_d}] dz,
    ρ = sqrt(r_c^2 - z^2), by ``nodes``-point Gauss-Legendre quadrature (smooth integrand).
    """
    sc = Scales.of(params)
    r_c = np.broadcast_to(np.asarray(r_cut, np.float64), sc.r_d.shape)
    t, wt = np.polynomial.legendre.leggauss(nodes)
    z = 0.5 * r_c[:, None] * (t[None] + 1.0)                     # [0, r_c], doubled by symmetry
    rho = np.sqrt(np.maximum(r_c[:, None] ** 2 - z**2, 0.0)) / sc.r_d[:, None]
    z0 = sc.z0[:, None]
    integrand = np.exp(-2.0 * _log_cosh(z / z0)) / z0 * (-np.expm1(-rho) - rho * np.exp(-rho))
    f_disc = 0.5 * r_c * (integrand * wt[None]).sum(axis=1)
    f_bulge = (r_c / (r_c + sc.a_b)) ** 2
    return (1.0 - sc.f_b) * f_disc + sc.f_b * f_bulge


def _log_normal(x: np.ndarray, mu: Any, sigma: Any) -> np.ndarray:
    return -0.5 * ((x - mu) / sigma) ** 2 - np.log(sigma) - 0.5 * _LOG_2PI


def _log_cosh(u: np.ndarray) -> np.ndarray:
    a = np.abs(u)
    return a + np.log1p(np.exp(-2.0 * a)) - math.log(2.0)


# ---- files: one .npy per galaxy + a CSV table, cleaning ----------------------------------------

def write_population(directory: str | os.PathLike, labels: np.ndarray, names: tuple[str, ...],
                     n_stars: np.ndarray, rng: np.random.Generator) -> Path:
    """Simulate n_stars[i] stars of galaxy i (labels row i) into DIR/galaxy_{i:03d}.npy [n_i, 8]
    and write DIR/galaxies.csv (id, file, n_stars, then the label columns). Returns DIR.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    labels = validation.finite_matrix(labels, "labels")
    n_stars = np.asarray(n_stars, int)
    if n_stars.shape != (len(labels),) or np.any(n_stars < 1):
        raise InputError(f"n_stars: expected {len(labels)} positive counts, got {n_stars.shape}")
    rows = []
    for i, (lab, n) in enumerate(zip(labels, n_stars)):
        file = f"galaxy_{i:03d}.npy"
        stars = sample(np.tile(lab, (n, 1)), rng)
        tmp = out / (file + ".tmp.npy")
        np.save(tmp, stars)
        os.replace(tmp, out / file)
        rows.append([i, file, int(n), *(repr(float(v)) for v in lab)])
    tmp = out / (TABLE_FILE + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "file", "n_stars", *names])
        writer.writerows(rows)
    os.replace(tmp, out / TABLE_FILE)
    return out


def read_table(directory: str | os.PathLike) -> tuple[list[dict], tuple[str, ...]]:
    """The galaxy table: (rows as {id, file, n_stars, labels [C]}, label names)."""
    path = Path(directory) / TABLE_FILE
    try:
        with open(path, newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader)
            body = list(reader)
    except (OSError, StopIteration) as exc:
        raise FileError(f"{path}: cannot read the galaxy table: {exc}") from None
    if header[:3] != ["id", "file", "n_stars"] or len(header) < 3 + len(PARAM_NAMES):
        raise FileError(f"{path}: expected columns id,file,n_stars,<labels...>, got {header}")
    rows = []
    for line in body:
        try:
            rows.append({"id": int(line[0]), "file": line[1], "n_stars": int(line[2]),
                         "labels": np.array([float(v) for v in line[3:]])})
        except (ValueError, IndexError):
            raise FileError(f"{path}: malformed row {line}") from None
    return rows, tuple(header[3:])


@dataclass(frozen=True)
class Population:
    """Cleaned galaxies: stars per galaxy, their labels, and the record of the cuts."""

    ids: np.ndarray                 # [G] galaxy ids kept
    stars: list[np.ndarray]         # G arrays [n_g, 8]
    labels: np.ndarray              # [G, C]
    label_names: tuple[str, ...]
    r_cut: np.ndarray               # [G] cut radius r_c per galaxy (kpc)
    record: dict                    # the cleaning settings and what they removed

    def events(self, ids: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """(events [N, 8], labels [N, C]) of the galaxies ``ids`` (default all), stacked."""
        pick = range(len(self.ids)) if ids is None else [self.index(i) for i in ids]
        x = np.concatenate([self.stars[k] for k in pick])
        lab = np.concatenate([np.tile(self.labels[k], (len(self.stars[k]), 1)) for k in pick])
        return x, lab

    def index(self, galaxy_id: int) -> int:
        """Position of galaxy ``galaxy_id`` in ``ids``; InputError if it was dropped."""
        hits = np.flatnonzero(self.ids == galaxy_id)
        if not hits.size:
            raise InputError(f"galaxy id {galaxy_id} is not in the cleaned population")
        return int(hits[0])


def load_population(directory: str | os.PathLike, radius_percentile: float = 99.5,
                    min_stars: int = 500) -> Population:
    """Read DIR (:func:`write_population` layout) and clean it as the reference pipeline does.

    Per galaxy: r_c = the ``radius_percentile`` percentile of r = |x| (the smallest radius of
    the stars removed, so the kept stars are i.i.d. from the density truncated at r_c); stars
    with r >= r_c are removed; then galaxies with fewer than ``min_stars`` stars are dropped.
    ``Population.record`` holds the settings, stars removed per galaxy and galaxies dropped.
    """
    radius_percentile = float(radius_percentile)
    if not 0.0 < radius_percentile <= 100.0:
        raise InputError(f"radius_percentile = {radius_percentile}: expected a number in (0, 100]")
    min_stars = validation.integer(min_stars, "min_stars", low=0)
    rows, names = read_table(directory)
    ids, stars, labels, cuts, removed, dropped = [], [], [], [], {}, []
    for row in rows:
        path = Path(directory) / row["file"]
        try:
            w = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise FileError(f"{path}: cannot read the stars: {exc}") from None
        if w.ndim != 2 or w.shape[1] != DIM:
            raise FileError(f"{path}: expected stars [n, 8], got {w.shape}")
        r = np.linalg.norm(w[:, :3], axis=1)
        n_keep = int(math.ceil(len(r) * radius_percentile / 100.0))
        order = np.sort(r)
        r_c = float(order[n_keep]) if n_keep < len(r) else math.inf
        kept = w[r < r_c]
        removed[str(row["id"])] = int(len(w) - len(kept))
        if len(kept) < min_stars:
            dropped.append(row["id"])
            continue
        ids.append(row["id"])
        stars.append(kept)
        labels.append(row["labels"])
        cuts.append(r_c)
    record = {"radius_percentile": radius_percentile, "min_stars": min_stars,
              "galaxies_read": len(rows), "galaxies_dropped": dropped,
              "stars_removed": removed}
    return Population(np.array(ids, int), stars, np.array(labels).reshape(len(ids), len(names)),
                      names, np.array(cuts), record)
