"""Accelerations from the collisionless Boltzmann equation (CBE) of a phase-space distribution
function.

A steady-state DF f(x, v) in a potential with acceleration a(x) = -∇Φ obeys the CBE

    v · ∂f/∂x + a · ∂f/∂v = 0,     i.e. (dividing by f)     v · ∇_x log f + a · ∇_v log f = 0,

at every velocity v. Given the DF (a learned :class:`~tfgalflow.model.Flow`, an
:class:`~tfgalflow.model.Ensemble` or an exact DF such as ``Hernquist().exact_density("iso")``), a
at a position x is the least-squares solution over K velocities v_k at that x (An, Naik, Evans &
Burrage 2021, MNRAS 506, 5721, Sec. 5; Green & Ting 2020, arXiv:2011.04673):

    minimise_a  Σ_k (b_k + a · g_k)^2,     b_k = v_k · ∇_x log f(x, v_k),  g_k = ∇_v log f(x, v_k),
    normal equations  (Σ_k g_k g_kᵀ) a = -Σ_k g_k b_k.

The pieces, each usable alone:

* :func:`df_gradients`  ∂log f/∂x and ∂log f/∂v with ``tf.GradientTape`` (batched, traced once);
* :func:`sample_velocities`  K velocities per position from p(v | x) ∝ f(x, v)
  (sampling-importance-resampling, fully batched, stateless seeds; see its docstring for the
  method and its assumptions);
* :class:`CBELayer`  the B least-squares systems solved at once (eigen-decomposition of the 3x3
  normal matrices in float64), with the relative residual and condition number of each fit;
* :func:`accelerations`  the whole chain with validation, chunking, ensemble spread and flags;
* :func:`acceleration_graph`  the same chain as one pure-TF ``tf.function`` (positions [None, 3],
  seed [2], and labels [None, C] for a conditional DF) that :mod:`tfgalflow.export` wraps as the
  SavedModel ``accelerations`` signature.

``jit_compile=True`` (:func:`accelerations`, :func:`solve_cbe`) XLA-compiles the DF evaluations
with the DF's maths inlined (:func:`_inline_log_prob`), in chunks padded to a fixed size so each
compiles once whatever the number of positions; the random numbers and the 3x3 solves stay in the
plain graph, which the exported graph always is. The default, ``jit_compile=None``, picks XLA for
calls large enough to repay the compilation (:func:`xla_by_default`).

A "phase-space DF" here is any :class:`~tfgalflow.density.Density` with ``dim == 6``
(w = concat(x, v) [N, 6]). A conditional DF f(x, v | c) (``label_dim = C > 0``) takes labels with
every call: [C] (one label for all positions) or [B, C] (one per position); every velocity drawn
and every gradient row at position b is evaluated at c_b, and the gradients are taken with respect
to (x, v) only, so the CBE at fixed c gives a(x | c), the acceleration of the system with label c.
Units: positions and velocities in the DF's own units (e.g. kpc, km/s); accelerations come out in
velocity² / length (e.g. (km/s)²/kpc). ``log f`` may be unnormalised: only its gradients enter (a
label-dependent normalisation c -> Z(c) drops out).
"""
from __future__ import annotations

import csv
import functools
import math
import os
import weakref
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tensorflow as tf
import tf_keras as keras

from .atomic import atomic_file
from .density import Density, stateless_seed
from .errors import InputError
from .validation import finite_matrix, integer, positive_number

#: Fewest velocities per position accepted: 3 unknowns plus enough equations for a meaningful
#: residual.
MIN_VELOCITIES = 8
#: Default flag thresholds of :func:`accelerations` (see its docstring for why these values).
MAX_RESIDUAL = 0.8
MAX_CONDITION = 1.0e6
MIN_ESS = 32.0
#: Rows of (position, velocity) pairs per chunk: gradient rows (with tape) and candidate rows
#: (log_prob only).
GRADIENT_ROWS_PER_CHUNK = 2**16
CANDIDATE_ROWS_PER_CHUNK = 2**18
#: Model evaluations (positions x velocities x ``evaluations_per_row``) from which the default
#: ``jit_compile=None`` runs the CBE XLA-compiled (:func:`xla_by_default`).
XLA_MIN_EVALUATIONS = 2**21


# ---- the DF interface ---------------------------------------------------------------------------

def check_df(df: Any) -> None:
    """InputError unless ``df`` is a 6-D phase-space :class:`~tfgalflow.density.Density`
    f(x, v [| c]).
    """
    if not isinstance(df, Density):
        raise InputError(
            f"df must be a phase-space DF (a tfgalflow Density with dim = 6: a Flow, "
            f"Ensemble, SphericalAverage, exact DF or loaded SavedModel); got {type(df).__name__}"
        )
    if df.dim != 6:
        raise InputError(f"df has dim = {df.dim}; the CBE needs a 6-D phase-space DF f(x, v) with "
                         f"w = (x, v) [N, 6]")


def check_labels(df: Density, labels: Any, n_positions: int) -> np.ndarray | None:
    """The labels of a CBE call as a finite float32 [B, C] array, or None for an unconditional DF.

    Args:
        df: the phase-space DF (``label_dim = C``).
        labels: None (unconditional DF), [C] (the same label at every position, tiled to [B, C]) or
            [B, C] (one label per position).
        n_positions: B, the number of positions.

    Raises:
        InputError naming the shapes: labels missing for a conditional DF or given to an
        unconditional one, a wrong width or row count, NaN or inf.
    """
    c = int(df.label_dim)
    if c == 0:
        if labels is not None:
            raise InputError(f"labels were given (shape {list(np.shape(labels))}) but the DF is "
                             f"unconditional (label_dim = 0); pass labels=None")
        return None
    expected = f"[{c}] (one label for every position) or [B, {c}] with B = {n_positions}"
    if labels is None:
        raise InputError(f"the DF is conditional (label_dim = {c}): labels of shape {expected} "
                         f"are required")
    array = labels.numpy() if isinstance(labels, (tf.Tensor, tf.Variable)) else labels
    try:
        array = np.asarray(array, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"labels cannot be read as a float array ({exc}); "
                         f"expected {expected}") from None
    if array.ndim == 1 and array.shape[0] == c:
        array = np.tile(array[None, :], (n_positions, 1))
    if array.ndim != 2 or array.shape != (n_positions, c):
        raise InputError(f"labels have shape {list(array.shape)}; expected {expected}")
    return finite_matrix(array, "labels", width=c, expected=expected, dtype=np.float32)


def xla_by_default(df: Any, n_positions: int, k: int) -> bool:
    """Whether the default ``jit_compile=None`` runs a CBE call XLA-compiled.

    :func:`accelerations` and :func:`solve_cbe` compile a call of B = ``n_positions`` positions x
    K = ``k`` velocities when

        df.uses_xla  and  B K e >= XLA_MIN_EVALUATIONS     (e = df.evaluations_per_row).

    XLA saves a fraction of the time per position but costs seconds of compilation once per DF and
    setting (and per ensemble member), so it pays off only for large calls; DFs that do not run
    their own eager calls under XLA (the exact DFs, whose transcendental gradients XLA compiles to
    slower code; loaded SavedModels, which cannot be inlined) stay on the plain graph. The
    threshold is where the saving measured by ``benchmarks/bench_cbe.py`` repays the compilation
    (figures: benchmarks/README.md). The answer depends on the call's size only, never on what
    was compiled before, so the same call always takes the same path.
    """
    uses_xla = bool(getattr(df, "uses_xla", False))
    return uses_xla and n_positions * k * int(df.evaluations_per_row) >= XLA_MIN_EVALUATIONS


def _jit(df: Any, jit_compile: bool | None, n_positions: int, k: int) -> bool:
    """The effective ``jit_compile`` of a call: the caller's choice, or :func:`xla_by_default`."""
    return xla_by_default(df, n_positions, k) if jit_compile is None else bool(jit_compile)


def _positions_per_chunk(df: Any, k: int, m: int | None = None) -> int:
    """Default chunk C (>= 1) for K gradient rows (and M candidate rows, if sampling) per position:
    C K <= GRADIENT_ROWS_PER_CHUNK and C M <= CANDIDATE_ROWS_PER_CHUNK model evaluations.
    """
    e = df.evaluations_per_row
    c = GRADIENT_ROWS_PER_CHUNK // (k * e)
    return max(1, c if m is None else min(c, CANDIDATE_ROWS_PER_CHUNK // (m * e)))


def _velocity_scale(df: Density, override: float | None) -> Callable[[], tf.Tensor]:
    """A function returning the DF's typical speed v0 (scalar float32 tensor), read at trace time.

    Only centres the pilot grid of :func:`sample_velocities` (which spans v0 x 10^±3), so it may be
    off by a large factor: the rms of the velocity part of ``df.scale_hint()`` (a flow's rescaler
    scales, the exact DF's velocity unit), or 1 when the DF gives no hint.
    """
    if override is not None:
        override = positive_number(override, "velocity_scale")
        return lambda: tf.constant(override, tf.float32)

    # looked up now: the closure must not keep the DF alive (caches)
    scale = df.scale_hint()
    if scale is None:
        return lambda: tf.constant(1.0, tf.float32)
    return lambda: tf.sqrt(tf.reduce_mean(tf.square(tf.cast(scale[3:6], tf.float32))))


def _as_vectors(value: Any, name: str) -> np.ndarray:
    """[B, 3] finite float32 array from ``value`` or InputError naming ``name`` and the expected
    shape.
    """
    return finite_matrix(value, name, width=3, expected="[B, 3]", dtype=np.float32)


def check_positions(positions: Any) -> np.ndarray:
    """Positions as a finite float32 [B, 3] array (B >= 1), or InputError naming the problem and
    the shape.
    """
    return _as_vectors(positions, "positions")


# ---- derivatives --------------------------------------------------------------------------------

def _inline_log_prob(df: Density) -> Callable[[tf.Tensor, tf.Tensor | None], tf.Tensor] | None:
    """log f(w [N, 6] float32, labels [N, C] | None) -> [N] as plain TF ops traced into the
    caller's graph, or None.

    XLA needs the DF's maths inline: a DF whose ``log_prob`` calls its own ``tf.function``,
    differentiated inside a ``jit_compile`` function, makes XLA recompile on every call (the inputs
    are treated as compile-time constants). The contract's ``log_prob_tensor`` is that maths;
    densities that are not plain TF ops (``inlinable`` False: a loaded SavedModel, or an average of
    one) get None and stay on the plain graph.
    """
    return (lambda w, labels: df.log_prob_tensor(w, labels)) if df.inlinable else None


def _rows_labels(labels: tf.Tensor | None, shape: tf.Tensor) -> tf.Tensor | None:
    """Labels [C, L] of C positions repeated for the rows [C, M] of each: [C M, L] (None: None)."""
    if labels is None:
        return None
    per_row = tf.broadcast_to(labels[:, None, :], tf.concat([shape[:2], tf.shape(labels)[1:]], 0))
    return tf.reshape(per_row, [-1, tf.shape(labels)[1]])


def _gradients_tensor(df: Any, x: tf.Tensor, v: tf.Tensor, log_prob: Callable | None = None,
                      labels: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(∂log f/∂x [N, 3], ∂log f/∂v [N, 3], log f [N]) by one GradientTape pass over w = (x, v).

    ``log_prob(w, labels)``: the function of w to differentiate (default ``df.log_prob``;
    :func:`_inline_log_prob` under XLA). ``labels`` [N, C] | None are held fixed (not watched).
    """
    w = tf.concat([x, v], axis=1)
    with tf.GradientTape() as tape:
        tape.watch(w)
        log_f = (log_prob or df.log_prob)(w, labels)
    # Rows are independent: d(Σ_n log f_n)/dw_n = d log f_n/dw_n.
    # constant f: 0
    grad = tape.gradient(log_f, w, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return grad[:, :3], grad[:, 3:], log_f


_GRADIENT_FNS: "weakref.WeakKeyDictionary[Any, Callable]" = weakref.WeakKeyDictionary()


def df_gradients(df: Any, x: Any, v: Any, labels: Any = None) -> tuple[tf.Tensor, tf.Tensor]:
    """∇_x log f and ∇_v log f at phase-space points (x_n, v_n), by automatic differentiation.

        dlogf_dx[n] = ∂ log f/∂x (x_n, v_n | c_n),    dlogf_dv[n] = ∂ log f/∂v (x_n, v_n | c_n)

    For an :class:`~tfgalflow.model.Ensemble` these are derivatives of the log of the ensemble-mean
    density (what ``Ensemble.log_prob`` is), i.e. Σ_k w_k ∇ log f_k with posterior weights
    w_k ∝ f_k. The labels c are held fixed: no derivative with respect to them is taken.

    Args:
        df: phase-space DF (``.dim == 6``, ``.log_prob(w [N, 6], labels)``).
        x: positions [B, 3] (length unit of the DF).
        v: velocities [B, 3] (velocity unit).
        labels: None (unconditional DF), [C] (the same for every row) or [B, C] (conditional DF).

    Returns:
        (dlogf_dx [B, 3] in 1/length, dlogf_dv [B, 3] in 1/velocity), float32 tensors. Rows where
        log f is not finite (outside the support) carry whatever the DF's gradient is there (0 for
        the exact Hernquist DF; :class:`CBELayer` ignores them when given the mask).

    Traced once per DF (``tf.function`` with input_signature [None, 3] x 2 (+ [None, C])).
    """
    check_df(df)
    x = _as_vectors(x, "x")
    v = _as_vectors(v, "v")
    if x.shape[0] != v.shape[0]:
        raise InputError(
            f"x has {x.shape[0]} rows but v has {v.shape[0]}; expected x, v both [B, 3]"
        )
    c = check_labels(df, labels, x.shape[0])
    fn = _GRADIENT_FNS.get(df)
    if fn is None:
        spec = tf.TensorSpec([None, 3], tf.float32)
        ref = weakref.ref(df)        # the cache must not keep the DF alive
        if c is None:
            fn = tf.function(lambda x, v: _gradients_tensor(ref(), x, v)[:2],
                             input_signature=[spec, spec], autograph=False)
        else:
            c_spec = tf.TensorSpec([None, df.label_dim], tf.float32)
            fn = tf.function(lambda x, v, c: _gradients_tensor(ref(), x, v, labels=c)[:2],
                             input_signature=[spec, spec, c_spec], autograph=False)
        _GRADIENT_FNS[df] = fn
    args = (tf.constant(x), tf.constant(v)) + (() if c is None else (tf.constant(c),))
    return fn(*args)


# ---- velocity sampling at fixed x ---------------------------------------------------------------

@dataclass(frozen=True)
class SamplerConfig:
    """Settings of the sampling-importance-resampling draw of :func:`sample_velocities`.

    Attributes:
        candidates: proposal draws M per position in the final SIR stage (>= 2K is sensible; the
            default ``None`` means max(4K, 1024)). The pilot stage uses M/2.
        pilot_directions: random directions of the log-spaced speed grid (stage 0).
        pilot_decades: the grid spans v0 x 10^(±pilot_decades), v0 from the DF (see
            ``velocity_scale``).
        pilot_per_decade: grid speeds per decade.
        dof: degrees of freedom ν of the Student-t proposals (integer >= 3: heavier tails than the
            target).
        pilot_inflation: stage-1 proposal scale = pilot_inflation x (grid rms speed / sqrt 3).
        inflation: stage-2 proposal scale matrix = inflation^2 x (stage-1 weighted covariance).
    """

    candidates: int | None = None
    pilot_directions: int = 8
    pilot_decades: float = 3.0
    pilot_per_decade: int = 4
    dof: int = 4
    pilot_inflation: float = 1.5
    inflation: float = 1.0

    def __post_init__(self) -> None:
        if self.candidates is not None:
            integer(self.candidates, "SamplerConfig.candidates", 2)
        integer(self.pilot_directions, "SamplerConfig.pilot_directions", 1)
        integer(self.pilot_per_decade, "SamplerConfig.pilot_per_decade", 1)
        integer(self.dof, "SamplerConfig.dof", 3)
        for name in ("pilot_decades", "pilot_inflation", "inflation"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise InputError(
                    f"SamplerConfig.{name} = {value!r}: expected a finite positive number"
                )

    def n_candidates(self, k: int) -> int:
        """M, the stage-2 candidates per position for K draws."""
        return self.candidates if self.candidates is not None else max(4 * k, 1024)

    def key(self) -> tuple:
        """The settings as a hashable tuple (the key of the traced-solver cache)."""
        return tuple(getattr(self, f.name) for f in fields(self))


def _log_f_at(df: Any, x: tf.Tensor, v: tf.Tensor, log_prob: Callable | None = None,
              labels: tf.Tensor | None = None) -> tf.Tensor:
    """log f(x_c, v_cm | c_c): x [C, 3], v [C, M, 3], labels [C, L] | None -> [C, M]; NaN and +inf
    (measure-zero singularities) -> -inf.
    """
    shape = tf.shape(v)
    w = tf.concat([tf.broadcast_to(x[:, None, :], shape), v], axis=2)
    rows = _rows_labels(labels, shape)
    log_f = tf.reshape((log_prob or df.log_prob)(tf.reshape(w, [-1, 6]), rows), shape[:2])
    return tf.where(tf.math.is_finite(log_f), log_f, tf.constant(-np.inf, log_f.dtype))


def _t_noise(shape: tf.Tensor, dof: int, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """The normal draws behind standard 3-D Student-t draws: z [C, M, 3] and ν normals [C, M, ν]
    for χ²_ν.
    """
    z = tf.random.stateless_normal(tf.concat([shape, [3]], 0), seed=seed)
    chi = tf.random.stateless_normal(tf.concat([shape, [dof]], 0),
                                     seed=tf.random.experimental.stateless_fold_in(seed, 1))
    return z, chi


def _standard_t(z: tf.Tensor, chi: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Standard 3-D Student-t draws y [C, M, 3] and log q(y) [C, M] from :func:`_t_noise`
    (ν = chi's last axis).

    y = z / sqrt(χ²_ν / ν),  χ²_ν = Σ chi²,
    log q(y) = lnΓ((ν+3)/2) - lnΓ(ν/2) - (3/2) ln(νπ) - ((ν+3)/2) ln(1 + |y|²/ν)
    """
    dof = int(chi.shape[-1])
    chi2 = tf.reduce_sum(tf.square(chi), axis=-1)
    y = z * tf.math.rsqrt(chi2 / dof)[..., None]
    nu = float(dof)
    log_norm = math.lgamma((nu + 3) / 2) - math.lgamma(nu / 2) - 1.5 * math.log(nu * math.pi)
    return y, log_norm - 0.5 * (nu + 3) * tf.math.log1p(tf.reduce_sum(tf.square(y), -1) / nu)


def _normalised_weights(log_w: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(p [C, M] = w / Σ w, any-finite [C]); rows without a finite weight get p = 0."""
    found = tf.reduce_any(tf.math.is_finite(log_w), axis=1)
    safe = tf.where(found[:, None], log_w, tf.zeros_like(log_w))
    return tf.where(found[:, None], tf.nn.softmax(safe, axis=1), tf.zeros_like(log_w)), found


def _sampler_noise(
    c: tf.Tensor, m: int, seed: tf.Tensor, cfg: SamplerConfig
) -> dict[str, tf.Tensor]:
    """Every random number of the SIR draw at C positions except the final resampling (stateless,
    from ``seed``).

    dirs [C, pilot_directions, 3] (stage 0), z1/chi1 [C, M/2, 3/ν] (stage 1), z2/chi2 [C, M, 3/ν]
    (stage 2). Kept apart from :func:`_sir_weights` so that the deterministic maths can be
    XLA-compiled while the random streams stay those of the plain graph (XLA draws other numbers
    from the same stateless seed).
    """
    stage_seed = [tf.random.experimental.stateless_fold_in(seed, i) for i in range(3)]
    dirs = tf.random.stateless_normal(tf.stack([c, cfg.pilot_directions, 3]), seed=stage_seed[0])
    z1, chi1 = _t_noise(tf.stack([c, m // 2]), cfg.dof, stage_seed[1])
    z2, chi2 = _t_noise(tf.stack([c, m]), cfg.dof, stage_seed[2])
    return {"dirs": dirs, "z1": z1, "chi1": chi1, "z2": z2, "chi2": chi2}


def _sir_weights(
    df: Any,
    x: tf.Tensor,
    v0: tf.Tensor,
    noise: dict[str, tf.Tensor],
    m: int,
    cfg: SamplerConfig,
    log_prob: Callable | None = None,
    labels: tf.Tensor | None = None,
) -> dict[str, tf.Tensor]:
    """Stages 0-2 of :func:`sample_velocities` at C positions x [C, 3] (labels [C, L] | None),
    given :func:`_sampler_noise` (no RNG).

    Returns the stage-2 candidates [C, M, 3], their truncated log importance weights ``logits`` [C,
    M], ``ess`` [C], ``support`` [C] and ``log_density`` [C].
    """
    c = tf.shape(x)[0]
    # Stage 0: log-spaced speeds along random directions; weight f s^3 (volume s^2 ds = s^3 dln s).
    n_s = int(round(2 * cfg.pilot_decades * cfg.pilot_per_decade)) + 1
    # [S]
    speeds = v0 * tf.pow(10.0, tf.linspace(-cfg.pilot_decades, cfg.pilot_decades, n_s))
    dirs = noise["dirs"]
    dirs = dirs / tf.norm(dirs, axis=-1, keepdims=True)
    grid = tf.reshape(
        dirs[:, :, None, :] * speeds[None, None, :, None], [c, cfg.pilot_directions * n_s, 3]
    )
    log_w0 = (_log_f_at(df, x, grid, log_prob, labels)
              + tf.tile(3.0 * tf.math.log(speeds), [cfg.pilot_directions])[None, :])
    p0, found0 = _normalised_weights(log_w0)
    rms = tf.sqrt(tf.reduce_sum(p0 * tf.reduce_sum(tf.square(grid), -1), axis=1) / 3.0)
    # [C]
    sigma1 = tf.where(found0 & (rms > 0), cfg.pilot_inflation * rms, v0)
    # Stage 1: isotropic Student-t about 0 with scale sigma1 -> weighted mean and covariance of v.
    y1, log_q1 = _standard_t(noise["z1"], noise["chi1"])
    v1 = sigma1[:, None, None] * y1
    log_w1 = _log_f_at(df, x, v1, log_prob, labels) - (log_q1 - 3.0 * tf.math.log(sigma1)[:, None])
    p1, found1 = _normalised_weights(log_w1)
    # [C, 3]
    mean = tf.reduce_sum(p1[..., None] * v1, axis=1)
    d = v1 - mean[:, None, :]
    cov = tf.einsum("cm,cmi,cmj->cij", p1, d, d)
    eye = tf.eye(3, batch_shape=[c])
    ridge = 1e-3 * tf.linalg.trace(cov) / 3.0 + 1e-6 * tf.square(sigma1)
    cov = cov + ridge[:, None, None] * eye
    mean = tf.where(found1[:, None], mean, tf.zeros_like(mean))
    cov = tf.where(found1[:, None, None], cov, tf.square(sigma1)[:, None, None] * eye)
    # Stage 2: multivariate Student-t(mean, inflation^2 cov); importance weights f/q.
    chol = cfg.inflation * tf.linalg.cholesky(cov)
    y2, log_q2 = _standard_t(noise["z2"], noise["chi2"])
    v2 = mean[:, None, :] + tf.einsum("cij,cmj->cmi", chol, y2)
    log_det = tf.reduce_sum(tf.math.log(tf.linalg.diag_part(chol)), axis=1)
    log_w2 = _log_f_at(df, x, v2, log_prob, labels) - (log_q2 - log_det[:, None])
    found2 = tf.reduce_any(tf.math.is_finite(log_w2), axis=1)
    log_w2 = tf.where(found2[:, None], log_w2, tf.zeros_like(log_w2))
    # log of the mean raw weight
    log_mean = tf.reduce_logsumexp(log_w2, axis=1) - math.log(m)
    # Truncated importance sampling (Ionides 2008): cap the weights at sqrt(M) x their mean.
    log_w2t = tf.minimum(log_w2, (log_mean + 0.5 * math.log(m))[:, None])
    log_sum = tf.reduce_logsumexp(log_w2t, axis=1)
    ess = tf.where(
        found2,
        tf.exp(2.0 * log_sum - tf.reduce_logsumexp(2.0 * log_w2t, axis=1)),
        tf.zeros_like(log_sum),
    )
    return {"candidates": v2, "logits": log_w2t, "ess": ess, "support": found0 | found1 | found2,
            "log_density": tf.where(found2, log_mean, tf.fill([c], -np.inf))}


def _sample_velocities_tensor(
    df: Any,
    x: tf.Tensor,
    k: int,
    m: int,
    seed: tf.Tensor,
    v0: tf.Tensor,
    cfg: SamplerConfig,
    weights: Callable | None = None,
    labels: tf.Tensor | None = None,
) -> dict[str, tf.Tensor]:
    """SIR draw of K velocities at each of C positions x [C, 3] (labels [C, L] | None; pure TF);
    see :func:`sample_velocities`.

    ``weights(x, v0, noise, labels)``: :func:`_sir_weights` of the DF (default), or an XLA-compiled
    version of it. The random numbers do not depend on the labels.
    """
    noise = _sampler_noise(tf.shape(x)[0], m, seed, cfg)
    if weights is None:
        def weights(x, v0, noise, labels):
            return _sir_weights(df, x, v0, noise, m, cfg, labels=labels)
    sir = weights(x, v0, noise, labels)
    # Resample K candidates with probabilities w / Σ w (stage 2's truncated weights).
    index = tf.random.stateless_categorical(
        sir["logits"],
        k,
        seed=tf.random.experimental.stateless_fold_in(seed, 3),
        # [C, K]
        dtype=tf.int32,
    )
    return {"velocities": tf.gather(sir["candidates"], index, batch_dims=1), "ess": sir["ess"],
            "support": sir["support"], "log_density": sir["log_density"]}


# ---- the least-squares layer --------------------------------------------------------------------

class CBELayer(keras.layers.Layer):
    """Batched least-squares solution of the CBE  v · ∇_x log f + a · ∇_v log f = 0  at B
    positions.

    For each position b, with K velocities v_k and gradients g_x,k = ∇_x log f, g_v,k = ∇_v log f:

        minimise_a Σ_k m_k (b_k + a · g_v,k)^2,   b_k = v_k · g_x,k,   m_k ∈ {0, 1} (mask)
        N a = r,   N = Σ_k m_k g_v,k g_v,kᵀ  [3, 3],   r = -Σ_k m_k g_v,k b_k,

    solved for all B at once through the eigen-decomposition N = V diag(λ) Vᵀ: a = V diag(1/λ) Vᵀ
    r. Outputs (in the layer's dtype, float32 by default):

    * acceleration [B, 3] (velocity²/length); NaN where N is singular (λ_min <= 0, e.g. no valid
    rows);
    * residual [B]: relative residual ||b + G a|| / ||b|| of the fit (0 = the CBE holds exactly at
    every
      v_k; 1 = a explains nothing; 0 when b = 0 and the fit is exact);
    * condition [B]: λ_max / λ_min of N (= cond(G)², G the K x 3 matrix of g_v,k); inf if singular.

    Inputs: ``(dlogf_dx [B, K, 3], dlogf_dv [B, K, 3], v [B, K, 3])`` or with a fourth ``mask [B,
        K]``
    (1 = use the row). Rows with any non-finite entry are always dropped.

    ``solve_dtype`` ("float64" default): the products and the 3x3 solve are done in this dtype:
    forming N squares the condition number, so a float32 solve loses accuracy wherever the
    gradients make N ill-conditioned (the β = 1/2 DF's 1/L gradients do); the float64 cost is
    negligible next to the DF evaluations (figures: benchmarks/README.md).

    Reference: An, Naik, Evans & Burrage 2021, MNRAS 506, 5721, Sec. 5.
    """

    def __init__(self, solve_dtype: str = "float64", **kwargs):
        kwargs.setdefault("trainable", False)
        super().__init__(**kwargs)
        if solve_dtype not in ("float32", "float64"):
            raise InputError(
                f"CBELayer(solve_dtype={solve_dtype!r}): expected 'float32' or 'float64'"
            )
        self.solve_dtype = tf.as_dtype(solve_dtype)

    def get_config(self) -> dict:
        """Keras' layer config, with ``solve_dtype``."""
        return {**super().get_config(), "solve_dtype": self.solve_dtype.name}

    def call(self, inputs):
        """(acceleration [B, 3], residual [B], condition [B]) from the gradients (see the
        class).
        """
        if not isinstance(inputs, (tuple, list)) or len(inputs) not in (3, 4):
            raise InputError(
                "CBELayer expects (dlogf_dx [B, K, 3], dlogf_dv [B, K, 3], v [B, K, 3]"
                "[, mask [B, K]])"
            )
        for name, t in zip(("dlogf_dx", "dlogf_dv", "v"), inputs[:3]):
            shape = tf.TensorShape(getattr(t, "shape", np.shape(t)))
            if shape.rank != 3 or (shape[-1] is not None and shape[-1] != 3):
                raise InputError(f"CBELayer input {name} has shape {shape}; expected [B, K, 3]")
        return self._solve(*self._normal_equations(*inputs))

    def _normal_equations(
        self, g_x, g_v, v, mask=None
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
        """The rows that enter the fit and their normal equations, in the solve dtype (row-wise
        maths only).

        Returns (g [B, K, 3] = m_k g_v,k, b [B, K] = m_k v_k · g_x,k, N [B, 3, 3], r [B, 3]);
        m_k = 0 for masked-out rows and rows with a non-finite entry.
        """
        dt = self.solve_dtype
        g_x, g_v, v = (tf.cast(t, dt) for t in (g_x, g_v, v))
        valid = tf.reduce_all(
            tf.math.is_finite(g_x) & tf.math.is_finite(g_v) & tf.math.is_finite(v), axis=-1
        )
        if mask is not None:
            valid = valid & (tf.cast(mask, dt) > 0)
        keep = valid[..., None]
        # [B, K]
        b = tf.reduce_sum(tf.where(keep, v * g_x, tf.zeros_like(v)), axis=-1)
        # [B, K, 3]
        g = tf.where(keep, g_v, tf.zeros_like(g_v))
        normal = tf.einsum("bki,bkj->bij", g, g)
        rhs = -tf.einsum("bki,bk->bi", g, b)
        return g, b, normal, rhs

    def _solve(self, g: tf.Tensor, b: tf.Tensor, normal: tf.Tensor, rhs: tf.Tensor
               ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """(a [B, 3], residual [B], condition [B]) from :meth:`_normal_equations` (one 3x3 system
        at a time).
        """
        dt = self.solve_dtype
        # ascending
        lam, vec = tf.linalg.eigh(normal)
        regular = lam[:, 0] > 0
        safe_lam = tf.where(regular[:, None], lam, tf.ones_like(lam))
        a = tf.einsum("bij,bj->bi", vec, tf.einsum("bji,bj->bi", vec, rhs) / safe_lam)
        a = tf.where(regular[:, None], a, tf.fill(tf.shape(a), tf.constant(np.nan, dt)))
        condition = tf.where(
            regular,
            lam[:, 2] / safe_lam[:, 0],
            tf.fill(tf.shape(regular), tf.constant(np.inf, dt)),
        )
        misfit = tf.norm(
            b + tf.einsum("bki,bi->bk", g, tf.where(regular[:, None], a, tf.zeros_like(a))), axis=1
        )
        scale = tf.norm(b, axis=1)
        residual = tf.where(scale > 0, misfit / tf.where(scale > 0, scale, tf.ones_like(scale)),
                            tf.where(misfit > 0, tf.constant(np.inf, dt), tf.zeros_like(misfit)))
        out = self.compute_dtype or "float32"
        return tf.cast(a, out), tf.cast(residual, out), tf.cast(condition, out)


def _cbe_gradients(df: Any, x: tf.Tensor, v: tf.Tensor, log_prob: Callable | None = None,
                   labels: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """CBELayer inputs at (x_c, v_ck | c_c): x [C, 3], v [C, K, 3], labels [C, L] | None ->
    ∇_x log f, ∇_v log f [C, K, 3], mask [C, K].

    mask: log f is finite (the row enters the fit).
    """
    shape = tf.shape(v)
    x_rows = tf.reshape(tf.broadcast_to(x[:, None, :], shape), [-1, 3])
    g_x, g_v, log_f = _gradients_tensor(df, x_rows, tf.reshape(v, [-1, 3]), log_prob,
                                        _rows_labels(labels, shape))
    return (
        tf.reshape(g_x, shape),
        tf.reshape(g_v, shape),
        tf.reshape(tf.math.is_finite(log_f), shape[:2]),
    )


def _solve_tensor(df: Any, layer: CBELayer, x: tf.Tensor, v: tf.Tensor,
                  normal_equations: Callable | None = None, labels: tf.Tensor | None = None
                  ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """CBELayer on the DF's gradients at (x_c, v_ck | c_c): x [C, 3], v [C, K, 3],
    labels [C, L] | None -> ([C, 3], [C], [C]).

    ``normal_equations(x, v[, labels])``: an XLA-compiled :func:`_xla_normal_equations`, or None
    for the whole layer in the plain graph. The 3x3 solves are never XLA-compiled: XLA's batched
    eigh iterates until every matrix of the batch has converged, so one position's answer would
    depend on the others in its chunk, while LAPACK solves each system on its own.
    """
    if normal_equations is None:
        g_x, g_v, mask = _cbe_gradients(df, x, v, labels=labels)
        return layer((g_x, g_v, v, mask))
    return layer._solve(*normal_equations(x, v, *(() if labels is None else (labels,))))


def _xla_normal_equations(df: Any, layer: CBELayer) -> Callable:
    """(x, v[, labels]) -> CBELayer._normal_equations of the DF's gradients, inlined (XLA)."""
    def normal_equations(x, v, labels=None):
        g_x, g_v, mask = _cbe_gradients(df, x, v, _inline_log_prob(df), labels)
        return layer._normal_equations(g_x, g_v, v, mask)
    return normal_equations


_SOLVE_FNS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _solve_fn(df: Any, chunk: int, k: int, jit_compile: bool) -> Callable:
    """Cached traced gradients + CBELayer of ``df``: (x [C, 3], v [C, K, 3][, labels [C, L]]) ->
    ([C, 3], [C], [C]); labels only for a conditional DF.

    Plain graph: any C, K (traced once). XLA: the gradients and the layer's row-wise maths
    (:func:`_xla_normal_equations`) XLA-compiled at fixed shapes [chunk, k] (once per DF, chunk and
    K; callers pad the last chunk), the 3x3 solves in the plain graph.
    """
    per_df = _SOLVE_FNS.setdefault(df, {})
    key = (chunk, k) if jit_compile else None
    if key not in per_df:
        layer, ref = CBELayer(), weakref.ref(df)
        rows = chunk if jit_compile else None
        specs = [tf.TensorSpec([rows, 3], tf.float32),
                 tf.TensorSpec([rows, k if jit_compile else None, 3], tf.float32)]
        if df.label_dim:
            specs.append(tf.TensorSpec([rows, df.label_dim], tf.float32))
        normal_equations = None
        # the DF is looked up at trace time: a closure over it would keep it alive
        if jit_compile:
            normal_equations = tf.function(
                lambda x, v, *c: _xla_normal_equations(ref(), layer)(x, v, *c),
                input_signature=specs, autograph=False, jit_compile=True)
        per_df[key] = tf.function(
            lambda x, v, *c: _solve_tensor(ref(), layer, x, v, normal_equations, *c),
            autograph=False, input_signature=specs)
    return per_df[key]


def _pad_rows(t: np.ndarray, n: int) -> np.ndarray:
    """``t`` with its last row repeated up to n rows (a valid, typical input: no NaN from
    padding).
    """
    return t if len(t) == n else np.concatenate([t, np.repeat(t[-1:], n - len(t), axis=0)], axis=0)


def solve_cbe(df: Any, positions: Any, velocities: Any, chunk_size: int | None = None, *,
              labels: Any = None, jit_compile: bool | None = None
              ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """The CBE least squares at given velocities: gradients of log f at (x_b, v_bk), then
    :class:`CBELayer`.

    For velocities from elsewhere (e.g. the observed stars near x, as in Green & Ting 2020, or a
    shared :func:`sample_velocities` draw). Rows where log f is not finite are left out of the fit.

    Args:
        df: phase-space DF.
        positions: [B, 3] in the DF's length unit.
        velocities: [B, K, 3] (K >= 3) in its velocity unit.
        chunk_size: positions per traced call (default 2^16 / K), bounding memory.
        labels: a conditional DF's labels, [C] (every position) or [B, C] (one per position, used
            for all its K velocities); None for an unconditional DF.
        jit_compile: XLA-compile the gradients and the row-wise part of the layer (see
            :func:`accelerations`); chunks are padded to ``chunk_size`` positions, so it compiles
            once per DF, K and chunk size. Same answers as the plain graph to float32 round-off.
            None (default): XLA for large calls of DFs that use XLA (:func:`xla_by_default`);
            False: the plain graph.

    Returns:
        (acceleration [B, 3], residual [B], condition [B]) float32 tensors, as :class:`CBELayer`.
    """
    check_df(df)
    x = _as_vectors(positions, "positions")
    v = np.asarray(
        velocities.numpy() if isinstance(velocities, (tf.Tensor, tf.Variable)) else velocities,
        dtype=np.float32,
    )
    if v.ndim != 3 or v.shape[0] != x.shape[0] or v.shape[2] != 3 or v.shape[1] < 3:
        raise InputError(
            f"velocities have shape {list(v.shape)}; expected [B, K, 3] with B = {x.shape[0]} "
            f"(the rows of positions) and K >= 3"
        )
    c = check_labels(df, labels, x.shape[0])
    k = v.shape[1]
    chunk = integer(
        chunk_size if chunk_size is not None else _positions_per_chunk(df, k), "chunk_size", 1
    )
    jit = _jit(df, jit_compile, len(x), k) and _inline_log_prob(df) is not None
    fn = _solve_fn(df, chunk, k, jit)
    arrays = [x, v] + ([] if c is None else [c])
    if len(x) == chunk or (len(x) < chunk and not jit):         # one call, nothing to pad or join
        return tuple(fn(*map(tf.constant, arrays)))
    parts = []
    for i in range(0, len(x), chunk):
        pieces = [t[i:i + chunk] for t in arrays]
        n = len(pieces[0])
        out = fn(*(tf.constant(_pad_rows(t, chunk) if jit else t) for t in pieces))
        parts.append([t.numpy()[:n] for t in out])
    return tuple(tf.constant(np.concatenate([p[j] for p in parts])) for j in range(3))


# ---- the whole chain, pure TF -------------------------------------------------------------------

class _Solver:
    """Sampler + gradients + CBELayer for one DF and one setting, traced once (per chunk of C
    positions).
    """

    def __init__(
        self,
        df: Any,
        k: int,
        cfg: SamplerConfig,
        velocity_scale: float | None,
        solve_dtype: str,
        chunk_size: int | None,
        jit_compile: bool = False,
    ):
        check_df(df)
        # cached per DF in a WeakKeyDictionary: must not keep the DF alive
        self._df = weakref.ref(df)
        self.k, self.cfg = k, cfg
        self.label_dim = int(df.label_dim)
        self.m = cfg.n_candidates(k)
        self.v0 = _velocity_scale(df, velocity_scale)
        self.layer = CBELayer(solve_dtype)
        self.chunk = integer(
            chunk_size if chunk_size is not None else _positions_per_chunk(df, k, self.m),
            "chunk_size",
            1,
        )
        self._xla_normal_equations = self._xla_weights = None
        if jit_compile and _inline_log_prob(df) is not None:
            self._compile_with_xla()
        specs = [
            tf.TensorSpec([None, 3], tf.float32, name="positions"),
            tf.TensorSpec([2], tf.int64, name="seed"),
        ]
        if self.label_dim:
            specs.append(tf.TensorSpec([None, self.label_dim], tf.float32, name="labels"))
        self._specs = specs

    @functools.cached_property
    def velocities(self) -> Any:
        """tf.function (positions [B, 3], seed [2], labels [B, L]?) -> sampled velocities."""
        return self._function(self._sample_chunk)

    @functools.cached_property
    def solve(self) -> Any:
        """tf.function (positions [B, 3], seed [2], labels [B, L]?) -> the CBE outputs."""
        return self._function(self._solve_chunk)

    def _function(self, chunk_fn: Callable) -> Any:
        """The chunked ``chunk_fn`` as a tf.function of the solver's input signature, traced now
        (the cached properties above call this once, on first use; autograph off: no Python
        control flow on tensors anywhere in the chain; faster tracing).

        Every solver traces its own functions, by design; tracing through
        ``get_concrete_function`` keeps those traces out of TF's frequent-retracing detector,
        which counts traces per source line and warned "5 out of the last 5 calls ... triggered
        tf.function retracing" whenever a script evaluated several DFs or settings.
        """
        function = tf.function(lambda p, s, *c: self._chunked(p, s, chunk_fn, *c),
                               input_signature=self._specs, autograph=False)
        function.get_concrete_function()
        return function

    def _compile_with_xla(self) -> None:
        """XLA for the DF evaluations and the row-wise maths: :func:`_sir_weights`,
        :func:`_xla_normal_equations`.

        The random numbers and the least squares stay in the plain graph (see
        :func:`_sampler_noise` and :func:`_solve_tensor`). Fixed shapes of ``chunk`` positions, so
        each compiles once; chunks of C < chunk positions are padded (:meth:`_padded`).
        """
        c, k, m, cfg = self.chunk, self.k, self.m, self.cfg
        noise = {
            "dirs": [c, cfg.pilot_directions, 3],
            "z1": [c, m // 2, 3],
            "chi1": [c, m // 2, cfg.dof],
            "z2": [c, m, 3],
            "chi2": [c, m, cfg.dof],
        }
        specs = [tf.TensorSpec([c, 3], tf.float32), tf.TensorSpec([], tf.float32),
                 {key: tf.TensorSpec(shape, tf.float32) for key, shape in noise.items()}]
        label_specs = [tf.TensorSpec([c, self.label_dim], tf.float32)] if self.label_dim else []
        # The DF's maths is looked up at trace time: a closure over it would keep the DF alive.
        self._xla_weights = tf.function(
            lambda x, v0, noise, *labels: _sir_weights(self.df, x, v0, noise, m, cfg,
                                                       _inline_log_prob(self.df), *labels),
            input_signature=specs + label_specs, autograph=False, jit_compile=True)
        self._xla_normal_equations = tf.function(
            lambda x, v, *labels: _xla_normal_equations(self.df, self.layer)(x, v, *labels),
            input_signature=[tf.TensorSpec([c, 3], tf.float32),
                             tf.TensorSpec([c, k, 3], tf.float32), *label_specs],
            autograph=False, jit_compile=True)

    @property
    def df(self) -> Any:
        df = self._df()
        if df is None:
            raise InputError(
                "the DF this acceleration graph was built for no longer exists; keep a reference "
                "to the model while the graph is in use"
            )
        return df

    def _padded(self, fn: Callable, *args) -> Any:
        """fn on its arguments padded from C to ``chunk`` rows (copies of the last row), outputs
        cut to C rows.
        """
        c = tf.shape(args[0])[0]
        pad = lambda t: tf.concat([t, tf.repeat(t[-1:], self.chunk - c, axis=0)], axis=0)
        return tf.nest.map_structure(lambda t: t[:c], fn(*tf.nest.map_structure(pad, args)))

    def _sample_chunk(self, x: tf.Tensor, seed: tf.Tensor, labels: tf.Tensor | None = None
                      ) -> dict[str, tf.Tensor]:
        weights = None
        if self._xla_weights is not None:
            def weights(x, v0, noise, labels):
                extra = () if labels is None else (labels,)
                return self._padded(lambda x, noise, *c: self._xla_weights(x, v0, noise, *c),
                                    x, noise, *extra)
        return _sample_velocities_tensor(self.df, x, self.k, self.m, seed, self.v0(), self.cfg,
                                         weights, labels)

    def _solve_chunk(self, x: tf.Tensor, seed: tf.Tensor, labels: tf.Tensor | None = None
                     ) -> dict[str, tf.Tensor]:
        draw = self._sample_chunk(x, seed, labels)
        v = draw.pop("velocities")
        normal_equations = None
        if self._xla_normal_equations is not None:
            normal_equations = lambda x, v, *c: self._padded(self._xla_normal_equations, x, v, *c)
        a, residual, condition = _solve_tensor(self.df, self.layer, x, v, normal_equations, labels)
        return {"acceleration": a, "residual": residual, "condition": condition, **draw}

    def _signature(self, fn: Callable) -> dict[str, tf.TensorSpec]:
        """Per-chunk output specs (C positions) of ``fn``."""
        common = {
            "ess": tf.TensorSpec([None], tf.float32),
            "support": tf.TensorSpec([None], tf.bool),
            "log_density": tf.TensorSpec([None], tf.float32),
        }
        if fn == self._sample_chunk:
            return {"velocities": tf.TensorSpec([None, self.k, 3], tf.float32), **common}
        return {
            "acceleration": tf.TensorSpec([None, 3], tf.float32),
            "residual": tf.TensorSpec([None], tf.float32),
            "condition": tf.TensorSpec([None], tf.float32),
            **common,
        }

    def _chunked(self, positions: tf.Tensor, seed: tf.Tensor, fn: Callable,
                 labels: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
        """fn over chunks of C = min(chunk, B) positions (zero-padded; chunk i seeded
        fold_in(seed, i)).

        ``labels`` [B, L] (conditional DF) are cut into the same chunks, padded with copies of the
        last row (zeros for B = 0): a valid label, so padded rows compute finite, discarded
        answers.
        """
        b = tf.shape(positions)[0]
        c = tf.maximum(tf.minimum(self.chunk, b), 1)
        # B = 0: one padded chunk (map_fn cannot stack none)
        n = tf.maximum((b + c - 1) // c, 1)
        padded = tf.concat([positions, tf.zeros([n * c - b, 3], positions.dtype)], axis=0)
        chunks = tf.reshape(padded, [n, c, 3])
        seeds = tf.map_fn(
            lambda i: tf.random.experimental.stateless_fold_in(seed, i),
            tf.range(n, dtype=tf.int64),
            fn_output_signature=tf.TensorSpec([2], tf.int64),
        )
        if labels is None:
            out = tf.map_fn(lambda args: fn(args[0], args[1]), (chunks, seeds),
                            fn_output_signature=self._signature(fn), parallel_iterations=1)
        else:
            last = tf.concat([labels, tf.zeros([1, self.label_dim], labels.dtype)], 0)
            last = last[tf.maximum(b - 1, 0)]
            label_chunks = tf.concat([labels, tf.tile(last[None, :], [n * c - b, 1])], 0)
            label_chunks = tf.reshape(label_chunks, [n, c, self.label_dim])
            out = tf.map_fn(lambda args: fn(args[0], args[1], args[2]),
                            (chunks, seeds, label_chunks),
                            fn_output_signature=self._signature(fn), parallel_iterations=1)
        return {
            key: tf.reshape(t, tf.concat([[n * c], tf.shape(t)[2:]], 0))[:b]
            for key, t in out.items()
        }


_SOLVERS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _solver(
    df: Any,
    k: int,
    sampler: SamplerConfig | None,
    velocity_scale: float | None,
    solve_dtype: str = "float64",
    chunk_size: int | None = None,
    jit_compile: bool = False,
) -> _Solver:
    """The cached :class:`_Solver` of ``df`` for these settings (each setting is traced once)."""
    check_df(df)
    sampler = SamplerConfig() if sampler is None else sampler
    if not isinstance(sampler, SamplerConfig):
        raise InputError(f"sampler must be a SamplerConfig, got {type(sampler).__name__}")
    key = (k, sampler.key(), velocity_scale, solve_dtype, chunk_size, bool(jit_compile))
    per_df = _SOLVERS.setdefault(df, {})
    if key not in per_df:
        per_df[key] = _Solver(
            df, k, sampler, velocity_scale, solve_dtype, chunk_size, bool(jit_compile)
        )
    return per_df[key]


def sample_velocities(df: Any, positions: Any, k: int, seed: Any = 0, *, labels: Any = None,
                      sampler: SamplerConfig | None = None, velocity_scale: float | None = None,
                      return_ess: bool = False):
    """K velocities at each position from p(v | x [, c]) ∝ f(x, v [| c]) at fixed x (and label c),
    by sampling-importance-resampling.

    Method (all B positions at once, stateless seeds, core TF ops only):

    0. pilot: log f on a log-spaced speed grid v0 x 10^[-3, 3] (4 per decade) along 8 random
    directions;
       the weights f s³ (volume element s² ds = s³ d ln s) give the rms speed at x;
    1. M/2 draws from an isotropic Student-t (ν = 4) about 0 with scale 1.5 x rms/√3; the
    self-normalised
       weights f/q give the mean and covariance of v at x;
    2. M draws from a multivariate Student-t (ν = 4) with that mean and covariance as scale matrix;
    the
       importance weights w = f/q (tails of q heavier than those of f, so w is bounded for
       Gaussian-or- lighter tails), truncated at sqrt(M) x mean(w) (truncated importance sampling,
       Ionides 2008: tames integrable singularities such as the β = 1/2 DF's f ∝ 1/L, bias -> 0 as
       M -> ∞); K indices drawn with replacement by a stateless categorical draw with probabilities
       w / Σ w (sampling-importance-
       resampling: Rubin 1988; Smith & Gelfand 1992).

    The K draws are p(v | x)-distributed as M -> ∞ (the bias of SIR is O(1/M)); for finite M they
    are correlated through repeats (about K / (2 ESS) of them are duplicates). ESS = (Σ w)² / Σ w²
    of the stage-2 weights is returned with ``return_ess``; tests/test_cbe.py checks the draws
    against the exact Hernquist p(|v| | r) (KS test) and the β = 1/2 Jeans dispersions.
    Assumptions: p(v | x) is unimodal or close to it (a mean velocity not ≫ the dispersion, so
    stage 1 finds it), and its speeds lie within v0 x 10^±3, v0 = the DF's typical speed
    (``velocity_scale``; inferred from a Flow's rescaler or an exact Hernquist DF, else 1). Points
    where log f is NaN or +inf (measure-zero singularities such as the β = 1/2 DF's L = 0 line) get
    weight 0. Where no candidate has finite log f (x outside the DF's support) the K velocities are
    meaningless and ESS = 0.

    Args:
        df: phase-space DF.
        positions: [B, 3] in the DF's length unit.
        k: velocities per position (>= 1).
        seed: int (-> [seed, 0]) or two ints.
        sampler: :class:`SamplerConfig` (M = ``candidates``, default max(4K, 1024)).
        velocity_scale: v0 override (default: from the DF's ``scale_hint``).
        return_ess: also return the effective sample size of each position's draw.
        labels: a conditional DF's labels, [C] or [B, C] (every candidate velocity at position b is
            weighted by f(x_b, v | c_b)); None for an unconditional DF. The random numbers do not
            depend on the labels (the same seed gives the same proposals for any labels).

    Returns:
        velocities [B, K, 3] float32 tensor (and ESS [B] float32 if ``return_ess``).
    """
    k = integer(k, "k", 1)
    positions = _as_vectors(positions, "positions")
    c = check_labels(df, labels, positions.shape[0])
    solver = _solver(df, k, sampler, velocity_scale)
    out = solver.velocities(tf.constant(positions), stateless_seed(seed),
                            *(() if c is None else (tf.constant(c),)))
    return (out["velocities"], out["ess"]) if return_ess else out["velocities"]


def acceleration_graph(
    df: Any,
    n_velocities: int = 256,
    *,
    sampler: SamplerConfig | None = None,
    velocity_scale: float | None = None,
    chunk_size: int | None = None,
) -> Callable:
    """The CBE chain as one traceable function: (positions [None, 3] f32, seed [2] int64[, labels
    [None, C] f32]) -> dict.

    Returns a ``tf.function`` with ``input_signature=[TensorSpec([None, 3], float32, "positions"),
    TensorSpec([2], int64, "seed")]``, plus ``TensorSpec([None, C], float32, "labels")`` (one label
    row per position) for a conditional DF (``label_dim = C``), whose graph holds only core TF ops
    (stateless RNG, GradientTape gradients, batched eigh; chunks of positions run in a
    ``tf.map_fn``), so :mod:`tfgalflow.export` can wrap it in a SavedModel signature. Outputs:
    ``acceleration`` [B, 3], ``residual`` [B], ``condition`` [B] (see :class:`CBELayer`), plus
    ``ess`` [B], ``support`` [B] bool and ``log_density`` [B] (the SIR estimate of log ∫ f d³v at
    x). Same numbers as :func:`accelerations` for the same seed and settings (with
    ``jit_compile=False``; this graph is never XLA-compiled). The graph does not check that
    positions and labels have the same number of rows (its callers do: :func:`accelerations`, the
    export's signature).
    """
    n_velocities = integer(n_velocities, "n_velocities", MIN_VELOCITIES)
    return _solver(df, n_velocities, sampler, velocity_scale, chunk_size=chunk_size).solve


# ---- the public entry point ---------------------------------------------------------------------

@dataclass(frozen=True)
class AccelerationResult:
    """CBE accelerations at B positions (NumPy arrays; units velocity² / length of the DF).

    Attributes:
        acceleration: [B, 3] least-squares a (NaN where the system is singular or the DF has no
            support).
        residual: [B] relative residual of the fit (see :class:`CBELayer`).
        condition: [B] condition number λ_max/λ_min of the 3x3 normal matrix.
        spread: [B, 3] member-to-member standard deviation (ddof = 1) of per-member accelerations
            for an Ensemble (same velocity seed for every member), else None.
        flagged: [B] bool: the position failed a check (``reasons`` says which).
        reasons: [B] str, comma-separated flags ("" = fine): no_support, low_density, low_ess,
            ill_conditioned, high_residual, non_finite.
        ess: [B] effective sample size of the velocity draw. log_density: [B] log ∫ f(x, v) d³v
            estimate.
    """

    acceleration: np.ndarray
    residual: np.ndarray
    condition: np.ndarray
    spread: np.ndarray | None
    flagged: np.ndarray
    reasons: np.ndarray
    ess: np.ndarray
    log_density: np.ndarray

    @classmethod
    def from_outputs(
        cls,
        out: dict,
        spread: np.ndarray | None = None,
        *,
        max_residual: float = MAX_RESIDUAL,
        max_condition: float = MAX_CONDITION,
        min_ess: float = MIN_ESS,
        min_log_density: float | None = None,
    ) -> "AccelerationResult":
        """The result, flags included, from the raw solver outputs (:func:`acceleration_graph`'s or
        an exported ``accelerations`` signature's: acceleration, residual, condition, ess,
        log_density, support). Accelerations where the DF has no support are NaN, never a number.
        """
        out = {k: np.asarray(v) for k, v in out.items()}
        acceleration = out["acceleration"].astype(np.float64)
        support = out["support"].astype(bool)
        acceleration[~support] = np.nan
        reasons = flag_reasons(
            acceleration,
            out["residual"],
            out["condition"],
            support,
            out["ess"],
            out["log_density"],
            max_residual=max_residual,
            max_condition=max_condition,
            min_ess=min_ess,
            min_log_density=min_log_density,
        )
        return cls(
            acceleration=acceleration,
            residual=out["residual"].astype(np.float64),
            condition=out["condition"].astype(np.float64),
            spread=spread,
            flagged=reasons != "",
            reasons=reasons,
            ess=out["ess"].astype(np.float64),
            log_density=out["log_density"].astype(np.float64),
        )

    def radial(self, positions: Any) -> np.ndarray:
        """a_r = a · r̂ [B] at positions [B, 3] (negative for attraction; NaN at r = 0): the
        package's one sign convention for the radial acceleration.
        """
        return radial_component(positions, self.acceleration)

    def save(self, path: str | os.PathLike, positions: Any, units: dict | None = None,
             labels: Any = None, label_names: list[str] | tuple[str, ...] | None = None) -> None:
        """Write positions, accelerations and diagnostics atomically: ``.npz`` (arrays positions,
        radius, acceleration, a_radial, residual, condition, ess, log_density, spread, flagged,
        reasons, units, labels, label_names) or ``.csv`` (one row per position). InputError for any
        other suffix (checked before writing).

        Args:
            path: output file, ``.npz`` or ``.csv``.
            positions: [B, 3] positions the result was computed at (the DF's length unit).
            units: the data's units ({"length": ..., "velocity": ...}) to record, or None.
            labels: a conditional DF's labels the result was computed at, [C] or [B, C], or None.
            label_names: C column names for the labels (default label_1 ... label_C).
        """
        check_output_suffix(path)
        positions = np.asarray(positions, np.float64)
        if labels is not None:
            labels = np.asarray(labels, np.float64)
            labels = np.tile(labels, (len(positions), 1)) if labels.ndim == 1 else labels
            if labels.ndim != 2 or len(labels) != len(positions):
                raise InputError(f"labels have shape {list(labels.shape)}; expected [C] or "
                                 f"[{len(positions)}, C] (one row per position)")
            names = list(label_names or [f"label_{j + 1}" for j in range(labels.shape[1])])
            if len(names) != labels.shape[1]:
                raise InputError(f"label_names {names} do not match the {labels.shape[1]} label "
                                 f"column(s)")
        arrays = {"positions": positions, "radius": np.linalg.norm(positions, axis=1),
                  "acceleration": self.acceleration, "a_radial": self.radial(positions),
                  "residual": self.residual, "condition": self.condition, "ess": self.ess,
                  "log_density": self.log_density,
                  **({"spread": self.spread} if self.spread is not None else {}),
                  "flagged": self.flagged, "reasons": np.asarray(self.reasons, dtype=str)}
        if units:
            arrays["units"] = np.array(f"positions: {units.get('length')}; accelerations: "
                                       f"({units.get('velocity')})^2 / {units.get('length')}")
        if labels is not None:
            arrays["labels"] = labels
            arrays["label_names"] = np.asarray(names, dtype=str)
        if Path(path).suffix.lower() == ".npz":
            with atomic_file(path, suffix=".npz") as tmp:
                np.savez(tmp, **arrays)
            return
        header = ["x", "y", "z", "r", "ax", "ay", "az", "a_radial", "residual", "condition", "ess",
                  "log_density"]
        blocks = [
            positions,
            arrays["radius"][:, None],
            self.acceleration,
            arrays["a_radial"][:, None],
        ]
        blocks += [arrays[name][:, None] for name in header[8:]]
        if self.spread is not None:
            header += ["spread_x", "spread_y", "spread_z"]
            blocks.append(self.spread)
        if labels is not None:          # a label named like another column gets a "label_" prefix
            header += [f"label_{n}" if n in header + ["flagged", "reasons"] else n for n in names]
            blocks.append(labels)
        table = np.concatenate(blocks, axis=1)
        with atomic_file(path) as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header + ["flagged", "reasons"])
            for row, reason in zip(table, arrays["reasons"]):
                writer.writerow([f"{value:.9g}" for value in row] + [int(reason != ""), reason])


#: File types :meth:`AccelerationResult.save` writes.
RESULT_SUFFIXES = (".npz", ".csv")


def check_output_suffix(path: str | os.PathLike) -> None:
    """InputError unless ``path`` ends in one of :data:`RESULT_SUFFIXES` (check before
    computing).
    """
    if Path(path).suffix.lower() not in RESULT_SUFFIXES:
        raise InputError(f"{path}: unknown output type {Path(path).suffix!r}; use .npz or .csv")


def radial_component(positions: Any, acceleration: Any) -> np.ndarray:
    """Radial component  a_r = a · x/|x|  [B] of accelerations [B, 3] at positions [B, 3].

    The one sign convention of the package (CLI ``a_radial``, study tables, figures): negative for
    an attractive force, e.g. a_r = -G M / (r + a)^2 for a Hernquist sphere (Hernquist 1990). NaN
    where x = 0 (no radial direction) and where the acceleration is NaN (a flagged position).
    """
    positions = finite_matrix(positions, "positions", width=3, expected="[B, 3]")
    acceleration = np.asarray(acceleration, dtype=np.float64)
    if acceleration.shape != positions.shape:
        raise InputError(f"acceleration has shape {list(acceleration.shape)}; expected "
                         f"{list(positions.shape)} like positions")
    r = np.linalg.norm(positions, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        a_dot_x = np.sum(acceleration * positions, axis=1)
        return np.where(r > 0, a_dot_x / np.where(r > 0, r, 1.0), np.nan)


#: The flags a position can get, in the order ``reasons`` lists them.
FLAGS = ("no_support", "low_density", "low_ess", "ill_conditioned", "high_residual", "non_finite")


def flagged_outputs(out: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """The raw solver outputs (:func:`acceleration_graph`) with the flags of :func:`accelerations`,
    as TF ops for an exported signature: ``acceleration`` NaN where the DF has no support,
    ``flagged`` [B] bool and ``reasons`` [B] string ("no_support,low_ess", "" = fine), with the
    default thresholds (MAX_RESIDUAL, MAX_CONDITION, MIN_ESS; low_density is off by default). A
    served answer then says why a number is not to be trusted, as the Python API does.
    """
    support = out["support"]
    acceleration = tf.where(support[:, None], out["acceleration"],
                            tf.constant(np.nan, out["acceleration"].dtype))
    bad = tf.stack([~support,
                    tf.zeros_like(support),                               # low_density: off
                    ~(out["ess"] >= MIN_ESS),
                    ~(out["condition"] <= MAX_CONDITION),
                    ~(out["residual"] <= MAX_RESIDUAL),
                    ~tf.reduce_all(tf.math.is_finite(acceleration), axis=1)], axis=1)   # [B, 6]
    names = tf.broadcast_to(tf.constant(FLAGS), tf.shape(bad))
    reasons = tf.strings.reduce_join(tf.ragged.boolean_mask(names, bad), axis=1, separator=",")
    return {
        **out,
        "acceleration": acceleration,
        "flagged": tf.reduce_any(bad, axis=1),
        "reasons": reasons,
    }


def flag_reasons(acceleration: np.ndarray, residual: np.ndarray, condition: np.ndarray,
                 support: np.ndarray | None = None, ess: np.ndarray | None = None,
                 log_density: np.ndarray | None = None, *, max_residual: float = MAX_RESIDUAL,
                 max_condition: float = MAX_CONDITION, min_ess: float = MIN_ESS,
                 min_log_density: float | None = None) -> np.ndarray:
    """Comma-separated flags per position ("" = passed every check); the rules of
    :func:`accelerations`.
    """
    checks = [("no_support", None if support is None else ~np.asarray(support, bool)),
              ("low_density", None if (log_density is None or min_log_density is None)
               else ~(np.asarray(log_density) >= min_log_density)),
              ("low_ess", None if ess is None else ~(np.asarray(ess) >= min_ess)),
              ("ill_conditioned", ~(np.asarray(condition) <= max_condition)),
              ("high_residual", ~(np.asarray(residual) <= max_residual)),
              ("non_finite", ~np.all(np.isfinite(acceleration), axis=1))]
    reasons = np.full(len(residual), "", dtype=object)
    for name, bad in checks:
        if bad is not None:
            reasons = np.where(bad, np.where(reasons == "", name, reasons + "," + name), reasons)
    return reasons.astype(str)


def accelerations(df: Any, positions: Any, n_velocities: int = 256, seed: Any = 0, *,
                  labels: Any = None, max_residual: float = MAX_RESIDUAL,
                  max_condition: float = MAX_CONDITION,
                  min_ess: float = MIN_ESS, min_log_density: float | None = None,
                  sampler: SamplerConfig | None = None, velocity_scale: float | None = None,
                  chunk_size: int | None = None, jit_compile: bool | None = None
                  ) -> AccelerationResult:
    """Gravitational acceleration at each position from the CBE of the DF ``df`` (given labels c).

    At each x_b: K = ``n_velocities`` velocities from p(v | x_b) (:func:`sample_velocities`),
    gradients of log f (:func:`df_gradients`) and the least-squares solution of
    v · ∇_x log f + a · ∇_v log f = 0 (:class:`CBELayer`). Positions run in chunks (default
    C = min(2^16 / K, 2^18 / M) positions, M the SIR candidates) inside one traced graph, so memory
    is bounded for any B.

    For an :class:`~tfgalflow.model.Ensemble` the acceleration is that of the ensemble-mean density
    and ``spread`` is the member-to-member standard deviation of the members' own accelerations.

    For a conditional DF f(x, v | c) each position b is solved at its own label c_b: the velocities
    are drawn from p(v | x_b, c_b) and the gradients are ∂/∂(x, v) of log f(x, v | c_b) at fixed
    c_b, so a(x_b | c_b) is the acceleration of the system with label c_b (e.g. a halo of scale
    radius c_b).

    A position is **flagged** (never silently trusted) when
      * no_support: no finite log f among ~2000 trial velocities at x (x outside the DF's support);
      * low_density: log ∫ f d³v < ``min_log_density`` (off by default; set it to mark x beyond the
      data,
        where a flow extrapolates);
      * low_ess: the SIR effective sample size < ``min_ess`` (32: fewer effective velocities than
      that
        make the residual itself unreliable; measured: >= 700 of M = 1024 for the exact isotropic
        DF and for small flows, >= 64 at all of 10^4 positions for the exact β = 1/2 DF with its
        1/L singularity);
      * ill_conditioned: condition of the 3x3 normal matrix > ``max_condition`` (1e6, i.e. cond(G)
      > 1e3:
        errors of the gradients are then amplified > 1000-fold along the weak direction; measured:
        median 1.5 for the exact isotropic DF and small flows, 26 for the exact β = 1/2 DF, max 2e5
        over 10^4 positions);
      * high_residual: relative residual > ``max_residual`` (0.8: the fit explains < 36 % of Σ b²,
      i.e.
        the DF is far from a steady state there; measured: exact Hernquist DFs ~1e-7; small flows
        (3 layers of 32x32) trained on 3e4 stars, 0.5a-3a: median 0.34-0.49 over five seeds, single
        positions up to 0.97, which are flagged);
      * non_finite: the acceleration has NaN/inf (singular system); such rows are NaN, never
      garbage.

    The flags catch numerical failure, not a wrong model: a DF that is smooth and nearly a steady
    state of the *wrong* potential (e.g. an under-trained flow close to a Gaussian, a steady state
    of a harmonic potential) gives a small residual and a wrong a. The ensemble ``spread`` is the
    model-uncertainty measure; compare the learned and the exact DF on mocks (tfgalflow.study).

    Args:
        df: phase-space DF (Flow, Ensemble, exact DF): ``.dim == 6``, ``.log_prob(w, labels)``.
        positions: [B, 3] in the DF's length unit.
        n_velocities: K >= 8 velocities per position.
        max_residual: flag relative residuals above this (high_residual).
        max_condition: flag normal-matrix condition numbers above this (ill_conditioned).
        min_ess: flag velocity draws with a smaller effective sample size (low_ess).
        min_log_density: flag positions where log ∫ f d³v is below this (low_density; None: off).
        sampler: :class:`SamplerConfig` of the velocity draw (default settings if None).
        velocity_scale: the DF's typical speed v0 (default: from its ``scale_hint``).
        chunk_size: positions per traced call (default from K and the DF's evaluations_per_row).
        seed: int or two ints; the same seed gives the same result.
        labels: for a conditional DF (``label_dim = C``): [C] (one label for every position) or
            [B, C] (one per position), in the DF's label units; None for an unconditional DF. [C]
            gives the same numbers as the same label tiled to [B, C].
        jit_compile: XLA-compile the DF evaluations of the velocity draw and the gradients, with
            the row-wise products of the least squares (Flow, Ensemble and the exact Hernquist DF;
            other DFs stay on the plain graph). The random numbers and the 3x3 solves stay in the
            plain graph, so results equal the plain graph's to float32 round-off, except that XLA's
            rounding of log f can move a resampled velocity to a neighbouring candidate (a change
            of sampling noise). Less time per position, but seconds of compilation once per DF and
            setting (and per ensemble member), so it pays off for large or repeated calls;
            ``benchmarks/bench_cbe.py`` measures both (figures: benchmarks/README.md). None
            (default): XLA for calls of at least ``XLA_MIN_EVALUATIONS`` model evaluations of a DF
            that uses XLA itself (Flow, Ensemble), else the plain graph (:func:`xla_by_default`);
            False forces the plain graph. Never used by :func:`acceleration_graph`: exported
            graphs stay plain (TF Serving runs XLA only experimentally).

    Returns:
        :class:`AccelerationResult` (NumPy arrays).

    Raises:
        InputError for positions not [B, 3] or with NaN/inf, a DF that is not 6-D, labels missing
        for a conditional DF, given to an unconditional one, not [C] / [B, C] or with NaN/inf,
        n_velocities < 8 or bad settings.

    Example::

        h = Hernquist()
        res = accelerations(h.exact_density("iso"), [[1.0, 0.0, 0.0]])
        res.acceleration       # ≈ h.acceleration([[1, 0, 0]]) = [[-0.25, 0, 0]]
    """
    check_df(df)
    positions = _as_vectors(positions, "positions")
    c = check_labels(df, labels, positions.shape[0])
    n_velocities = integer(n_velocities, "n_velocities", MIN_VELOCITIES)
    seed = stateless_seed(seed)
    inputs = (tf.constant(positions), seed) + (() if c is None else (tf.constant(c),))
    # one decision for the call (the ensemble's size), the same for its members
    jit = _jit(df, jit_compile, len(positions), n_velocities)

    def run(model: Density) -> dict[str, np.ndarray]:
        solver = _solver(model, n_velocities, sampler, velocity_scale, chunk_size=chunk_size,
                         jit_compile=jit)
        return {key: t.numpy() for key, t in solver.solve(*inputs).items()}

    out = run(df)
    spread = None
    members = df.members
    if members:
        per_member = np.stack([run(m)["acceleration"] for m in members])
        spread = (
            per_member.std(axis=0, ddof=1) if len(members) > 1 else np.zeros_like(per_member[0])
        )
    return AccelerationResult.from_outputs(out, spread=spread, max_residual=max_residual,
                                           max_condition=max_condition, min_ess=min_ess,
                                           min_log_density=min_log_density)
