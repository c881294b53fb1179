"""Spherical symmetrisation of a phase-space DF: the average of f over joint rotations of (x, v).

The DF of a spherical system is invariant under any rotation R applied to position and velocity
together, f(R x, R v) = f(x, v) (it depends on (x, v) only through E, |L| and, for the steady
state, nothing else: Jeans' theorem). A flow trained on a sample of such a system is invariant
only up to its learning error, and that error is not: it is a field of bumps fixed to the flow's
own axes. Averaging the learned density over M rotations,

    f̄(x, v) = (1/M) Σ_m f(R_m x, R_m v),

keeps every spherical part of f (so f̄ = f for a spherical f, to round-off) and averages the rest,
the way an ensemble averages its members' errors, but for the price of M evaluations and no
training. f̄ is still a normalised density (each w -> (R x, R v) preserves phase-space volume,
|det| = 1) and samples exactly: draw w ~ f, pick m uniformly, return (R_mᵀ x, R_mᵀ v).

Use it only for a system known to be spherical (a Hernquist or NFW halo, a globular cluster): it
erases any real flattening, figure rotation or streaming about an axis. The rotations are
Haar-uniform on SO(3) (scipy's ``Rotation.random``, seeded), one fixed set per object, so f̄ is a
deterministic function.

What it buys is measured by ``scripts/ensemble_convergence.py --rotations`` on the Hernquist
studies (figures in the README's study table).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import tensorflow as tf
from scipy.spatial.transform import Rotation

from .density import Density, DerivedDensity
from .errors import InputError
from .validation import integer

#: Default number of rotations: most of the gain of M = 64 at half the cost (README, study table).
DEFAULT_ROTATIONS = 32


def random_rotations(n: int, seed: int = 0) -> np.ndarray:
    """n Haar-uniform rotation matrices R [n, 3, 3] float64 (R Rᵀ = 1, det R = +1), reproducible by
    seed.
    """
    return Rotation.random(n, random_state=np.random.default_rng(seed)).as_matrix()


class SphericalAverage(DerivedDensity):
    """f̄(x, v) = (1/M) Σ_m f(R_m x, R_m v): a 6-D phase-space DF averaged over M joint rotations.

    Usable wherever a DF is (``log_prob``, ``prob``, ``grad_log_prob``, ``sample`` when the base DF
    samples, :func:`tfgalflow.cbe.accelerations`, XLA included). Each row costs M evaluations of
    the base DF; ``evaluations_per_row`` tells :mod:`tfgalflow.cbe` to shrink its chunks by as
    much.

    Args:
        df: a 6-D phase-space :class:`~tfgalflow.density.Density`, w = (x [kpc], v [km/s]) or any
            units (rotations mix the three components of x among themselves, and of v, so the units
            need only agree per triple): a Flow, an Ensemble, an exact DF, a loaded SavedModel. A
            conditional DF keeps its labels: f̄(x, v | c) averages over rotations of (x, v) at the
            same c.
        n_rotations: M >= 1.
        seed: seed of the rotations.
    For an Ensemble, ``members`` are the symmetrised members (same rotations), so the CBE spread is
    the spread of the symmetrised members.

    Example::

        f_bar = SphericalAverage(tfgalflow.load("runs/iso"), n_rotations=32)
        tfgalflow.accelerations(f_bar, positions)
    """

    what = "spherical average"

    def __init__(self, df: Any, n_rotations: int = DEFAULT_ROTATIONS, seed: int = 0):
        if not isinstance(df, Density) or df.dim != 6:
            raise InputError(
                f"SphericalAverage needs a 6-D phase-space density (a tfgalflow Density with "
                f"dim = 6); got {type(df).__name__} with dim = {getattr(df, 'dim', None)}"
            )
        super().__init__(df, name="spherical_average")
        self.n_rotations = integer(n_rotations, "n_rotations")
        self.seed = integer(seed, "seed", low=0)
        # [M, 3, 3]
        self.rotations = tf.constant(random_rotations(self.n_rotations, self.seed), tf.float32)
        # M base evaluations per row; rotations act on (x, v), never on labels
        self.base_evaluations = self.n_rotations

    dim = 6

    def with_base(self, base: Density) -> "SphericalAverage":
        """Another DF averaged over the same rotations (e.g. an ensemble member)."""
        return SphericalAverage(base, self.n_rotations, self.seed)

    def scale_hint(self) -> tf.Tensor | None:
        """The base DF's: rotations keep the magnitudes of x and v."""
        return self.base.scale_hint()

    def _rotated(self, w: tf.Tensor) -> tf.Tensor:
        """[M, N, 6]: (R_m x_n, R_m v_n) for every rotation m and row n."""
        x = tf.einsum("mij,nj->mni", self.rotations, w[:, :3])
        v = tf.einsum("mij,nj->mni", self.rotations, w[:, 3:])
        return tf.concat([x, v], axis=-1)

    def log_prob_tensor(self, w: tf.Tensor, labels: tf.Tensor | None = None) -> tf.Tensor:
        """log f̄(w | c) = logsumexp_m log f(R_m x, R_m v | c) - log M: [N]."""
        m = self.n_rotations
        c = None if labels is None else tf.tile(labels, [m, 1])                      # [M N, C]
        log_f = self.base.log_prob_tensor(tf.reshape(self._rotated(w), [-1, 6]), c)
        return tf.reduce_logsumexp(tf.reshape(log_f, [m, -1]), axis=0) - math.log(m)  # [N]

    def sample_tensor(
        self, n: tf.Tensor | None, c: tf.Tensor | None, seed: tf.Tensor
    ) -> tf.Tensor:
        """w ~ f, then (R_mᵀ x, R_mᵀ v) with m uniform: exact draws from f̄ [n, 6]."""
        if not self.base.can_sample:
            raise InputError(
                f"the base DF ({type(self.base).__name__}) cannot sample, so neither can its "
                f"spherical average"
            )
        w = self.base.sample_tensor(n, c, tf.random.experimental.stateless_fold_in(seed, 0))
        choice = tf.random.stateless_uniform(
            [tf.shape(w)[0]],
            tf.random.experimental.stateless_fold_in(seed, 1),
            minval=0,
            maxval=self.n_rotations,
            dtype=tf.int32,
        )
        r = tf.gather(self.rotations, choice)                                     # [n, 3, 3]
        x = tf.einsum("nji,nj->ni", r, w[:, :3])                                  # R_mᵀ x
        v = tf.einsum("nji,nj->ni", r, w[:, 3:])
        return tf.concat([x, v], axis=1)
