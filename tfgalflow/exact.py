"""Exact distribution functions seen as densities: the controls every learned model is measured
against.

:class:`ExactDF` wraps an analytic model's TensorFlow log-DF (``model.tf_log_df(x, v, kind)``, e.g.
:class:`~tfgalflow.hernquist.Hernquist`) in the :class:`~tfgalflow.density.Density` contract, so
the CBE solver, the spherical average and the contract tests treat it exactly like a learned flow:
w = concat(x, v) [N, 6] in the model's units, ``log_prob(w) -> [N]`` (-inf where the DF vanishes).

The physics modules stay free of TensorFlow at import time; this module is imported by
``Hernquist.exact_density`` only when an exact density is asked for.
"""
from __future__ import annotations

from typing import Any

import tensorflow as tf

from .density import Density


class ExactDF(Density):
    """An analytic phase-space DF f(x, v) as a 6-D density, interchangeable with a learned
    ``Flow``.

    Attributes: ``dim = 6`` (w = concat(x, v)), ``label_dim = 0``, ``model``, ``kind``.
    ``log_prob(w)`` takes w [N, 6] and returns log f(x, v) [N] float32, -inf where unbound;
    differentiable under GradientTape. f integrates to the model's mass M (not 1): it is the mass
    density in phase space, so for M = 1 it *is* a probability density.

    Args:
        model: an exact model with ``tf_log_df(x [N, 3], v [N, 3], kind) -> [N]``, ``a``
            (length scale) and ``velocity_scale`` (e.g. :class:`~tfgalflow.hernquist.Hernquist`).
        kind: the DF of the model (e.g. "iso" or "aniso" for Hernquist); checked by the model.
    """

    what = "exact DF"
    dim = 6
    label_dim = 0

    def __init__(self, model: Any, kind: str = "iso"):
        model.check_kind(kind)
        self.model = model
        self.kind = kind

    def __repr__(self) -> str:
        return f"ExactDF({self.model!r}, kind={self.kind!r})"

    def log_prob_tensor(self, w: tf.Tensor, labels: tf.Tensor | None = None) -> tf.Tensor:
        """log f(x, v) for w = (x, v) [N, 6]: [N] float32."""
        return self.model.tf_log_df(w[:, :3], w[:, 3:], self.kind)

    def scale_hint(self) -> tf.Tensor:
        """(a, a, a, v_g, v_g, v_g): the model's length and velocity scales [6]."""
        a, v = float(self.model.a), float(self.model.velocity_scale)
        return tf.constant([a, a, a, v, v, v], tf.float32)


class DehnenFamilyDF(Density):
    """The Dehnen γ-models with Osipkov–Merritt anisotropy as one conditional density f(x, v | c).

    Labels c = (γ, a/r_a) per row (:data:`tfgalflow.dehnen.LABEL_NAMES`; a/r_a = 0 is isotropic),
    model units G = M = a = 1: the exact control for a conditional flow trained on a label grid, at
    any label, including labels it never saw. ``log_prob(w [N, 6], labels [N, 2])`` is
    :func:`tfgalflow.dehnen.tf_log_df` (Eddington inversion by quadrature, differentiable); labels
    are checked against the family's validity limits (γ in [0, 3), f(Q) >= 0) on every eager call.

    References: Dehnen 1993, MNRAS 265, 250; Osipkov 1979; Merritt 1985, AJ 90, 1027.
    """

    what = "Dehnen family DF"
    dim = 6
    label_dim = 2

    def check_inputs(self, x: Any, labels: Any = None) -> tuple[tf.Tensor, tf.Tensor | None]:
        """As every density, and labels inside the family's valid range
        (InputError naming the limit).
        """
        from .dehnen import check_labels

        x, c = super().check_inputs(x, labels)
        if tf.executing_eagerly():
            check_labels(c.numpy())
        return x, c

    @property
    def evaluations_per_row(self) -> int:
        """The Eddington quadrature holds [N, nodes] intermediates: chunks shrink by a few."""
        return 8

    def log_prob_tensor(self, w: tf.Tensor, labels: tf.Tensor | None = None) -> tf.Tensor:
        """log f(x, v | γ, a/r_a) for w = (x, v) [N, 6], labels [N, 2]: [N] float32."""
        from .dehnen import tf_log_df

        return tf_log_df(w[:, :3], w[:, 3:], labels)

    def scale_hint(self) -> tf.Tensor:
        """Model units: a = 1 for x, sqrt(G M / a) = 1 for v."""
        return tf.ones([6], tf.float32)


__all__ = ["ExactDF", "DehnenFamilyDF"]
