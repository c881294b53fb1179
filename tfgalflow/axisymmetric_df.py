"""An axisymmetric system's DF learned in cylindrical coordinates: f(x, v, ...) from a density of
(R, z, v_R, v_φ, v_z, ...).

A steady axisymmetric galaxy (a disc, a bulge, a halo: anything invariant under rotations about
the z axis) has a DF that does not depend on the azimuth φ of a star, and its velocity enters only
through the cylindrical components (v_R, v_φ, v_z) (Jeans' theorem: f = f(E, L_z, I_3), none of
which depends on φ). A flow on (x, y, z, v_x, v_y, v_z) has to learn that invariance — in
particular that the rotation ring of a disc in (v_x, v_y) turns with the position angle — and a
catalogue may also carry other columns (metallicity, age) that depend on the position only
through (R, z). This module builds the invariance in: a density p(R, z, v_R, v_φ, v_z, e) of the
reduced coordinates (e: the columns after the first six, unchanged) — a flow trained on them,
which learns log R itself — defines the density of the catalogue's columns

    f(x, v, e) = p(R, z, v_R, v_φ, v_z, e) / (2π R),                                      (1)

R = sqrt(x² + y²), v_R = (x v_x + y v_y)/R, v_φ = (x v_y - y v_x)/R: dx dy = R dR dφ, and
(v_x, v_y) -> (v_R, v_φ) is a rotation by φ (unit Jacobian); integrating over φ gives the 2π.
With ``even=True`` p is replaced by its mean over the mirror images a steady disc symmetric about
its mid-plane has, (v_R -> -v_R) and (z, v_z) -> (-z, -v_z),

    p̄ = [p(R, z, v_R, ...) + p(R, z, -v_R, ...) + p(R, -z, v_R, v_φ, -v_z, ...)
          + p(R, -z, -v_R, v_φ, -v_z, ...)] / 4,                                           (2)

(four base evaluations per point), which removes the part of the learning error that is odd under
them. Both (1) and (2) keep f normalised.

It cannot represent a bar, spiral arms, a warp or a lopsided disc (anything that depends on φ),
nor, with ``even``, a disc bending out of its plane. Train it with
``TrainConfig(coordinates="cylindrical")`` (CLI ``tfgalflow train ... --coordinates cylindrical``)
on catalogues of at least six columns (x, y, z [length], v_x, v_y, v_z [velocity], then anything
else, e.g. [Fe/H] and age); ``log_columns`` then name columns after the sixth (e.g. an age).
:func:`tfgalflow.training.load_run` returns the :class:`AxisymmetricDF`; it exports to a SavedModel
in the catalogue's own columns (metadata ``axisymmetric_df``).

Reference: Binney & Tremaine 2008, Galactic Dynamics, 2nd ed., §4.2 (Jeans' theorem) and §3.2
(integrals of motion in axisymmetric potentials).
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

#: The reduced phase-space columns and the one whose logarithm the flow learns (R > 0).
CYLINDRICAL_COLUMNS = ("R", "z", "v_R", "v_phi", "v_z")
CYLINDRICAL_LOG_COLUMNS = (0,)

_LOG_2PI = math.log(2.0 * math.pi)


def cylindrical_coordinates(w: Any) -> np.ndarray:
    """(R, z, v_R, v_φ, v_z, e) [N, D - 1] float64 of catalogue rows w = (x, y, z, v_x, v_y, v_z,
    e) [N, D >= 6] (e: the columns after the sixth, unchanged; units as in w).

    InputError for a point on the axis (R = 0), where φ and the reduction are undefined (a
    continuous density puts no mass there).
    """
    w = finite_matrix(w, "w", expected="[N, >= 6] (x, y, z, v_x, v_y, v_z, ...)")
    if w.shape[1] < 6:
        raise InputError(f"w: expected [N, >= 6] (x, y, z, v_x, v_y, v_z, ...), got {w.shape}")
    x, y = w[:, 0], w[:, 1]
    r_cyl = np.hypot(x, y)
    if np.any(r_cyl <= 0):
        raise InputError(f"w: {int(np.sum(r_cyl <= 0))} point(s) on the z axis (R = 0), where "
                         "the cylindrical reduction is undefined; remove them")
    v_r = (x * w[:, 3] + y * w[:, 4]) / r_cyl
    v_phi = (x * w[:, 4] - y * w[:, 3]) / r_cyl
    return np.concatenate([np.stack([r_cyl, w[:, 2], v_r, v_phi, w[:, 5]], axis=1), w[:, 6:]],
                          axis=1)


def cylindrical_tensor(w: tf.Tensor) -> tf.Tensor:
    """:func:`cylindrical_coordinates` as TF ops: [N, D - 1] (differentiable wherever R > 0)."""
    x, y = w[:, 0], w[:, 1]
    r_cyl = tf.sqrt(x * x + y * y)
    v_r = (x * w[:, 3] + y * w[:, 4]) / r_cyl
    v_phi = (x * w[:, 4] - y * w[:, 3]) / r_cyl
    return tf.concat([tf.stack([r_cyl, w[:, 2], v_r, v_phi, w[:, 5]], axis=1), w[:, 6:]], axis=1)


def flow_log_columns(log_columns: tuple[int, ...]) -> tuple[int, ...]:
    """The reduced data's log columns for catalogue ``log_columns`` (all >= 6): log R, then each
    catalogue column j >= 6 at its reduced index j - 1. InputError for a phase-space column.
    """
    bad = [j for j in log_columns if j < 6]
    if bad:
        raise InputError(f"log_columns {bad}: with coordinates = 'cylindrical' only columns "
                         f"after the sixth (index >= 6) may be log columns (log R is learned "
                         f"already)")
    return CYLINDRICAL_LOG_COLUMNS + tuple(j - 1 for j in log_columns)


class AxisymmetricDF(DerivedDensity):
    """f(x, v, e) = p̄(R, z, v_R, v_φ, v_z, e) / (2π R): a density of catalogue rows exactly
    invariant under rotations about the z axis (and, with ``even``, under the mirrors of eq. 2),
    built from a density of the cylindrical reduction.

    Args:
        base: a (D - 1)-dimensional :class:`~tfgalflow.density.Density` of (R, z, v_R, v_φ, v_z,
            e) with D - 1 >= 5 — a Flow or Ensemble trained on :func:`cylindrical_coordinates` of
            a catalogue (``TrainConfig(coordinates="cylindrical")`` does this); a conditional one
            keeps its labels: f(x, v, e | c). Units: those of the catalogue; f is per unit of its
            D columns.
        even: use the mean over the mirror images, eq. (2) (default False: it assumes a steady
            disc symmetric about z = 0, and costs four base evaluations per point).

    Example::

        f = tfgalflow.load("runs/galaxies_cyl")          # an AxisymmetricDF
        f.sample(10000, labels)                           # (x, y, z, v_x, v_y, v_z, ...)
    """

    what = "axisymmetric DF"

    def __init__(self, base: Any, even: bool = False):
        if not isinstance(base, Density) or base.dim < 5:
            raise InputError(
                f"AxisymmetricDF needs a density of (R, z, v_R, v_phi, v_z, ...) (a tfgalflow "
                f"Density with dim >= 5); got {type(base).__name__} with dim = "
                f"{getattr(base, 'dim', None)}"
            )
        super().__init__(base, name="axisymmetric_df")
        self.even = validation.boolean(even, "even")
        self.dim = base.dim + 1
        # the four mirror images with even
        self.base_evaluations = 4 if self.even else 1

    def with_base(self, base: Density) -> "AxisymmetricDF":
        """The axisymmetric DF of another reduced density (e.g. an ensemble member)."""
        return AxisymmetricDF(base, self.even)

    def scale_hint(self) -> tf.Tensor | None:
        """[D]: the base's z scale for x, y, z, its v_R scale for v_x, v_y, its v_z scale and its
        own scales of the extra columns (the base's R scale is that of log R).
        """
        scale = self.base.scale_hint()
        if scale is None:
            return None
        s = tf.cast(scale, tf.float32)
        return tf.concat([tf.fill([3], s[1]), tf.stack([s[2], s[2], s[4]]), s[5:]], axis=0)

    def log_prob_tensor(self, w: tf.Tensor, labels: tf.Tensor | None = None) -> tf.Tensor:
        """log f(x, v, e | c) = log p̄(R, z, v_R, v_φ, v_z, e | c) - log(2π R), eqs. (1)-(2)."""
        u = cylindrical_tensor(w)
        log_p = self.base.log_prob_tensor(u, labels)
        if self.even:
            images = [log_p]
            for sign in ((1.0, -1.0, 1.0, 1.0), (-1.0, 1.0, -1.0, 1.0), (-1.0, -1.0, -1.0, 1.0)):
                # (z, v_R, v_z) signs of the mirror images of eq. (2); R, v_φ and e unchanged
                flip = tf.constant([1.0, sign[0], sign[1], 1.0, sign[2]] + [1.0] * (self.dim - 6),
                                   tf.float32)
                images.append(self.base.log_prob_tensor(u * flip, labels))
            log_p = tf.reduce_logsumexp(tf.stack(images), axis=0) - math.log(4.0)
        return log_p - (_LOG_2PI + tf.math.log(u[:, 0]))

    def sample_tensor(
        self, n: tf.Tensor | None, c: tf.Tensor | None, seed: tf.Tensor
    ) -> tf.Tensor:
        """Exact draws [n, D] from f: (R, z, v_R, v_φ, v_z, e) ~ p̄, φ ~ U(0, 2π), then
        x = R cos φ, y = R sin φ, v_x = v_R cos φ - v_φ sin φ, v_y = v_R sin φ + v_φ cos φ.
        """
        if not self.base.can_sample:
            raise InputError(f"the base density ({type(self.base).__name__}) cannot sample, so "
                             f"neither can the axisymmetric DF")
        fold = tf.random.experimental.stateless_fold_in
        u = self.base.sample_tensor(n, c, fold(seed, 0))
        return self._placed(u, tf.random.stateless_uniform([tf.shape(u)[0], 3], fold(seed, 1)))

    def noise_tensor(self, n: tf.Tensor, seed: tf.Tensor) -> tf.Tensor | None:
        """[n, K + 3]: the base's noise (K columns) and 3 uniforms (φ and the mirror choices),
        or None if the base does not split its sampler.
        """
        fold = tf.random.experimental.stateless_fold_in
        base = self.base.noise_tensor(n, fold(seed, 0))
        if base is None:
            return None
        return tf.concat([base, tf.random.stateless_uniform(tf.stack([n, 3]), fold(seed, 1))],
                         axis=1)

    def transform_noise_tensor(self, noise: tf.Tensor, labels: tf.Tensor | None) -> tf.Tensor:
        """Draws [n, D] from :meth:`noise_tensor`'s output (the base's transform, then φ)."""
        u = self.base.transform_noise_tensor(noise[:, :-3], labels)
        return self._placed(u, noise[:, -3:])

    def _placed(self, u: tf.Tensor, uniforms: tf.Tensor) -> tf.Tensor:
        """Catalogue rows [n, D] from reduced draws u [n, D - 1] and uniforms [n, 3] (φ/2π, and
        with ``even`` the v_R and mid-plane mirror choices).
        """
        rows = tf.shape(u)[0]
        if self.even:     # p̄ = mixture of the four images: pick one uniformly
            flips = tf.where(uniforms[:, 1:] < 0.5, -1.0, 1.0)
            s_r, s_z = flips[:, 0], flips[:, 1]
            ones = tf.ones([rows])
            u = u * tf.concat([tf.stack([ones, s_z, s_r, ones, s_z], axis=1),
                               tf.ones([rows, self.dim - 6])], axis=1)
        phi = 2.0 * math.pi * uniforms[:, 0]
        c_phi, s_phi = tf.cos(phi), tf.sin(phi)
        r_cyl, v_r, v_phi = u[:, 0], u[:, 2], u[:, 3]
        xyz_v = tf.stack([r_cyl * c_phi, r_cyl * s_phi, u[:, 1],
                          v_r * c_phi - v_phi * s_phi, v_r * s_phi + v_phi * c_phi, u[:, 4]],
                         axis=1)
        return tf.concat([xyz_v, u[:, 5:]], axis=1)
