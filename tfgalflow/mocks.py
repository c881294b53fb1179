"""Mock star catalogues: exact Hernquist samplers, emcee for any DF, cuts and observational noise.

``sample_hernquist`` draws independent stars from the isotropic or beta = 1/2 Hernquist DF
(:mod:`tfgalflow.hernquist`) exactly, fully vectorised (10^6 stars in about a second):

* radius by inverting the mass profile,
  M(<r)/M = r^2 / (r + a)^2 = u  =>  r = a sqrt(u) / (1 - sqrt(u)),
  with u ~ U(0, u_max), u_max = M(<r_max)/M for a catalogue truncated at r_max;
* position direction isotropic;
* velocity from the DF at fixed r, p(v | r) ∝ f(x, v):

  ``iso``   p(v | r) ∝ v^2 f(Psi - v^2/2) on [0, v_esc], by rejection in vectorised rounds.
            Hernquist's eq. 17 is f = C B(q) (1 - q^2)^(-5/2) with q^2 = a E / (G M) and B
            increasing in q. The proposal
            g(v) ∝ v^2 (1 - q^2)^(-5/2) = v^2 (c + s)^(-5/2), c = r / (r + a), s = v^2 / (2 v_g^2),
            is inverted exactly (t = s / (c + s) has density ∝ t^(1/2) on [0, a / (r + a)]), and
            a proposal is accepted with probability B(q(v)) / B(q(0)) <= 1. The acceptance rate is
            >= 0.18 at every radius (-> 1 at the centre, where the naive v^2 proposal with
            f(Psi - v^2/2)/f(Psi) fails: f(Psi) diverges as r -> 0).
  ``aniso`` beta = 1/2, f = 3 E^2 / (4 pi^3 L) with L = r v_t:
            p(v_r, v_t | r) ∝ v_t f ∝ E^2 = (Psi - (v_r^2 + v_t^2)/2)^2 on the half disk
            v_t >= 0. In polar coordinates (rho, alpha) of that half disk, alpha ~ U(0, pi) and
            y = rho^2 / (2 Psi) has density 3 (1 - y)^2, so y = 1 - (1 - U)^(1/3): exact
            inversion, no rejection. The tangential direction is uniform.

``sample_emcee`` runs emcee's affine-invariant ensemble sampler in 6D on any log f(x, v), as the
reference study did (An, Naik, Evans & Burrage 2021; Naik's HernquistFlows
``data/sample_hq_iso.py``: 100 walkers, 1000 burn-in steps, thinning by 100, truncation at 200 a).

``add_noise`` follows the reference study's convention by default (each Cartesian coordinate times
(1 + level N(0, 1)), HernquistFlows ``data/add_noise.py``); see its docstring.

References: Hernquist 1990, ApJ 356, 359; Baes & Dejonghe 2002, A&A 393, 485; Foreman-Mackey et al.
2013, PASP 125, 306 (emcee); An, Naik, Evans & Burrage 2021, MNRAS 506, 5721.
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Callable, Mapping

import numpy as np

from . import validation
from .catalogue import Catalogue, check_units
from .errors import InputError
from .dehnen import LABEL_NAMES, Dehnen, check_label
from .hernquist import Hernquist
from .units import MODEL_UNIT, ModelUnits

log = logging.getLogger(__name__)

MODEL_UNITS = {"length": MODEL_UNIT, "velocity": MODEL_UNIT}
#: Accepted range of emcee's mean acceptance fraction (Foreman-Mackey et al. 2013, sec. 4);
#: outside it warns.
ACCEPTANCE_RANGE = (0.2, 0.7)
#: add_noise conventions (see its docstring).
NOISE_CONVENTIONS = ("coordinate", "vector")
# Most rejection rounds; with acceptance >= 0.18 the last of 10^9 stars needs ~120
_MAX_ROUNDS = 10_000


# ---- exact sampler ------------------------------------------------------------------------------

def sample_hernquist(
    n: int,
    kind: str = "iso",
    seed: int | None = None,
    model: Hernquist = Hernquist(),
    r_max: float | None = None,
    model_units: ModelUnits | None = None,
) -> Catalogue:
    """Draw ``n`` independent stars exactly from a Hernquist DF.

    Args:
        n: number of stars, >= 1.
        kind: "iso" (Hernquist 1990 f(E)) or "aniso" (beta = 1/2, f(E, L) = 3 E^2 / (4 pi^3 L) in
            G=M=a=1).
        seed: seed of ``numpy.random.default_rng``; None draws fresh entropy (recorded in
            meta["seed"]).
        model: the Hernquist(M, a, G) sphere; positions and velocities come out in its units.
        r_max: if given, only stars with r < r_max (the DF restricted to r < r_max; velocities
            unchanged).
        model_units: physical scale of model units (G = M = a = 1 system), stored in
            meta["model_units"] so that ``cat.to_units("kpc", "km/s")`` works; default
            ``ModelUnits()`` (1e10 Msun, 1 kpc). Only recorded when model.G == 1 (otherwise "model"
            velocities are not sqrt(G M_u / L_u)).

    Returns a :class:`Catalogue` in units "model"/"model": pos [n, 3], vel [n, 3].

    Example::

        >>> cat = sample_hernquist(10**6, kind="aniso", seed=1, r_max=100.0)
        >>> cat.to_units("kpc", "km/s")
    """
    n = validation.integer(n, "n")
    Hernquist.check_kind(kind)
    if not isinstance(model, Hernquist):
        raise InputError("model must be a tfgalflow.hernquist.Hernquist, got "
                         f"{type(model).__name__}")
    r_max = _radius(r_max)
    seed = validation.seed(seed)
    rng = np.random.default_rng(seed)

    r = _radii(n, model.a, r_max, rng)
    r_hat, e_theta, e_phi = _spherical_basis(n, rng)
    if kind == "iso":
        vel = iso_speeds(model, r, rng)[:, None] * validation.unit_vectors(n, rng)
    else:
        v_r, v_t = _aniso_velocities(model, r, rng)
        psi = rng.uniform(0.0, 2.0 * np.pi, n)
        vel = (v_r[:, None] * r_hat
               + v_t[:, None] * (np.cos(psi)[:, None] * e_theta + np.sin(psi)[:, None] * e_phi))
    meta: dict[str, Any] = {
        "source": "tfgalflow.mocks.sample_hernquist",
        "sampler": "exact",
        "df": "hernquist",
        "kind": kind,
        "n": n,
        "seed": seed,
        "r_max": r_max,
        "model": {"M": model.M, "a": model.a, "G": model.G},
    }
    if model.G == 1.0:
        meta["model_units"] = model_units if model_units is not None else ModelUnits()
    return Catalogue(r[:, None] * r_hat, vel, units=MODEL_UNITS, meta=meta)


def _radii(n: int, a: float, r_max: float | None, rng: np.random.Generator) -> np.ndarray:
    """r with M(<r)/M = r^2/(r+a)^2 = u, u ~ U(0, u_max): r = a sqrt(u) (1 + sqrt(u)) / (1 - u)."""
    u_max = 1.0 if r_max is None else (r_max / (r_max + a)) ** 2
    u = u_max * rng.random(n)                               # [0, u_max): finite r; r < r_max
    # r = 0 (probability 2^-53) has no velocity DF
    u = np.where(u > 0.0, u, np.finfo(float).tiny)
    s = np.sqrt(u)
    r = a * s * (1.0 + s) / (1.0 - u)
    return r if r_max is None else np.minimum(r, r_max)


def _spherical_basis(
    n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Isotropic unit vectors r_hat [n, 3] with their e_theta, e_phi [n, 3].

    cos theta ~ U(-1, 1), phi ~ U(0, 2 pi).
    """
    cos_t = rng.uniform(-1.0, 1.0, n)
    sin_t = np.sqrt(1.0 - cos_t**2)
    phi = rng.uniform(0.0, 2.0 * np.pi, n)
    cos_p, sin_p = np.cos(phi), np.sin(phi)
    r_hat = np.stack([sin_t * cos_p, sin_t * sin_p, cos_t], axis=1)
    e_theta = np.stack([cos_t * cos_p, cos_t * sin_p, -sin_t], axis=1)
    e_phi = np.stack([-sin_p, cos_p, np.zeros(n)], axis=1)
    return r_hat, e_theta, e_phi


def iso_speeds(model: Hernquist, r: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """|v| ~ v^2 f(Psi(r) - v^2/2) on [0, v_esc], by rejection from g(v) ∝ v^2 (c + s)^(-5/2).

    See the module docstring for the proposal and the acceptance probability.

    log B(q) + const = log f + (5/2) log(c + s) is evaluated with ``model.log_df`` (which forms
    1 - q^2 = c + s without cancellation), at x = (r, 0, 0), v = (|v|, 0, 0).
    """
    n = r.size
    c = 1.0 / (1.0 + model.a / r)                           # r / (r + a)
    t_max = model.a / (r + model.a)                         # = q(0)^2 = s_max / (c + s_max)
    x = np.zeros((n, 3))
    x[:, 0] = r
    log_b0 = model.log_df(x, np.zeros((n, 3)), "iso") + 2.5 * np.log(c)
    speeds = np.empty(n)
    todo = np.arange(n)
    rounds = 0
    while todo.size:
        rounds += 1
        if rounds > _MAX_ROUNDS:
            raise RuntimeError(f"iso speed rejection did not finish in {_MAX_ROUNDS} rounds "
                               f"({todo.size} left)")
        u23 = rng.random(todo.size) ** (2.0 / 3.0)
        t = t_max[todo] * u23                               # t ∝ t^(1/2) on [0, t_max]
        one_minus_t = (1.0 - u23) + c[todo] * u23           # 1 - (1 - c) u23, without cancellation
        s = c[todo] * t / one_minus_t                       # s = v^2 / (2 v_g^2) = c t / (1 - t)
        v = np.zeros((todo.size, 3))
        v[:, 0] = np.sqrt(2.0 * model.energy_scale * s)
        log_b = model.log_df(x[todo], v, "iso") + 2.5 * np.log(c[todo] + s)
        accept = np.log(rng.random(todo.size)) < log_b - log_b0[todo]
        speeds[todo[accept]] = v[accept, 0]
        todo = todo[~accept]
    return speeds


def _aniso_velocities(
    model: Hernquist, r: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(v_r, v_t >= 0) with density ∝ (Psi - (v_r^2 + v_t^2)/2)^2 on the half disk.

    That is the velocity distribution of the beta = 1/2 DF at fixed r.
    """
    # 1 - (1 - U)^(1/3): density 3 (1 - y)^2 on [0, 1)
    y = -np.expm1(np.log1p(-rng.random(r.size)) / 3.0)
    rho = np.sqrt(2.0 * model.relative_potential(r) * y)
    alpha = rng.uniform(0.0, np.pi, r.size)
    return rho * np.cos(alpha), rho * np.sin(alpha)


# ---- emcee --------------------------------------------------------------------------------------

def sample_emcee(
    log_df: Callable[[np.ndarray, np.ndarray], np.ndarray],
    n: int,
    nwalkers: int = 64,
    burn: int = 1000,
    thin: int = 20,
    seed: int | None = None,
    r_max: float | None = None,
    init: np.ndarray | None = None,
    init_scale: tuple[float, float] = (1.0, 0.3),
    units: Mapping[str, str] | None = None,
    meta: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> Catalogue:
    """Sample ``n`` stars from any DF with emcee's ensemble sampler in 6D (x, v).

    Target: p(x, v) ∝ exp(log_df(x, v)) for |x| < r_max (-inf beyond; NaN and +inf are treated as
    -inf, e.g. the beta = 1/2 DF's integrable L = 0 singularity). ``log_df(x [B, 3], v [B, 3])
    -> [B]`` is called on whole half-ensembles (emcee ``vectorize=True``).

    Chain: ``burn`` steps discarded, then ceil(n / nwalkers) kept states per walker, one every
    ``thin`` steps; the last n are returned. The acceptance fraction (every post-burn-in step, from
    whether each walker moved) goes to meta["acceptance_fraction"] (mean) and
    meta["acceptance_fraction_range"]; it is logged, and a warning is issued when the mean is
    outside [0.2, 0.7]. meta["autocorr_steps"] is emcee's integrated autocorrelation time (max over
    the 6 coordinates, None if undefined) in steps: samples closer than that in a walker's chain
    are correlated, so ``thin`` should exceed it for independent stars.

    Why r_max: a DF like Hernquist's has M(>r) ∝ 1/r, so walkers wander to huge radii where the
    stretch move mixes slowly; truncating keeps the target compact and the autocorrelation time
    finite (the reference study truncated at 200 a).

    Args:
        log_df: log f(x, v) up to a constant, NumPy in, NumPy out.
        n: stars wanted, >= 1.
        nwalkers: number of walkers, even and >= 12 (2 x 6 dimensions).
        burn: steps discarded at the start of every walker's chain, >= 0.
        thin: steps between kept states, >= 1.
        seed: seeds the initial walkers and emcee's RandomState (None: fresh entropy, recorded).
        r_max: positions |x| >= r_max get log p = -inf (None: no truncation).
        init: [nwalkers, 6] starting points; default x ~ N(0, init_scale[0]^2),
            v ~ N(0, init_scale[1]^2), redrawn until log_df is finite there.
        init_scale: (position, velocity) standard deviations of the default starting points
            (the position one capped at r_max / 3).
        units: units of log_df's x, v (default "model"/"model").
        meta: extra provenance, added to the catalogue's meta.
        progress: show emcee's progress bar.
    """
    import emcee

    n = validation.integer(n, "n")
    nwalkers = validation.integer(nwalkers, "nwalkers")
    if nwalkers < 12 or nwalkers % 2:
        raise InputError("nwalkers must be even and >= 12 (twice the 6 dimensions), got "
                         f"{nwalkers}")
    burn = validation.integer(burn, "burn (steps)", low=0)
    thin = validation.integer(thin, "thin")
    r_max = _radius(r_max)
    units = check_units(units if units is not None else MODEL_UNITS)
    seed = validation.seed(seed)
    rng = np.random.default_rng(seed)

    def log_prob(w: np.ndarray) -> np.ndarray:
        lp = np.asarray(log_df(w[:, :3], w[:, 3:]), dtype=np.float64)
        if lp.shape != (w.shape[0],):
            raise InputError(f"log_df returned shape {list(lp.shape)} for {w.shape[0]} points; "
                             f"expected [{w.shape[0]}]")
        lp = np.where(np.isfinite(lp), lp, -np.inf)
        if r_max is not None:
            lp = np.where(np.linalg.norm(w[:, :3], axis=1) < r_max, lp, -np.inf)
        return lp

    start = _initial_walkers(log_prob, nwalkers, init, init_scale, r_max, rng)
    keep = math.ceil(n / nwalkers)
    sampler = emcee.EnsembleSampler(nwalkers, 6, log_prob, vectorize=True)
    rstate = np.random.RandomState(
        int(np.random.SeedSequence(seed).generate_state(1)[0])
    ).get_state()
    chain = np.empty((keep, nwalkers, 6))
    moved = np.zeros(nwalkers)
    previous = start.copy()
    for i, state in enumerate(
        sampler.sample(
            emcee.State(start, random_state=rstate),
            iterations=burn + keep * thin,
            store=False,
            progress=progress,
        )
    ):
        if i >= burn:
            moved += np.any(state.coords != previous, axis=1)
            j = i - burn + 1
            if j % thin == 0:
                chain[j // thin - 1] = state.coords
        previous = state.coords.copy()          # emcee updates state.coords in place
    acceptance = moved / (keep * thin)
    with np.errstate(
        invalid="ignore", divide="ignore"
    ):  # a walker that never moved has zero variance
        tau = float(np.max(emcee.autocorr.integrated_time(chain, tol=0, quiet=True))) * thin
    samples = chain.reshape(-1, 6)[-n:]
    record = {
        "source": "tfgalflow.mocks.sample_emcee",
        "sampler": "emcee",
        "n": n,
        "seed": seed,
        "r_max": r_max,
        "nwalkers": nwalkers,
        "burn": burn,
        "thin": thin,
        "steps": burn + keep * thin,
        "acceptance_fraction": float(acceptance.mean()),
        "acceptance_fraction_range": [float(acceptance.min()), float(acceptance.max())],
        "autocorr_steps": tau if math.isfinite(tau) else None,
        **dict(meta or {}),
    }
    log.info("emcee: %d walkers x %d steps, mean acceptance fraction %.3f, autocorrelation time "
             "%s steps",
             nwalkers, record["steps"], record["acceptance_fraction"], record["autocorr_steps"])
    lo, hi = ACCEPTANCE_RANGE
    if not lo <= record["acceptance_fraction"] <= hi:
        warnings.warn(f"emcee mean acceptance fraction {record['acceptance_fraction']:.3f} is "
                      f"outside [{lo}, {hi}]: the chain may not have mixed; check "
                      "init/init_scale, burn and r_max", stacklevel=2)
    return Catalogue(samples[:, :3], samples[:, 3:], units=units, meta=record)


def _initial_walkers(log_prob, nwalkers: int, init, init_scale, r_max, rng) -> np.ndarray:
    if init is not None:
        start = np.array(init, dtype=np.float64)
        if start.shape != (nwalkers, 6):
            raise InputError(f"init has shape {list(start.shape)}; expected [nwalkers, 6] = "
                             f"[{nwalkers}, 6]")
        bad = ~np.isfinite(log_prob(start))
        if bad.any():
            raise InputError("init: log_df is not finite at walker(s) "
                             f"{np.nonzero(bad)[0][:5].tolist()}; start every walker where the DF "
                             "is positive (and inside r_max)")
        return start
    sx, sv = (float(s) for s in init_scale)
    if r_max is not None:
        sx = min(sx, r_max / 3.0)
    start = np.empty((nwalkers, 6))
    todo = np.arange(nwalkers)
    for _ in range(1000):
        start[todo, :3] = rng.normal(0.0, sx, (todo.size, 3))
        start[todo, 3:] = rng.normal(0.0, sv, (todo.size, 3))
        todo = todo[~np.isfinite(log_prob(start[todo]))]
        if not todo.size:
            return start
    raise InputError(f"could not find {nwalkers} starting points with finite log_df from x ~ N(0, "
                     f"{sx}^2), v ~ N(0, {sv}^2); pass init [nwalkers, 6] or a different "
                     "init_scale")


# ---- cuts and noise -----------------------------------------------------------------------------

def cut(
    cat: Catalogue, r_max: float | None = None, bound_to: Hernquist | None = None
) -> Catalogue:
    """Keep the stars with |x| < r_max and/or bound (E = Psi(r) - v^2/2 > 0) in ``bound_to``.

    A radius cut of a catalogue that already has noise (meta["noise"]) acts on the observed radii
    and is recorded with ``after_noise``: a deconvolving fit of it needs
    ``TrainConfig.selection_r_max`` (:mod:`tfgalflow.deconvolution`), and training warns without.

    ``bound_to`` must be expressed in the catalogue's units (e.g. ``Hernquist()`` for a "model"
    catalogue, ``Hernquist(M=1e10, a=5, G=units.G_KPC_KMS2_MSUN)`` for kpc, km/s). The cut is
    appended to meta["cuts"].
    """
    if r_max is None and bound_to is None:
        raise InputError("cut needs r_max and/or bound_to")
    keep = np.ones(len(cat), dtype=bool)
    record: dict[str, Any] = {}
    if r_max is not None:
        r_max = _radius(r_max)
        keep &= cat.r < r_max
        record["r_max"] = r_max
        if cat.meta.get("noise"):     # a cut on noisy radii: a selection the deconvolution needs
            record["after_noise"] = True
    if bound_to is not None:
        if not isinstance(bound_to, Hernquist):
            raise InputError(f"bound_to must be a Hernquist model, got {type(bound_to).__name__}")
        keep &= bound_to.relative_energy(cat.pos, cat.vel) > 0
        record["bound_to"] = {"M": bound_to.M, "a": bound_to.a, "G": bound_to.G}
    record.update(kept=int(keep.sum()), of=len(cat))
    if not keep.any():
        raise InputError(f"cut {record} removes all {len(cat)} stars; a catalogue needs N >= 1")
    return cat.select(keep, cuts=[*cat.meta.get("cuts", []), record])


def add_noise(
    cat: Catalogue,
    level: float,
    seed: int | None = None,
    level_vel: float | None = None,
    convention: str = "coordinate",
) -> Catalogue:
    """Gaussian measurement noise of fractional ``level`` (0.01 = 1 %) on positions and velocities.

    Conventions (``level_vel`` defaults to ``level``), with independent eps ~ N(0, 1) per star and
    component:

    ``"coordinate"`` (default)  x_i -> x_i (1 + level eps_i),  v_i -> v_i (1 + level_vel eps_i):
        each Cartesian coordinate has a fractional error ``level``, so
        std[(x_i' - x_i) / x_i] = level. This is exactly what the reference study did
        (HernquistFlows ``data/add_noise.py``: ``pos * rng.normal(1, scale)``), so 1 % / 10 %
        mocks are comparable with An et al. (2021). Note it is not rotation invariant: a
        coordinate near 0 stays nearly exact.
    ``"vector"``  x -> x + level |x| eps,  v -> v + level_vel |v| eps (eps ~ N(0, I_3)):
        isotropic, std[(x_i' - x_i) / |x|] = level per component
        (|Δx| / |x| has rms sqrt(3) level); keeps the spherical symmetry of the noise-free model.

    The convention, levels and seed are appended to meta["noise"], and the result carries the
    error model of the noise it added (``Catalogue.errors``), what
    ``TrainConfig(deconvolve=True)`` needs to learn the noise-free DF:

    * ``"coordinate"``: ``error_kind="fractional"``, s = (level,) * 3 + (level_vel,) * 3 per star;
    * ``"vector"``: ``error_kind="absolute"``, σ = level |x| for the positions and level_vel |v|
      for the velocities, with the noise-free |x|, |v| (the σ a survey would quote; known exactly
      here).

    Noise added to a catalogue that already has errors combines them in quadrature when both are
    absolute (σ² = σ_1² + σ_2²: a sum of independent Gaussians); any other combination (a product
    of multiplicative factors is not Gaussian) raises InputError.
    """
    level = validation.positive_number(level, "level (fractional, 0.01 = 1 %)", allow_zero=True)
    level_vel = level if level_vel is None else validation.positive_number(
        level_vel, "level_vel (fractional, 0.01 = 1 %)", allow_zero=True)
    validation.one_of(convention, "noise convention", NOISE_CONVENTIONS)
    seed = validation.seed(seed)
    rng = np.random.default_rng(seed)
    eps_x = rng.standard_normal(cat.pos.shape)
    eps_v = rng.standard_normal(cat.vel.shape)
    if convention == "coordinate":
        pos = cat.pos * (1.0 + level * eps_x)
        vel = cat.vel * (1.0 + level_vel * eps_v)
        kind = "fractional"
        errors = np.tile(np.array([level] * 3 + [level_vel] * 3), (len(cat), 1))
    else:
        pos = cat.pos + level * cat.r[:, None] * eps_x
        vel = cat.vel + level_vel * cat.speed[:, None] * eps_v
        kind = "absolute"
        errors = np.concatenate([np.repeat(level * cat.r[:, None], 3, axis=1),
                                 np.repeat(level_vel * cat.speed[:, None], 3, axis=1)], axis=1)
    if cat.errors is not None:
        if not cat.error_kind == kind == "absolute":
            raise InputError(
                f"add_noise: the catalogue already has {cat.error_kind} errors and "
                f"the {convention!r} convention adds {kind} ones; only absolute "
                "errors combine into one Gaussian (convention='vector' on a catalogue "
                "with absolute errors)"
            )
        errors = np.sqrt(cat.errors ** 2 + errors ** 2)
    record = {"level": level, "level_vel": level_vel, "convention": convention, "seed": seed}
    return Catalogue(pos, vel, labels=cat.labels, label_names=cat.label_names, units=cat.units,
                     meta={**cat.meta, "noise": [*cat.meta.get("noise", []), record]},
                     errors=errors, error_kind=kind)



# ---- Dehnen gamma-models with Osipkov-Merritt anisotropy ------------------------------------
# Velocity envelope (see sample_dehnen): per star, CELLS cells uniform in ln r_Q over SPAN above
# ln r, then one tail cell. Envelope values come from log f tabulated every TABLE_STEP in ln r_Q.
_DEHNEN_CELLS = 64
_DEHNEN_SPAN = 12.8
_DEHNEN_TABLE_STEP = 0.02
_DEHNEN_CHUNK = 2**16


def sample_dehnen(n: int, gamma: float = 1.0, ra_inverse: float = 0.0, seed: int | None = None,
                  r_max: float | None = None, model_units: ModelUnits | None = None
                  ) -> Catalogue:
    """Draw ``n`` independent stars exactly from a Dehnen gamma-model with Osipkov-Merritt
    anisotropy, in model units G = M = a = 1 (:class:`tfgalflow.dehnen.Dehnen`);
    ``ra_inverse`` = a / r_a (0: isotropic).

    * Radius: M(<r)/M = y^(3 - gamma) = u, u ~ U(0, u_max)  =>  y = u^(1/(3-gamma)),
      r = y / (1 - y) (u_max = M(<r_max)/M). Radii below the smallest positive float64 are clamped
      to it (only possible for gamma > 2.9, with probability ~ e^(-709 (3 - gamma))).
    * Velocity: in the stretched variables (v_r, u_t = v_t sqrt(1 + r^2/r_a^2)) the DF at fixed r
      is isotropic, f(Psi - p^2/2) with p = |(v_r, u_t)|, and
      d^3v = d^3(v_r, u_t) / (1 + r^2/r_a^2). So s = p^2/2 has density ∝ sqrt(s) f(Psi(r) - s) on
      [0, Psi(r)], the direction of (v_r, u_t) is isotropic, and v_t = u_t / sqrt(1 + r^2/r_a^2)
      with a uniform tangential direction.
    * s by exact rejection: Q = Psi - s is cut into cells uniform in ln r_Q (r_Q: Psi(r_Q) = Q)
      from ln r to ln r + 12.8 (64 cells) plus one tail cell Q in (0, Psi(r e^12.8)]. On each cell
      f <= F_k, from a table of log f every 0.02 in ln r_Q: the larger endpoint value plus a margin
      (h^2/8) max(-(log f)'') that covers interpolation and an interior maximum; the proposal
      ∝ F_k sqrt(s) is sampled exactly per cell and accepted with probability f(Q) / F_k <= 1
      (checked: a violated bound raises RuntimeError instead of returning biased stars).

    Returns a :class:`Catalogue` (units "model"/"model"), meta with gamma, ra_inverse, seed, r_max.
    References: Dehnen 1993, MNRAS 265, 250; Osipkov 1979; Merritt 1985, AJ 90, 1027.
    """
    n = validation.integer(n, "n")
    model = Dehnen(gamma, ra_inverse)
    r_max = _radius(r_max)
    seed = validation.seed(seed)
    pos, vel = _dehnen_phase_space(model, n, r_max, np.random.default_rng(seed))
    meta: dict[str, Any] = {
        "source": "tfgalflow.mocks.sample_dehnen", "sampler": "exact", "df": "dehnen-om",
        "gamma": model.gamma, "ra_inverse": model.ra_inverse, "n": n, "seed": seed, "r_max": r_max,
        "model": {"gamma": model.gamma, "ra_inverse": model.ra_inverse,
                  "M": 1.0, "a": 1.0, "G": 1.0},
        "model_units": model_units if model_units is not None else ModelUnits(),
    }
    return Catalogue(pos, vel, units=MODEL_UNITS, meta=meta)


def sample_dehnen_grid(gammas, ra_inverses, n_per_node: int, seed: int | None = None,
                       r_max: float | None = None, model_units: ModelUnits | None = None
                       ) -> Catalogue:
    """Training data for a conditional flow: ``n_per_node`` stars at every node of the label grid
    gammas x ra_inverses, in one Catalogue with labels [N, 2] = (gamma, a/r_a) (``LABEL_NAMES``).

    Every label is checked first (InputError naming the limit a/r_a <= max_ra_inverse(gamma)).
    Node i (row-major over gammas, then ra_inverses) uses the i-th child of
    ``numpy.random.SeedSequence(seed)``, and the rows are shuffled with the seed's own stream, so
    any batch mixes the nodes. Write it with ``cat.save("grid.h5")`` (or ``.npz``); meta["grid"]
    records the nodes.
    """
    gammas = _label_values(gammas, "gammas")
    ra_inverses = _label_values(ra_inverses, "ra_inverses")
    nodes = [(g, k) for g in gammas for k in ra_inverses]
    for g, k in nodes:
        check_label(g, k)
    n_per_node = validation.integer(n_per_node, "n_per_node")
    r_max = _radius(r_max)
    seed = validation.seed(seed)
    sequence = np.random.SeedSequence(seed)
    children = sequence.spawn(len(nodes))
    pos, vel, labels = [], [], []
    for (g, k), child in zip(nodes, children):
        p, v = _dehnen_phase_space(Dehnen(g, k), n_per_node, r_max, np.random.default_rng(child))
        pos.append(p)
        vel.append(v)
        labels.append(np.tile([g, k], (n_per_node, 1)))
    order = np.random.default_rng(sequence).permutation(n_per_node * len(nodes))
    meta: dict[str, Any] = {
        "source": "tfgalflow.mocks.sample_dehnen_grid", "sampler": "exact", "df": "dehnen-om",
        "grid": {"gamma": gammas, "ra_inverse": ra_inverses}, "n_per_node": n_per_node,
        "seed": seed, "r_max": r_max,
        "model_units": model_units if model_units is not None else ModelUnits(),
    }
    return Catalogue(np.concatenate(pos)[order], np.concatenate(vel)[order],
                     labels=np.concatenate(labels)[order], label_names=LABEL_NAMES,
                     units=MODEL_UNITS, meta=meta)


def _label_values(values: Any, name: str) -> list[float]:
    array = None if isinstance(values, str) else np.atleast_1d(np.asarray(values, dtype=float))
    if array is None or array.ndim != 1 or array.size == 0 or not np.all(np.isfinite(array)):
        raise InputError(f"{name} = {values!r}: expected a non-empty 1-D list of finite numbers")
    return [float(a) for a in array]


def _dehnen_phase_space(model: Dehnen, n: int, r_max: float | None, rng: np.random.Generator
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(pos [n, 3], vel [n, 3]) in model units, drawn as described in :func:`sample_dehnen`."""
    r = _dehnen_radii(model.gamma, n, r_max, rng)
    r_hat, e_theta, e_phi = _spherical_basis(n, rng)
    s = _dehnen_kinetic(model, r, rng)
    p = np.sqrt(2.0 * s)
    mu = rng.uniform(-1.0, 1.0, n)                  # cos of the angle of (v_r, u_t) to r_hat
    v_r = p * mu
    v_t = p * np.sqrt((1.0 - mu) * (1.0 + mu)) / np.sqrt(1.0 + (model.ra_inverse * r) ** 2)
    psi = rng.uniform(0.0, 2.0 * np.pi, n)
    tangent = np.cos(psi)[:, None] * e_theta + np.sin(psi)[:, None] * e_phi
    vel = v_r[:, None] * r_hat + v_t[:, None] * tangent
    return r[:, None] * r_hat, vel


def _dehnen_radii(gamma: float, n: int, r_max: float | None, rng: np.random.Generator
                  ) -> np.ndarray:
    """r with (r/(1+r))^(3-gamma) = u ~ U(0, u_max): ln y = ln u / (3 - gamma), r = y / (1 - y)."""
    log_u_max = 0.0 if r_max is None else (3.0 - gamma) * -math.log1p(1.0 / r_max)
    u = rng.random(n)
    u = np.where(u > 0.0, u, np.finfo(float).tiny)
    log_y = (np.log(u) + log_u_max) / (3.0 - gamma)
    r = np.maximum(np.exp(log_y) / -np.expm1(log_y), np.finfo(float).tiny)
    return r if r_max is None else np.minimum(r, r_max)


def _dehnen_kinetic(model: Dehnen, r: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """s = Psi(r) - Q with density ∝ sqrt(s) f(Psi(r) - s) on [0, Psi(r)], by the cell envelope
    of :func:`sample_dehnen`. Model units.
    """
    g = 2.0 - model.gamma
    ell_r = np.log(r)
    step = _DEHNEN_TABLE_STEP
    grid = np.arange(ell_r.min() - 1.0, max(ell_r.max() + _DEHNEN_SPAN + 1.0, 25.0) + step, step)
    table = _dehnen_log_f_at(model, np.exp(grid), np.zeros(grid.size))
    finite = np.isfinite(table)
    curvature = np.diff(table, 2) / step**2
    concave = np.max(-curvature[np.isfinite(curvature)], initial=0.0)
    cell = _DEHNEN_SPAN / _DEHNEN_CELLS
    margin = 1.5 * max(concave, 0.0) * (cell**2 + step**2) / 8.0 + 1e-12
    table = np.where(finite, table, -np.inf)
    suffix_max = np.maximum.accumulate(table[::-1])[::-1]
    offsets = np.linspace(0.0, _DEHNEN_SPAN, _DEHNEN_CELLS + 1)
    s = np.empty(r.size)
    for start in range(0, r.size, _DEHNEN_CHUNK):
        part = slice(start, start + _DEHNEN_CHUNK)
        s[part] = _dehnen_kinetic_chunk(model, r[part], ell_r[part], g, grid, table, suffix_max,
                                        margin, offsets, rng)
    return s


def _dehnen_log_f_at(model: Dehnen, r: np.ndarray, s: np.ndarray) -> np.ndarray:
    """log f at radius r and Psi(r) - Q = s (model units), through the phase-space point
    x = (r, 0, 0), v = (sqrt(2 s), 0, 0) (L = 0, so Psi - Q = v^2/2 exactly).
    """
    x = np.zeros((r.size, 3))
    x[:, 0] = r
    v = np.zeros((r.size, 3))
    v[:, 0] = np.sqrt(2.0 * s)
    return model.log_df(x, v)


def _dehnen_kinetic_chunk(model, r, ell_r, g, grid, table, suffix_max, margin, offsets, rng):
    n = r.size
    lam = np.log1p(1.0 / r)
    psi = lam * _exprel(-g * lam)
    y_g = np.exp(-g * lam)
    # s_k = Psi(r) - Psi(r e^t_k) = y^g D exprel(g D) with
    # D = lambda(r) - lambda(r e^t) = log1p(expm1(t) / (r e^t + 1)) (no cancellation).
    et = np.exp(offsets)
    d = np.log1p(np.expm1(offsets)[None, :] / (r[:, None] * et[None, :] + 1.0))
    edges = np.minimum(y_g[:, None] * d * _exprel(g * d), psi[:, None])   # [n, K + 1], from 0
    edges = np.concatenate([edges, psi[:, None]], axis=1)                   # + tail to s = Psi
    lf = np.interp(ell_r[:, None] + offsets[None, :], grid, table)
    tail_index = np.searchsorted(grid, ell_r + offsets[-1], side="right") - 1
    log_bound = np.concatenate([np.maximum(lf[:, :-1], lf[:, 1:]),
                                suffix_max[tail_index][:, None]], axis=1) + margin   # [n, K + 1]
    e32 = edges**1.5
    with np.errstate(divide="ignore"):
        log_w = log_bound + np.log(np.maximum(e32[:, 1:] - e32[:, :-1], 0.0))
    log_w = np.where(np.isfinite(log_w), log_w, -np.inf)
    weights = np.exp(log_w - log_w.max(axis=1, keepdims=True))
    cumulative = np.cumsum(weights, axis=1)
    out = np.empty(n)
    todo = np.arange(n)
    for _ in range(_MAX_ROUNDS):
        if not todo.size:
            return out
        target = rng.random(todo.size) * cumulative[todo, -1]
        k = np.minimum((cumulative[todo] < target[:, None]).sum(axis=1), weights.shape[1] - 1)
        lo, hi = e32[todo, k], e32[todo, k + 1]
        s = (lo + rng.random(todo.size) * (hi - lo)) ** (2.0 / 3.0)
        s = np.clip(s, edges[todo, k], edges[todo, k + 1])
        log_ratio = _dehnen_log_f_at(model, r[todo], s) - log_bound[todo, k]
        if np.any(log_ratio > 1e-9):
            raise RuntimeError(f"Dehnen velocity envelope violated (log f - log bound = "
                               f"{log_ratio.max():.3g}) for gamma = {model.gamma}, "
                               f"ra_inverse = {model.ra_inverse}")
        accept = np.log(rng.random(todo.size)) < log_ratio
        out[todo[accept]] = s[accept]
        todo = todo[~accept]
    raise RuntimeError(f"Dehnen speed rejection did not finish in {_MAX_ROUNDS} rounds "
                       f"({todo.size} left)")


def _exprel(z: np.ndarray) -> np.ndarray:
    """(e^z - 1) / z, 1 at z = 0."""
    from scipy.special import exprel

    return exprel(z)


# ---- validation ---------------------------------------------------------------------------------

def _radius(r_max: Any) -> float | None:
    """A truncation radius: None (no truncation) or a finite number > 0."""
    return None if r_max is None else validation.positive_number(r_max, "r_max (radius)")


__all__ = [
    "sample_hernquist",
    "sample_dehnen",
    "sample_dehnen_grid",
    "sample_emcee",
    "cut",
    "add_noise",
    "iso_speeds",
    "ACCEPTANCE_RANGE",
    "NOISE_CONVENTIONS",
]
