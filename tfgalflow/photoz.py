"""Photometric redshifts with an exact posterior: a template simulator, p(z | fluxes, errors),
calibration.

The generative model (all fluxes in units where an AB magnitude of 25 is a flux of 1):

    z ~ p(z) ∝ z exp(-z / z0) on [0, 3],      t ~ uniform over T templates,
    A ~ log-uniform on [A_min, A_max],         σ_b = σ0 exp(e_b),  e_b ~ U[-ε, ε]   (per band b)
    F_b = A m_tb(z) + σ_b n_b,  n_b ~ N(0, 1),

where m_tb(z) is the flux of template t through filter b, observed at redshift z, divided by its
flux through the reference band (so A is the noiseless reference-band flux). Flux errors σ_b do not
depend on (z, t, A), so the magnitude error 1.086 σ_b / F_b grows with magnitude (sky-limited
photometry) and the reported errors carry no information about z beyond the fluxes'. The inputs
are x = (F_1..F_B, σ_1..σ_B), 2B columns.

Templates are smooth power laws f_ν ∝ (λ/5000 Å)^β with a Balmer/4000 Å break (a drop by a factor
1 - D blueward of 4000 Å) and a Lyman-like break (IGM absorption blueward of 1216 Å, nothing below
912 Å). A Balmer break at z ≲ 0.5 and a Lyman break at z ≳ 2.3 fall in the same filters, which
makes posteriors of faint galaxies bimodal (the break confusion of real photo-z surveys).

The exact posterior marginalises template and amplitude:

    p(z | F, σ) ∝ p(z) Σ_t ∫ p(A) Π_b N(F_b; A m_tb(z), σ_b²) dA,

and since the likelihood is Gaussian in A with Â = Σ F m / σ² / a, a = Σ m² / σ², the amplitude
integral is exp(-(c - b²/a)/2) ∫ p(A) exp(-a (A - Â)² / 2) dA (c = Σ F²/σ², b = a Â), computed
with Gauss-Legendre nodes in ln A on [Â - 12/√a, Â + 12/√a] ∩ [A_min, A_max] (vectorised over
objects, redshift grid and templates; chunked over objects).

References: Benítez (2000), "Bayesian photometric redshift estimation" (template marginalisation);
Lupton, Gunn & Szalay (1999) (asinh magnitudes, :func:`features`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from . import validation
from .errors import InputError

Z_MAX = 3.0
#: template parameters (name, slope β of f_ν, Balmer break depth D)
TEMPLATES = (("elliptical", 2.0, 0.65), ("spiral", 1.0, 0.35), ("irregular", 0.3, 0.15),
             ("starburst", -0.3, 0.05))
#: filter centres (Å), log-spaced from u- to y-like bands; Gaussian widths σ_λ = FILTER_WIDTH λ_c
FILTER_CENTRES = tuple(float(c) for c in np.geomspace(3600.0, 10000.0, 10))
FILTER_WIDTH = 0.07
REFERENCE_BAND = 7
N_BANDS = len(FILTER_CENTRES)
N_INPUTS = 2 * N_BANDS


@dataclass(frozen=True)
class Survey:
    """The simulator's constants (defaults are the study's survey).

    Attributes:
        z0: scale of the redshift prior p(z) ∝ z exp(-z / z0) on [0, Z_MAX].
        amplitude_range: (A_min, A_max), reference-band flux range of the log-uniform prior
            (flux 1 = AB magnitude 25; the defaults are magnitudes 26.5 .. 22.5).
        sigma0: median flux error per band (same units).
        sigma_spread: half-width ε of the uniform scatter of ln σ_b around ln σ0 (per object and
            band).
        lyman_depth: fraction of flux absorbed between 912 Å and 1216 Å (rest frame).
    """

    z0: float = 0.7
    amplitude_range: tuple = (0.25, 10.0)
    sigma0: float = 0.1
    sigma_spread: float = 0.35
    lyman_depth: float = 0.8


def template_flux(
    wavelength: np.ndarray, slope: float, balmer: float, lyman_depth: float
) -> np.ndarray:
    """f_ν(λ) of one template at rest-frame wavelengths λ [..] (Å): power law × Balmer × Lyman
    breaks.

    f_ν = (λ / 5000)^β (1 - D s((4000 - λ)/80)) (1 - L s((1216 - λ)/30)) (1 - s((912 - λ)/20)),
    with s the logistic function (smooth steps).
    """
    def step(u):
        return 0.5 * (1.0 + np.tanh(0.5 * u))

    lam = np.asarray(wavelength, np.float64)
    return (
        (lam / 5000.0) ** slope
        * (1.0 - balmer * step((4000.0 - lam) / 80.0))
        * (1.0 - lyman_depth * step((1216.0 - lam) / 30.0))
        * (1.0 - step((912.0 - lam) / 20.0))
    )


class PhotoZ:
    """The simulator and its exact posterior (see the module docstring).

    Example::

        sim = PhotoZ()
        z, x = sim.simulate(10_000, seed=1)             # [N], [N, 20] = fluxes, errors
        grid = np.arange(0.0, 3.0 + 1e-9, 0.005)
        post = sim.exact_posterior(x, grid)             # [N, G], ∫ post dz = 1 (trapezoid)
    """

    def __init__(self, survey: Survey | None = None, table_step: float = 0.001):
        self.survey = survey or Survey()
        s = self.survey
        a_min, a_max = (float(v) for v in s.amplitude_range)
        if not 0 < a_min < a_max:
            raise InputError(
                f"Survey.amplitude_range = {s.amplitude_range!r}: expected 0 < A_min < A_max"
            )
        self.a_min, self.a_max = a_min, a_max
        self.table_z = np.arange(0.0, Z_MAX + 0.5 * table_step, table_step)
        self.table = self._colour_table(self.table_z)         # [Z, T, B]
        self.softening = np.full(N_BANDS, s.sigma0)

    # -- model ------------------------------------------------------------------------------
    def _colour_table(self, z: np.ndarray) -> np.ndarray:
        """m_tb(z) [Z, T, B]: band fluxes of each template at each z, over the reference band."""
        lam = np.linspace(2000.0, 13000.0, 2201)                           # observed frame (Å)
        centres = np.asarray(FILTER_CENTRES)
        response = np.exp(-0.5 * ((lam[:, None] - centres) / (FILTER_WIDTH * centres)) ** 2)
        weights = response / lam[:, None]                                  # AB: ∫ f_ν R dλ/λ
        weights /= weights.sum(axis=0)
        rest = lam[None, :] / (1.0 + z[:, None])                           # [Z, L]
        fluxes = np.stack([template_flux(rest, slope, balmer, self.survey.lyman_depth) @ weights
                           for _, slope, balmer in TEMPLATES], axis=1)     # [Z, T, B]
        return fluxes / fluxes[..., REFERENCE_BAND:REFERENCE_BAND + 1]

    def colours(self, z: np.ndarray) -> np.ndarray:
        """m_tb(z) [.., T, B] at redshifts z [..] in [0, 3]: linear interpolation of the table."""
        z = np.asarray(z, np.float64)
        step = self.table_z[1] - self.table_z[0]
        u = np.clip(z / step, 0.0, len(self.table_z) - 1.0)
        i = np.minimum(np.floor(u).astype(np.int64), len(self.table_z) - 2)
        f = (u - i)[..., None, None]
        return (1.0 - f) * self.table[i] + f * self.table[i + 1]

    def log_prior(self, z: np.ndarray) -> np.ndarray:
        """ln p(z) [..], normalised on [0, 3] (-inf outside): p ∝ z exp(-z/z0)."""
        z = np.asarray(z, np.float64)
        z0 = self.survey.z0
        # ∫_0^Zmax z e^{-z/z0} dz = z0² (1 - (1 + Zmax/z0) e^{-Zmax/z0})
        norm = z0 ** 2 * (1.0 - (1.0 + Z_MAX / z0) * math.exp(-Z_MAX / z0))
        inside = (z > 0) & (z <= Z_MAX)
        with np.errstate(divide="ignore"):
            return np.where(
                inside, np.log(np.where(inside, z, 1.0)) - z / z0 - math.log(norm), -np.inf
            )

    def simulate(self, n: int, seed: int, return_truth: bool = False) -> Any:
        """Draw n galaxies: z [n] and inputs x [n, 20] = (F_1..F_10, σ_1..σ_10).

        With ``return_truth`` also a dict of the latent template index [n] and amplitude A [n].
        Deterministic for a given seed.
        """
        n = validation.integer(n, "n")
        rng = np.random.default_rng(validation.seed(seed))
        s = self.survey
        z = np.empty(0)
        while z.size < n:                                   # gamma(2, z0) truncated to (0, 3]
            draw = rng.gamma(2.0, s.z0, size=2 * n)
            z = np.concatenate([z, draw[draw <= Z_MAX]])
        z = z[:n]
        t = rng.integers(0, len(TEMPLATES), size=n)
        amp = np.exp(rng.uniform(math.log(self.a_min), math.log(self.a_max), size=n))
        sigma = s.sigma0 * np.exp(rng.uniform(-s.sigma_spread, s.sigma_spread, size=(n, N_BANDS)))
        flux = self._noiseless_flux(z, t, amp) + sigma * rng.normal(size=(n, N_BANDS))
        x = np.concatenate([flux, sigma], axis=1)
        if return_truth:
            return z, x, {"template": t, "amplitude": amp}
        return z, x

    def reobserve(self, z: Any, inputs: Any, truth: dict, copies: int,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
        """New noise realisations of simulated galaxies: z [R·N] and inputs [R·N, 20], copy-major.

        Each galaxy keeps its redshift z, template t, amplitude A and flux errors σ_b; only the
        noise is drawn again, F_b = A m_tb(z) + σ_b n_b with fresh n_b ~ N(0, 1), R = ``copies``
        times. Every copy is an exact draw from p(z, F, σ), so a training set of N galaxies
        observed R times teaches the noise distribution with R·N draws while its redshifts,
        templates and amplitudes stay the N simulated ones (noise augmentation of a simulated
        training set; the copies of one galaxy are not independent of each other).

        Args:
            z: [N] redshifts of :meth:`simulate`'s galaxies.
            inputs: [N, 20] their inputs (only the errors σ, columns 10..19, are used).
            truth: the ``return_truth`` dict of :meth:`simulate` (``template`` [N], ``amplitude``
                [N]).
            copies: R >= 1 new realisations per galaxy.
            seed: seed of the new noise (use one that :meth:`simulate` did not).
        """
        x = validation.finite_matrix(inputs, "inputs", N_INPUTS, "[N, 20] (10 fluxes, 10 errors)")
        z = np.asarray(z, np.float64)
        missing = {"template", "amplitude"} - set(truth)
        if missing:
            raise InputError(f"reobserve: truth has no {sorted(missing)}; pass the dict that "
                             f"simulate(..., return_truth=True) returns")
        t = np.asarray(truth["template"])
        amp = np.asarray(truth["amplitude"], np.float64)
        if not np.issubdtype(t.dtype, np.integer) or t.size and not (
                0 <= t.min() and t.max() < len(TEMPLATES)):
            raise InputError(f"reobserve: truth['template'] must hold template indices in "
                             f"[0, {len(TEMPLATES)})")
        if not z.shape == t.shape == amp.shape == (x.shape[0],):
            raise InputError(f"reobserve: z {list(z.shape)}, template {list(t.shape)} and "
                             f"amplitude {list(amp.shape)} must all be [N] with N = {x.shape[0]} "
                             f"(the rows of inputs)")
        copies = validation.integer(copies, "copies")
        rng = np.random.default_rng(validation.seed(seed))
        sigma = x[:, N_BANDS:]
        flux = self._noiseless_flux(z, t, amp) + sigma * rng.normal(size=(copies, *sigma.shape))
        x_new = np.concatenate([flux, np.broadcast_to(sigma, flux.shape)], axis=2)
        return np.tile(z, copies), x_new.reshape(-1, N_INPUTS)

    def _noiseless_flux(self, z: np.ndarray, template: np.ndarray,
                        amplitude: np.ndarray) -> np.ndarray:
        """A m_tb(z) [N, B]: each galaxy's band fluxes before noise (z, template, A [N])."""
        return amplitude[:, None] * self.colours(z)[np.arange(z.size), template]

    # -- exact posterior -------------------------------------------------------------------
    def log_likelihood(self, inputs: Any, z_grid: Any, nodes: int = 32) -> np.ndarray:
        """ln p(F | z, σ) [N, G] up to a constant per object (template and amplitude
        marginalised), on a redshift grid [G] shared by all objects.
        """
        x = self._checked(inputs)
        return self._log_likelihood(x, self.colours(_grid(z_grid))[None], nodes)

    def log_likelihood_at(self, inputs: Any, z: Any, nodes: int = 32) -> np.ndarray:
        """ln p(F_n | z_n, σ_n) [N] at each object's own redshift z [N] in [0, 3] (the same
        constant as :meth:`log_likelihood`, whose grid values it reproduces).
        """
        x = self._checked(inputs)
        zz = np.asarray(z, np.float64).reshape(-1)
        if zz.size != x.shape[0] or not np.all((zz >= 0) & (zz <= Z_MAX)):
            raise InputError(f"z: expected {x.shape[0]} redshifts (one per row of inputs) in "
                             f"[0, {Z_MAX:g}], got {zz.size}"
                             + ("" if zz.size != x.shape[0] else " with some outside"))
        return self._log_likelihood(x, self.colours(zz)[:, None], nodes)[:, 0]

    def _checked(self, inputs: Any) -> np.ndarray:
        x = validation.finite_matrix(inputs, "inputs", N_INPUTS, "[N, 20] (10 fluxes, 10 errors)")
        if (x[:, N_BANDS:] <= 0).any():
            raise InputError("inputs: flux errors (columns 10..19) must be > 0")
        return x

    def _log_likelihood(self, x: np.ndarray, m: np.ndarray, nodes: int) -> np.ndarray:
        """[N, G] for inputs [N, 20] and colours m [1 or N, G, T, B] (one grid for all objects,
        or one per object).
        """
        flux, sigma = x[:, :N_BANDS], x[:, N_BANDS:]
        w = 1.0 / sigma ** 2                                               # [N, B]
        if m.shape[0] == 1:
            a = np.einsum("gtb,nb->ngt", m[0] * m[0], w)
            b = np.einsum("gtb,nb->ngt", m[0], flux * w)
        else:
            a = np.einsum("ngtb,nb->ngt", m * m, w)
            b = np.einsum("ngtb,nb->ngt", m, flux * w)
        c = np.einsum("nb,nb->n", flux * flux, w)[:, None, None]
        a_hat, width = b / a, 12.0 / np.sqrt(a)
        lo = np.clip(a_hat - width, self.a_min, self.a_max)
        hi = np.clip(a_hat + width, self.a_min, self.a_max)
        # ∫_lo^hi exp(-a (A - Â)²/2) dA/A = ∫ exp(-a (e^s - Â)²/2) ds over s in [ln lo, ln hi]
        u, wu = np.polynomial.legendre.leggauss(nodes)
        s_lo, s_hi = np.log(lo), np.log(hi)
        half = 0.5 * (s_hi - s_lo)
        s = 0.5 * (s_hi + s_lo)[..., None] + half[..., None] * u           # [N, G, T, K]
        log_g = -0.5 * a[..., None] * (np.exp(s) - a_hat[..., None]) ** 2
        with np.errstate(divide="ignore"):
            log_int = _logsumexp(log_g + np.log(wu), axis=-1) + np.log(half)
        log_like_t = -0.5 * (c - b * a_hat) + log_int  # [N, G, T]
        return _logsumexp(log_like_t, axis=-1) - math.log(
            len(TEMPLATES) * math.log(self.a_max / self.a_min)
        )

    def exact_posterior(self, inputs: Any, z_grid: Any, chunk: int = 256) -> np.ndarray:
        """p(z | F, σ) [N, G] on ``z_grid`` [G] (increasing, in [0, 3]), normalised by the
        trapezoid rule.

        Chunked over objects (``chunk`` rows at a time); a Gauss-Legendre rule of 32 nodes in ln A
        for the amplitude integral (module docstring).
        """
        x = validation.finite_matrix(inputs, "inputs", N_INPUTS, "[N, 20] (10 fluxes, 10 errors)")
        z = _grid(z_grid)
        chunk = validation.integer(chunk, "chunk")
        log_prior = self.log_prior(z)
        out = np.empty((x.shape[0], z.size))
        for start in range(0, x.shape[0], chunk):
            lp = self.log_likelihood(x[start:start + chunk], z) + log_prior
            lp -= lp.max(axis=1, keepdims=True)
            p = np.exp(lp)
            out[start:start + chunk] = p / np.trapezoid(p, z, axis=1)[:, None]
        return out

    def log_posterior(self, inputs: Any, z: Any, z_grid: Any, chunk: int = 256) -> np.ndarray:
        """ln p(z_n | F_n, σ_n) [N] at each object's own redshift z [N] (nats per unit z).

            ln p(z | F, σ) = ln p(F | z, σ) + ln p(z) - ln ∫ p(F | z', σ) p(z') dz',

        the evidence integral by the trapezoid rule on ``z_grid`` [G], as :meth:`exact_posterior`
        normalises its rows, so that at grid points this is ln exact_posterior. The evidence is
        computed once per distinct row of ``inputs`` (rows repeated for many z, as a grid of
        (z, object) pairs has them, cost one), ``chunk`` rows at a time.
        """
        x = self._checked(inputs)
        g = _grid(z_grid)
        zz = np.asarray(z, np.float64).reshape(-1)
        chunk = validation.integer(chunk, "chunk")
        distinct, row_of = np.unique(x, axis=0, return_inverse=True)
        log_prior = self.log_prior(g)
        log_evidence = np.empty(distinct.shape[0])
        for start in range(0, distinct.shape[0], chunk):
            rows = slice(start, start + chunk)
            lp = self.log_likelihood(distinct[rows], g) + log_prior
            peak = lp.max(axis=1)
            log_evidence[rows] = peak + np.log(np.trapezoid(np.exp(lp - peak[:, None]), g,
                                                            axis=1))
        out = np.empty(x.shape[0])
        for start in range(0, x.shape[0], 16 * chunk):
            rows = slice(start, start + 16 * chunk)
            out[rows] = self.log_likelihood_at(x[rows], zz[rows]) + self.log_prior(zz[rows])
        return out - log_evidence[row_of.reshape(-1)]

    # -- model inputs --------------------------------------------------------------------------
    def features(self, inputs: Any) -> np.ndarray:
        """Conditioning features [N, 20] from inputs [N, 20]: asinh magnitudes and ln σ (a
        bijection).

        μ_b = asinh(F_b / (2 b)) (Lupton et al. 1999, softening b = σ0), ν_b = ln(σ_b / σ0); the
        posterior given the features equals the posterior given the inputs. Colours are differences
        of μ_b, which a network learns more easily than ratios of raw fluxes spanning 1.5 decades.
        """
        return features(inputs, self.softening)

    def inputs(self, features: Any) -> np.ndarray:
        """Inputs [N, 20] (fluxes, errors) of conditioning features [N, 20]: the inverse of
        :meth:`features`, F_b = 2 b sinh(μ_b), σ_b = b e^{ν_b}.
        """
        f = validation.finite_matrix(features, "features", N_INPUTS,
                                     "[N, 20] (10 asinh magnitudes, 10 ln errors)")
        return np.concatenate([2.0 * self.softening * np.sinh(f[:, :N_BANDS]),
                               self.softening * np.exp(f[:, N_BANDS:])], axis=1)


def features(inputs: Any, softening: Sequence[float], xp: Any = np) -> Any:
    """[N, 20] asinh magnitudes μ_b = asinh(F_b / 2b_b) and ν_b = ln(σ_b / b_b) of inputs [N, 20].

    ``xp`` is ``np`` or ``tf.math``-like (any module with asinh, log and concat/concatenate), so
    the same map is differentiable inside TensorFlow (see :func:`calibrate`).
    """
    soft = np.asarray(softening, np.float32 if xp is not np else np.float64)
    flux, sigma = inputs[:, :N_BANDS], inputs[:, N_BANDS:]
    mu, nu = xp.asinh(flux / (2.0 * soft)), xp.log(sigma / soft)
    if xp is np:
        return np.concatenate([mu, nu], axis=1)
    return xp.concat([mu, nu], axis=1)


def _grid(z_grid: Any) -> np.ndarray:
    z = np.asarray(z_grid, np.float64)
    if z.ndim != 1 or z.size < 2 or not np.all(np.isfinite(z)) or not np.all(np.diff(z) > 0):
        raise InputError(
            f"z_grid has shape {list(z.shape)}; expected [G] increasing finite values, G >= 2"
        )
    return z


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.sum(np.exp(a - m), axis=axis)) + np.squeeze(m, axis=axis)


def simulate(n: int, seed: int, survey: Survey | None = None) -> tuple[np.ndarray, np.ndarray]:
    """z [n], inputs [n, 20] from :class:`PhotoZ` (default survey)."""
    return PhotoZ(survey).simulate(n, seed)


def exact_posterior(
    inputs: Any, z_grid: Any, survey: Survey | None = None, chunk: int = 256
) -> np.ndarray:
    """p(z | inputs) [N, G] on z_grid [G] for the default (or given) survey; see
    :class:`PhotoZ`.
    """
    return PhotoZ(survey).exact_posterior(inputs, z_grid, chunk)


# ---- calibration of a "real" set against the simulation -----------------------------------------

@dataclass(frozen=True)
class Calibration:
    """Per-band offsets of a real set relative to the simulation, with 1σ statistical errors [B].

    The real set is modelled as F_real = F e^{a_b}, σ_real = σ e^{a_b + e_b}: a zero-point error
    a_b scales flux and error alike, e_b mis-states the errors. :meth:`apply` removes them.
    ``covariance`` [2B, 2B] is the sandwich covariance of (a, e) (zero rows/columns for fixed
    parameters); ``hessian_errors`` [2B] are the inverse-Hessian errors alone (equal to the
    sandwich errors for an exact model, in expectation).
    """

    flux_offsets: np.ndarray
    error_offsets: np.ndarray
    flux_errors: np.ndarray
    error_errors: np.ndarray
    nll_before: float
    nll_after: float
    success: bool
    covariance: np.ndarray | None = None
    hessian_errors: np.ndarray | None = None

    def apply(self, inputs: Any) -> np.ndarray:
        """Corrected inputs [N, 20]: F e^{-a}, σ e^{-a-e}."""
        return apply_offsets(inputs, -self.flux_offsets, -self.error_offsets)

    def pulls(self, flux_offsets: Any, error_offsets: Any) -> np.ndarray:
        """(fitted - true) / error [2B'] for the fitted (free) parameters, given true offsets [B]
        each (flux then error offsets; the fixed ones are left out).
        """
        true = np.concatenate([np.asarray(flux_offsets, np.float64).reshape(N_BANDS),
                               np.asarray(error_offsets, np.float64).reshape(N_BANDS)])
        fitted = np.concatenate([self.flux_offsets, self.error_offsets])
        errors = np.concatenate([self.flux_errors, self.error_errors])
        free = self.free
        return (fitted[free] - true[free]) / errors[free]

    @property
    def free(self) -> np.ndarray:
        """[2B] bool: which of (a_1..a_B, e_1..e_B) were fitted (the rest held at 0)."""
        if self.covariance is None:
            return np.concatenate([self.flux_errors, self.error_errors]) > 0
        return np.diag(self.covariance) > 0

    def to_dict(self) -> dict:
        """The offsets and their 1σ errors as plain lists (for JSON reports)."""
        out = {
            "flux_offsets": self.flux_offsets.tolist(),
            "error_offsets": self.error_offsets.tolist(),
            "flux_errors": self.flux_errors.tolist(),
            "error_errors": self.error_errors.tolist(),
            "nll_before": self.nll_before,
            "nll_after": self.nll_after,
            "success": self.success,
        }
        if self.hessian_errors is not None:
            out["hessian_errors"] = self.hessian_errors.tolist()
        return out


def apply_offsets(inputs: Any, flux_offsets: Any, error_offsets: Any) -> np.ndarray:
    """Inputs [N, 20] with F_b -> F_b e^{a_b}, σ_b -> σ_b e^{a_b + e_b} (offsets [B] in ln
    units).
    """
    x = validation.finite_matrix(inputs, "inputs", N_INPUTS, "[N, 20] (10 fluxes, 10 errors)")
    a = np.asarray(flux_offsets, np.float64).reshape(N_BANDS)
    e = np.asarray(error_offsets, np.float64).reshape(N_BANDS)
    return np.concatenate([x[:, :N_BANDS] * np.exp(a), x[:, N_BANDS:] * np.exp(a + e)], axis=1)


def calibrate(model: Any, z: Any, inputs: Any, softening: Sequence[float] | None = None,
              bound: float = 0.5, fix_band: int | None = REFERENCE_BAND,
              step: float = 2e-3) -> Calibration:
    """Fit per-band flux and error offsets (a_b, e_b) of a real set with known redshifts.

    Maximum (conditional) likelihood under a trained 1-D model p(z | labels):

        θ̂ = (â, ê) = argmin_{|a|, |e| <= bound}  L(θ),
        L(θ) = -Σ_n ln p(z_n | labels(F_n e^{-a}, σ_n e^{-a-e})),

    with labels = :func:`features` (``softening`` given) or the raw inputs (None). For the true
    offsets the corrected set follows the simulation, so if the model is the simulation's
    p(z | x), θ_true maximises the expected conditional log-likelihood (Gibbs' inequality) and θ̂
    is consistent. L-BFGS-B (scipy, bounded) on L / N with TensorFlow gradients, per-object
    log-densities summed in float64.

    Errors: the sandwich covariance C = H⁻¹ J H⁻¹ (Huber 1967; White 1982), with J = Σ_n g_n g_nᵀ
    the outer product of the per-object scores g_n = ∂ ln p(z_n | ·)/∂θ at θ̂ and H the Hessian
    of L by central differences of the exact gradient (step ``step`` in each parameter, float64
    sums). Differences rather than a second autodiff pass because a ReLU conditioner is piecewise
    linear in its inputs: its autodiff Hessian misses the curvature of the kinks, which the sum
    over many objects turns into smooth curvature on the scale of the errors. For an exact model
    J ≈ H and C ≈ H⁻¹; for an approximate one C is the spread of θ̂ over real sets.

    ``success``: H is positive definite and the Newton step H⁻¹∇L left at θ̂ is below 0.1σ in
    every parameter. ``fix_band``'s flux
    offset is held at 0 (a common zero-point shift is nearly degenerate with
    the amplitude prior); None fits all bands.
    """
    import tensorflow as tf
    from scipy.optimize import minimize

    x = validation.finite_matrix(inputs, "inputs", N_INPUTS, "[N, 20] (10 fluxes, 10 errors)")
    zz = np.asarray(z, np.float32).reshape(-1, 1)
    if zz.shape[0] != x.shape[0]:
        raise InputError(
            f"z has {zz.shape[0]} entries; expected one per row of inputs ({x.shape[0]})"
        )
    bound = validation.positive_number(bound, "bound")
    step = validation.positive_number(step, "step")
    free = np.ones(2 * N_BANDS, bool)
    if fix_band is not None:
        free[validation.integer(fix_band, "fix_band", low=0, high=N_BANDS - 1)] = False
    n_free = int(free.sum())
    x_t, z_t = tf.constant(x, tf.float32), tf.constant(zz)
    soft = None if softening is None else tf.constant(np.asarray(softening, np.float32))
    free_idx = tf.constant(np.nonzero(free)[0][:, None], tf.int32)

    def labels_of(theta):
        full = tf.scatter_nd(free_idx, theta, [2 * N_BANDS])
        a, e = full[:N_BANDS], full[N_BANDS:]
        flux, sigma = x_t[:, :N_BANDS] * tf.exp(-a), x_t[:, N_BANDS:] * tf.exp(-a - e)
        if soft is None:
            return tf.concat([flux, sigma], axis=1)
        return tf.concat([tf.asinh(flux / (2.0 * soft)), tf.math.log(sigma / soft)], axis=1)

    spec = [tf.TensorSpec([n_free], tf.float32)]

    @tf.function(input_signature=spec)
    def value_and_grad(theta):
        with tf.GradientTape() as tape:
            tape.watch(theta)
            lp = model.log_prob_tensor(z_t, labels_of(theta))
            total = tf.reduce_sum(tf.cast(lp, tf.float64))
        g = tape.gradient(lp, theta)        # the sum's gradient (float32 per-object terms)
        return -total, -g

    @tf.function(input_signature=spec)
    def scores(theta):
        """Per-object scores g_n [N, P]: ∂ ln p_n/∂labels_n (one backward pass, the objects are
        independent) chained with ∂labels_n/∂θ (forward mode, one pass per parameter).
        """
        with tf.GradientTape() as tape:
            labels = labels_of(theta)
            tape.watch(labels)
            lp = model.log_prob_tensor(z_t, labels)
        dl = tf.cast(tape.gradient(lp, labels), tf.float64)                    # [N, C]
        columns = []
        for k in range(n_free):
            with tf.autodiff.ForwardAccumulator(theta, tf.one_hot(k, n_free)) as acc:
                labels_k = labels_of(theta)
            columns.append(tf.reduce_sum(dl * tf.cast(acc.jvp(labels_k), tf.float64), axis=1))
        return tf.stack(columns, axis=1)

    n = x.shape[0]

    def fun(theta):
        v, g = value_and_grad(tf.constant(theta, tf.float32))
        return float(v) / n, np.asarray(g, np.float64) / n

    theta0 = np.zeros(n_free)
    before = fun(theta0)[0]
    res = minimize(fun, theta0, jac=True, method="L-BFGS-B", bounds=[(-bound, bound)] * n_free,
                   options={"maxiter": 1000, "ftol": 1e-13, "gtol": 1e-9})
    theta = np.clip(res.x, -bound + step, bound - step)
    h = np.empty((n_free, n_free))
    for k in range(n_free):
        d = np.zeros(n_free)
        d[k] = step
        h[:, k] = (fun(theta + d)[1] - fun(theta - d)[1]) * n / (2.0 * step)
    h = 0.5 * (h + h.T)
    positive = bool(np.all(np.linalg.eigvalsh(h) > 0))      # a minimum, not a saddle
    g = np.asarray(scores(tf.constant(res.x, tf.float32)), np.float64)
    j = g.T @ g
    h_inv = np.linalg.inv(h)
    # converged if the remaining Newton step is a small fraction of the statistical error (the
    # float32 objective often ends L-BFGS-B's line search before its own tolerances are met)
    newton = h_inv @ (fun(res.x)[1] * n)
    converged = bool(np.all(np.abs(newton) < 0.1 * np.sqrt(np.abs(np.diag(h_inv)))))
    cov_free = h_inv @ j @ h_inv
    cov = np.zeros((2 * N_BANDS, 2 * N_BANDS))
    cov[np.ix_(free, free)] = cov_free
    full, err, err_h = np.zeros(2 * N_BANDS), np.zeros(2 * N_BANDS), np.zeros(2 * N_BANDS)
    full[free] = res.x
    err[free] = np.sqrt(np.diag(cov_free))
    err_h[free] = np.sqrt(np.maximum(np.diag(h_inv), 0.0))
    return Calibration(full[:N_BANDS], full[N_BANDS:], err[:N_BANDS], err[N_BANDS:], before,
                       float(res.fun), converged and positive, cov, err_h)
