"""A spherical system's DF learned in its own coordinates: f(x, v) from a density of (r, v_r, v_t).

A steady spherical system has a DF that depends on (x, v) only through r = |x|, the radial velocity
v_r = x·v/r and the tangential speed v_t = |x × v|/r (Jeans' theorem: f = f(E, L) with
E = v²/2 + Φ(r), L = r v_t), and, since E and L are even in v_r, f is even in v_r. A 6-D flow
learns these symmetries only up to its training error, which the CBE turns into acceleration
errors (:class:`tfgalflow.symmetry.SphericalAverage` averages part of it away afterwards). This
module builds them in: a 3-D density p(r, v_r, v_t) — a flow trained on the stars' (r, v_r, v_t),
whose logs it takes itself (``log_columns = (0, 2)``) — defines the 6-D DF exactly symmetric,

    f(x, v) = p(r, v_r, v_t) / (8 π² r² v_t),                                        (1)

the Jacobian of (x, v) -> (r, v_r, v_t) integrated over the direction of x (4π r²) and the
direction of the tangential velocity in the plane normal to x (2π v_t). With ``even=True``
(the default, for steady systems) p is replaced by its even part in v_r,

    p̄(r, v_r, v_t) = [p(r, v_r, v_t) + p(r, -v_r, v_t)] / 2,                           (2)

which halves the part of the learning error that is odd in v_r (it would otherwise fit a radial
streaming that a steady system does not have). Both (1) and (2) keep f normalised: ∫ f d³x d³v =
∫ p dr dv_r dv_t = 1.

A 3-D density is far easier to learn than a 6-D one from the same stars, which is what makes this
the most accurate route from a spherical catalogue to accelerations (benchmarks/
bench_time_to_accuracy.py, README). Use it only for a system known to be spherical and in
equilibrium: it cannot represent flattening, figure rotation or net rotation about an axis (a
rotating system's f is not a function of |L| alone).

Train it with ``TrainConfig(coordinates="spherical")`` (CLI ``tfgalflow train ... --coordinates
spherical``): the training reduces the catalogue to (r, v_r, v_t) with :func:`reduced_coordinates`
and :func:`tfgalflow.training.load_run` returns the :class:`SphericalDF`. It exports to a
SavedModel like any 6-D DF (signatures in (x, v); metadata ``spherical_df``).

Reference: Binney & Tremaine 2008, Galactic Dynamics, 2nd ed., §4.2 (Jeans' theorem) and §4.3.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import tensorflow as tf

from .density import Density, DerivedDensity
from .errors import InputError
from . import validation
from .validation import finite_matrix

#: The reduced coordinates' names and the columns whose logarithm the flow learns (r > 0, v_t > 0).
REDUCED_COLUMNS = ("r", "v_r", "v_t")
REDUCED_LOG_COLUMNS = (0, 2)

_LOG_8_PI2 = math.log(8.0 * math.pi ** 2)


def reduced_coordinates(w: Any) -> np.ndarray:
    """(r, v_r, v_t) [N, 3] float64 of phase-space points w = (x, v) [N, 6].

    r = |x|, v_r = x·v / r, v_t = |x × v| / r (same units as v). InputError for a point at the
    centre (r = 0) or with purely radial motion (v_t = 0), where the reduction is singular (a
    continuous DF puts zero mass there).
    """
    w = finite_matrix(w, "w", 6)
    x, v = w[:, :3], w[:, 3:]
    r = np.linalg.norm(x, axis=1)
    if np.any(r <= 0):
        raise InputError(f"w: {int(np.sum(r <= 0))} point(s) at r = 0, where (r, v_r, v_t) are "
                         "undefined; remove them (a continuous DF puts no mass there)")
    v_r = np.einsum("ij,ij->i", x, v) / r
    v_t = np.linalg.norm(np.cross(x, v), axis=1) / r
    if np.any(v_t <= 0):
        raise InputError(f"w: {int(np.sum(v_t <= 0))} point(s) with v_t = 0 (purely radial "
                         "motion), where log v_t is undefined; remove them")
    return np.stack([r, v_r, v_t], axis=1)


def reduced_tensor(w: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(r, v_r, v_t), each [N], of w [N, 6] as TF ops (differentiable wherever r, v_t > 0)."""
    x, v = w[:, :3], w[:, 3:]
    r = tf.norm(x, axis=1)
    v_r = tf.reduce_sum(x * v, axis=1) / r
    v_t = tf.norm(tf.linalg.cross(x, v), axis=1) / r
    return r, v_r, v_t


class SphericalDF(DerivedDensity):
    """f(x, v) = p̄(r, v_r, v_t) / (8π² r² v_t): a 6-D DF exactly invariant under rotations (and,
    with ``even``, under v_r -> -v_r), built from a 3-D density of the reduced coordinates.

    Args:
        base: a 3-D :class:`~tfgalflow.density.Density` of (r, v_r, v_t) — a Flow or Ensemble
            trained on :func:`reduced_coordinates` of a catalogue (``TrainConfig(coordinates=
            "spherical")`` does this), or any density of those three variables (a conditional one
            keeps its labels: f(x, v | c)). Units: r in the length unit of x, v_r and v_t in that
            of v; f is per unit (length³ velocity³).
        even: use the even part of p in v_r, eq. (2) (default True: a steady state).

    Example::

        f = tfgalflow.load("runs/iso_spherical")          # a SphericalDF
        tfgalflow.accelerations(f, positions)
    """

    what = "spherical DF"
    dim = 6

    def __init__(self, base: Any, even: bool = True):
        if not isinstance(base, Density) or base.dim != 3:
            raise InputError(
                f"SphericalDF needs a 3-D density of (r, v_r, v_t) (a tfgalflow Density with "
                f"dim = 3); got {type(base).__name__} with dim = {getattr(base, 'dim', None)}"
            )
        super().__init__(base, name="spherical_df")
        self.even = validation.boolean(even, "even")
        # p at ±v_r with even
        self.base_evaluations = 2 if self.even else 1

    def with_base(self, base: Density) -> "SphericalDF":
        """The spherical DF of another (r, v_r, v_t) density (e.g. an ensemble member)."""
        return SphericalDF(base, self.even)

    def scale_hint(self) -> tf.Tensor | None:
        """[6]: the base's scale of v_r for the three velocity columns (what the CBE reads) and
        1 for the positions (the base's r scale is that of log r).
        """
        scale = self.base.scale_hint()
        if scale is None:
            return None
        v = tf.cast(scale[1], tf.float32)
        return tf.concat([tf.ones([3], tf.float32), tf.fill([3], v)], axis=0)

    def log_prob_tensor(self, w: tf.Tensor, labels: tf.Tensor | None = None) -> tf.Tensor:
        """log f(x, v | c) = log p̄(r, v_r, v_t | c) - log(8π² r² v_t), eqs. (1)-(2): [N]."""
        r, v_r, v_t = reduced_tensor(w)
        log_p = self.base.log_prob_tensor(tf.stack([r, v_r, v_t], axis=1), labels)
        if self.even:
            log_p_mirror = self.base.log_prob_tensor(tf.stack([r, -v_r, v_t], axis=1), labels)
            log_p = tf.reduce_logsumexp(tf.stack([log_p, log_p_mirror]), axis=0) - math.log(2.0)
        return log_p - (_LOG_8_PI2 + 2.0 * tf.math.log(r) + tf.math.log(v_t))

    def sample_tensor(
        self, n: tf.Tensor | None, c: tf.Tensor | None, seed: tf.Tensor
    ) -> tf.Tensor:
        """Exact draws [n, 6] from f: (r, v_r, v_t) ~ p̄, a uniform direction n̂ for x = r n̂ and a
        uniform direction t̂ ⊥ n̂ for v = v_r n̂ + v_t t̂.
        """
        if not self.base.can_sample:
            raise InputError(f"the base density ({type(self.base).__name__}) cannot sample, so "
                             f"neither can the spherical DF")
        fold = tf.random.experimental.stateless_fold_in
        u = self.base.sample_tensor(n, c, fold(seed, 0))
        return self._placed(u, self._directions(tf.shape(u)[0], seed))

    @staticmethod
    def _directions(rows: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        """[rows, 7]: a uniform (the v_r mirror) and two N(0, I₃) draws (the directions)."""
        fold = tf.random.experimental.stateless_fold_in
        return tf.concat([tf.random.stateless_uniform(tf.stack([rows, 1]), fold(seed, 1)),
                          tf.random.stateless_normal(tf.stack([rows, 3]), fold(seed, 2)),
                          tf.random.stateless_normal(tf.stack([rows, 3]), fold(seed, 3))], axis=1)

    def noise_tensor(self, n: tf.Tensor, seed: tf.Tensor) -> tf.Tensor | None:
        """[n, K + 7]: the base's noise (K columns) and the draws of :meth:`_directions`, or None
        if the base does not split its sampler.
        """
        base = self.base.noise_tensor(n, tf.random.experimental.stateless_fold_in(seed, 0))
        if base is None:
            return None
        return tf.concat([base, self._directions(n, seed)], axis=1)

    def transform_noise_tensor(self, noise: tf.Tensor, labels: tf.Tensor | None) -> tf.Tensor:
        """Draws [n, 6] from :meth:`noise_tensor`'s output (the base's transform, then the
        directions).
        """
        u = self.base.transform_noise_tensor(noise[:, :-7], labels)
        return self._placed(u, noise[:, -7:])

    def _placed(self, u: tf.Tensor, draws: tf.Tensor) -> tf.Tensor:
        """(x, v) [n, 6] from (r, v_r, v_t) draws u [n, 3] and :meth:`_directions` draws."""
        r, v_r, v_t = u[:, 0], u[:, 1], u[:, 2]
        if self.even:      # p̄ = mixture of p and its mirror: flip v_r with probability 1/2
            v_r = tf.where(draws[:, 0] < 0.5, -v_r, v_r)
        g = draws[:, 1:4]
        n_hat = g / tf.norm(g, axis=1, keepdims=True)                          # uniform on S²
        h = draws[:, 4:7]
        h = h - tf.reduce_sum(h * n_hat, axis=1, keepdims=True) * n_hat        # ⊥ n̂, isotropic
        t_hat = h / tf.norm(h, axis=1, keepdims=True)
        x = r[:, None] * n_hat
        v = v_r[:, None] * n_hat + v_t[:, None] * t_hat
        return tf.concat([x, v], axis=1)
