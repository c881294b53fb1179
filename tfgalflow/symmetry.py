"""Spherical symmetrisation of a phase-space DF: the average of f over joint rotations of (x, v).

The DF of a spherical system is invariant under any rotation R applied to position and velocity together,
f(R x, R v) = f(x, v) (it depends on (x, v) only through E, |L| and, for the steady state, nothing else:
Jeans' theorem). A flow trained on a sample of such a system is invariant only up to its learning error,
and that error is not: it is a field of bumps fixed to the flow's own axes. Averaging the learned density
over M rotations,

    f̄(x, v) = (1/M) Σ_m f(R_m x, R_m v),

keeps every spherical part of f (so f̄ = f for a spherical f, to round-off) and averages the rest, the way an
ensemble averages its members' errors, but for the price of M evaluations and no training. f̄ is still a
normalised density (each w -> (R x, R v) preserves phase-space volume, |det| = 1) and samples exactly: draw
w ~ f, pick m uniformly, return (R_mᵀ x, R_mᵀ v).

Use it only for a system known to be spherical (a Hernquist or NFW halo, a globular cluster): it erases any
real flattening, figure rotation or streaming about an axis. The rotations are Haar-uniform on SO(3)
(scipy's ``Rotation.random``, seeded), one fixed set per object, so f̄ is a deterministic function.

Measured on the isotropic Hernquist study (``studies/hernquist_iso_ensemble``: 10^6 stars, 8-layer flows,
median CBE error over 0.2a-5a): one flow 8.1 % -> 1.7 % with M = 32; the 8-member ensemble 3.6 % -> 1.1 %
(M = 32) and 0.83 % (M = 64). ``scripts/ensemble_convergence.py --rotations`` re-measures.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import tensorflow as tf
from scipy.spatial.transform import Rotation

from .cbe import _inline_log_prob
from .errors import InputError
from .model import _GraphMethods

#: Default number of rotations: most of the gain (8-member iso study: 3.6 % -> 1.1 %; M = 64 gives 0.83 %
#: at twice the cost, see the module docstring).
DEFAULT_ROTATIONS = 32


def random_rotations(n: int, seed: int = 0) -> np.ndarray:
    """n Haar-uniform rotation matrices R [n, 3, 3] float64 (R Rᵀ = 1, det R = +1), reproducible by seed."""
    return Rotation.random(n, random_state=np.random.default_rng(seed)).as_matrix()


def _base_log_prob(df: Any):
    """log f(w [N, 6]) -> [N] as TF ops traced into the caller's graph (see cbe._inline_log_prob), or the
    DF's own traced ``log_prob`` (a loaded SavedModel)."""
    return _inline_log_prob(df) or (lambda w: df.log_prob(w))


class SphericalAverage(_GraphMethods, tf.Module):
    """f̄(x, v) = (1/M) Σ_m f(R_m x, R_m v): a 6-D phase-space DF averaged over M joint rotations.

    Usable wherever a DF is (``log_prob``, ``prob``, ``grad_log_prob``, ``sample`` when the base DF
    samples, :func:`tfgalflow.cbe.accelerations`, XLA included). Each row costs M evaluations of the base
    DF; ``evaluations_per_row`` tells :mod:`tfgalflow.cbe` to shrink its chunks by as much.

    Args:
        df: unconditional 6-D phase-space DF, w = (x [kpc], v [km/s]) or any units (rotations mix the
            three components of x among themselves, and of v, so the units need only agree per triple):
            a Flow, an Ensemble, an exact DF or anything with ``dim == 6`` and a traceable ``log_prob``.
        n_rotations: M >= 1.
        seed: seed of the rotations.
    For an Ensemble, ``members`` are the symmetrised members (same rotations), so the CBE spread is
    the spread of the symmetrised members.

    Example::

        f_bar = SphericalAverage(tfgalflow.load("runs/iso"), n_rotations=32)
        tfgalflow.accelerations(f_bar, positions)
    """

    _what = "spherical average"

    def __init__(self, df: Any, n_rotations: int = DEFAULT_ROTATIONS, seed: int = 0):
        super().__init__(name="spherical_average")
        if int(getattr(df, "dim", 0) or 0) != 6 or not callable(getattr(df, "log_prob", None)):
            raise InputError(f"SphericalAverage needs a 6-D phase-space DF with .log_prob(w [N, 6]); got "
                             f"{type(df).__name__} with dim = {getattr(df, 'dim', None)}")
        if int(getattr(df, "label_dim", 0) or 0) != 0:
            raise InputError(f"SphericalAverage needs an unconditional DF; this one has label_dim = {df.label_dim}")
        if isinstance(n_rotations, (bool, np.bool_)) or not isinstance(n_rotations, (int, np.integer)) \
                or n_rotations < 1:
            raise InputError(f"n_rotations = {n_rotations!r}: expected an integer >= 1")
        if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise InputError(f"seed = {seed!r}: expected an integer >= 0")
        self.base, self.n_rotations, self.seed = df, int(n_rotations), int(seed)
        self.rotations = tf.constant(random_rotations(self.n_rotations, self.seed), tf.float32)   # [M, 3, 3]
        self._base_log_prob = _base_log_prob(df)
        #: whether log f̄ is plain TF ops that XLA may compile (not so around a loaded SavedModel's function)
        self.inlinable = _inline_log_prob(df) is not None
        self._members = None
        self._make_graph_functions()

    dim = 6
    label_dim = 0

    @property
    def evaluations_per_row(self) -> int:
        """Base-DF evaluations per row of ``log_prob``: M times the base's own (K for a K-member ensemble)."""
        return self.n_rotations * int(getattr(self.base, "evaluations_per_row", 1))

    @property
    def members(self) -> list["SphericalAverage"] | None:
        """The base ensemble's members, each averaged over the same rotations (None for a single DF)."""
        members = getattr(self.base, "members", None)
        if not members:
            return None
        if self._members is None:
            self._members = [SphericalAverage(m, self.n_rotations, self.seed) for m in members]
        return self._members

    @property
    def x_scale(self) -> Any:
        """The base flow's rescaling scales [6], what cbe reads for the typical speed (None for an ensemble:
        cbe reads its members')."""
        return getattr(self.base, "x_scale", None)

    def _rotated(self, w: tf.Tensor) -> tf.Tensor:
        """[M, N, 6]: (R_m x_n, R_m v_n) for every rotation m and row n."""
        x = tf.einsum("mij,nj->mni", self.rotations, w[:, :3])
        v = tf.einsum("mij,nj->mni", self.rotations, w[:, 3:])
        return tf.concat([x, v], axis=-1)

    def _log_prob_tensor(self, w: tf.Tensor, c: tf.Tensor | None) -> tf.Tensor:
        """log f̄(w) = logsumexp_m log f(R_m x, R_m v) - log M: [N]."""
        m = self.n_rotations
        log_f = tf.reshape(self._base_log_prob(tf.reshape(self._rotated(w), [-1, 6])), [m, -1])   # [M, N]
        return tf.reduce_logsumexp(log_f, axis=0) - math.log(m)

    def _sample_tensor(self, n: tf.Tensor | None, c: tf.Tensor | None, seed: tf.Tensor) -> tf.Tensor:
        """w ~ f, then (R_mᵀ x, R_mᵀ v) with m uniform: exact draws from f̄ [n, 6]."""
        sample = getattr(self.base, "_sample_tensor", None)
        if not callable(sample):
            raise InputError(f"the base DF ({type(self.base).__name__}) cannot sample, so neither can its "
                             f"spherical average")
        w = sample(n, None, tf.random.experimental.stateless_fold_in(seed, 0))
        choice = tf.random.stateless_uniform([tf.shape(w)[0]], tf.random.experimental.stateless_fold_in(seed, 1),
                                             minval=0, maxval=self.n_rotations, dtype=tf.int32)
        r = tf.gather(self.rotations, choice)                                     # [n, 3, 3]
        x = tf.einsum("nji,nj->ni", r, w[:, :3])                                  # R_mᵀ x
        v = tf.einsum("nji,nj->ni", r, w[:, 3:])
        return tf.concat([x, v], axis=1)
