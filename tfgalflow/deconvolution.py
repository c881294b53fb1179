"""Density deconvolution: the likelihood of a noisy star under a DF convolved with its error model.

A star observed at w_obs with a known Gaussian error model was drawn from the noise-convolved DF

    p_i(w_obs) = ∫ f(w) p_i(w_obs | w) d^6w,

so maximising Σ_i log p_i(w_obs,i) over f fits the *error-free* DF f (density deconvolution:
extreme deconvolution for Gaussian mixtures, Bovy, Hogg & Roweis 2011, AnnAS 5, 1657; with
normalizing flows, Dockhorn, Ritchie, Yu & Murray 2020, arXiv:2006.09396). For a flow the
integral has no closed form; it is estimated with K importance-sampled noise draws per star,

    log p̂_i = log (1/K) Σ_k f(w_k) ω_k,   w_k ~ q_i(· | w_obs),  ω_k = p_i(w_obs | w_k) / q_i(w_k),

with z_k ~ N(0, I_6) and, per ``Catalogue.error_kind``:

``"absolute"``    w_obs = w + σ ε:        w_k = w_obs − σ z_k,          ω_k = 1
                  (q = the error kernel itself: p_i(w_obs) = E_z f(w_obs − σ z));
``"covariance"``  w_obs = w + e, e ~ N(0, C):  w_k = w_obs − A z_k,  A Aᵀ = C,  ω_k = 1;
``"fractional"``  w_obs,j = w_j (1 + s_j ε_j) (multiplicative; the Hernquist study's convention):
                  w_k,j = w_obs,j / t_kj,  t_kj = 1 + s_j z_kj,  ω_k = Π_j 1 / |t_kj|.

The multiplicative case is *not* w_obs − noise. Per column (drop j), p(w_obs | w) =
φ((w_obs / w − 1) / s) / (s |w|); substituting w = w_obs / t, dw = |w_obs| / t² dt, gives

    p(w_obs) = ∫ f(w_obs / t) φ((t − 1) / s) / (s |t|) dt = E_{t ~ N(1, s²)} [ f(w_obs / t) / |t|
    ],

exactly: the true coordinate given w_obs is proposed as w = w_obs / (1 + s z), whose density is
q(w) = φ((w_obs / w − 1) / s) |w_obs| / (s w²) ∝ φ((w_obs / w − 1) / s) / w², and the importance
weight is p(w_obs | w) / q(w) = |w| / |w_obs| = 1 / |t|. (t < 0, a sign flip, has probability
Φ(−1/s) = 8·10^-24 at s = 0.1; the estimator stays exact there too.)

The tilted proposal (``NoiseModel(proposal="tilted")``, ``TrainConfig.noise_proposal``). Write
the integrand as a function of the standard normals, g(z) = f(w(z)) ω(z), so p_i = E_{z ~ N(0, I)}
g(z). Where log f changes by more than ~1 across the error ellipse (10 % errors on a density
falling as r^-4, or on a DF near its escape energy) the K values of g(z) differ by large factors
and the estimator's V_i is large. Drawing instead ζ ~ N(−m, I), the normal tilted along the score
of the integrand at the observation,

    m = −∇_z log g(z) |_{z=0}   (clipped to |m_j| ≤ 1),
    p_i = E_{ζ ~ N(−m, I)} [ g(ζ) φ(ζ) / φ(ζ + m) ],   log φ(ζ) − log φ(ζ + m) = zᵀm − |m|²/2

(z = ζ + m), is exact for any m: the importance identity, with m computed without gradient
(exponential tilting; the first-order version of a Laplace proposal: Owen 2013, *Monte Carlo
theory, methods and examples*, ch. 9). If log g is linear in z over the ellipse, g(ζ) φ(ζ) /
φ(ζ + m) is the same for every draw and V_i = 0: a Gaussian f under absolute errors has V_i of
order the curvature alone. m is one gradient of the flow at each x_obs per step (about the cost of
one of the K draws with its backward pass); the clip keeps the tilt within one standard
deviation of the kernel where log f is not linear (at the edge of its support, where its gradient
is unbounded). The tilt is first order: where the errors are as wide as f itself it overshoots
(for Gaussians the shift C ∇log f = C Σ⁻¹(μ − x) against the posterior's C (Σ + C)⁻¹(μ − x)),
and the curvature's share of V stays. m per kind, at w = x_obs: σ ∇log f (absolute), Aᵀ ∇log f
(covariance), s (w ∇log f + 1) per column (fractional), each the score of the integrand in z.

p̂_i is unbiased for p_i, but its log is biased low (Jensen): with V_i = Var_q[f ω] / p_i², the
relative variance of one draw,

    E[log p̂_i] − log p_i = −V_i / (2K) + O(K^-2)

(the delta method on log of a mean of K i.i.d. draws), so the fitted f is the maximiser of a
likelihood whose bias shrinks as 1/K; :func:`log_mean_bias` states it, and the tests check it on a
Gaussian where V_i is known in closed form. Cost: K evaluations of f per star and step; memory
flat in K when the gradient is accumulated a few draws at a time
(:meth:`NoiseModel.log_likelihood_and_gradient`, ``TrainConfig.noise_per_pass``).

Selection on the observed coordinates. A catalogue is cut after the noise: a survey keeps the
stars whose *measured* radius is inside its volume (here r_obs = |x_obs| < r_max over the position
columns, ``TrainConfig.selection_r_max``). The stars it kept were drawn from

    p_i(w_obs | S) = S(w_obs) p_i(w_obs) / P_sel,   P_sel = ∫ f(w) P(S | w) d^6w,

P(S | w) the probability that a star at w is observed inside the cut. Without the normaliser the
fit of a catalogue cut at r_max has to put all of p_i's mass inside the cut, while the noise
spreads any f near the edge across it: the fitted f is pushed low there. With it the loss gains
+log P_sel, whose gradient is (the score-function identity, with E_f ∇ log f = 0)

    ∇_θ log P_sel = E_f[(S − b) ∇_θ log f(w)] / P_sel   for any constant b,

estimated each step from one flow draw per star, w_b ~ f (no gradient through the draw),
observed through star b's own error model (:meth:`NoiseModel.observe`), S_b its selection,
b = P̂_sel = the batch mean of S_b (:meth:`NoiseModel.selection_surrogate`). The normaliser is
taken as common to the batch: exact for an unconditional flow whose stars share an error model
(a survey with uniform fractional errors), first order in 1 − P_sel otherwise. The tracked loss
stays −log p̂ without the normaliser (|log P_sel| nats away from the objective).

Use: ``TrainConfig(deconvolve=True, noise_samples=K)`` (CLI ``tfgalflow train --deconvolve
--noise-samples K``) trains an ordinary :class:`~tfgalflow.model.Flow` on a catalogue with
``errors``; during training the errors ride along as extra columns of x (:func:`pack`), and
``Flow.train_step`` calls :meth:`NoiseModel.log_likelihood` in place of log f. Training draws
from the tilted proposal unless ``TrainConfig.noise_proposal = "kernel"`` (``NoiseModel`` itself
defaults to the kernel, the estimator as first written above). With reduced
coordinates (``TrainConfig(coordinates="spherical", deconvolve=True)``) the flow learns p(r, v_r,
v_t) while the rows and their errors stay in the catalogue's columns: each candidate w_k is
reduced inside the step and f(w_k) = p(r, v_r, v_t) / (8π² r² v_t) (the DF of
:mod:`tfgalflow.spherical_df`), so the estimator above is unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from . import validation
from .catalogue.core import ERROR_KINDS, NOISE_PROPOSALS
from .errors import InputError


def error_factor(errors: np.ndarray, kind: str) -> np.ndarray:
    """The per-star noise factor of the estimator: σ or s [N, D] as given, or for covariances
    [N, D, D] a matrix A with A Aᵀ = C (A = V diag(√max(λ, 0)) from C = V diag(λ) Vᵀ, so
    positive semi-definite C with zero eigenvalues work), flattened row-major to [N, D²].
    """
    validation.one_of(kind, "error_kind", ERROR_KINDS)
    errors = np.asarray(errors, np.float64)
    if kind != "covariance":
        return errors
    lam, vec = np.linalg.eigh(errors)
    factor = vec * np.sqrt(np.maximum(lam, 0.0))[:, None, :]
    return factor.reshape(len(errors), -1)


def pack(x: np.ndarray, errors: np.ndarray, kind: str) -> np.ndarray:
    """Training rows [N, D + E] float32: x [N, D] then the :func:`error_factor` columns
    (E = D, or D² for covariances); :meth:`NoiseModel.split` undoes it inside the train step.
    """
    x = np.asarray(x, np.float64)
    factor = error_factor(errors, kind)
    if factor.shape[0] != x.shape[0]:
        raise InputError(f"errors have {factor.shape[0]} rows but x has {x.shape[0]}")
    return np.concatenate([x, factor], axis=1).astype(np.float32)


def log_mean_bias(relative_variance: float | np.ndarray, samples: int) -> float | np.ndarray:
    """Leading-order bias of the log of a Monte-Carlo mean of K i.i.d. draws with mean p.

    E[log p̂] − log p = −Var / (2 K p²) + O(K^-2), with ``relative_variance`` = Var / p² and
    ``samples`` = K (the delta method; see the module docstring).
    """
    return -np.asarray(relative_variance) / (2.0 * samples)


def relative_variance(log_terms: tf.Tensor) -> tf.Tensor:
    """V̂ = s² / m² [B] of the K terms exp(log_terms) [K, B] (m their mean, s² their unbiased
    variance), in log space: with r_k = exp(a_k − max a), V̂ = K/(K−1) (mean r² / (mean r)² − 1).
    Bounded by K (one term dominating), so the correction V̂/(2K) is at most ~1/2 nat.
    """
    k = tf.cast(tf.shape(log_terms)[0], log_terms.dtype)
    r = tf.exp(log_terms - tf.stop_gradient(tf.reduce_max(log_terms, axis=0)))
    ratio = tf.reduce_mean(r * r, axis=0) / tf.square(tf.reduce_mean(r, axis=0))
    return k / (k - 1.0) * (ratio - 1.0)


@dataclass(frozen=True)
class NoiseModel:
    """The error model of a catalogue and the size of the estimator (see the module docstring).

    Attributes:
        kind: "absolute", "fractional" or "covariance" (``Catalogue.error_kind``).
        samples: K, noise draws per star and step.
        seed: first half of the stateless seed of the draws (the other half is the step).
        dim: D, the width of the observed rows x (the catalogue's columns, in which the errors
            are given).
        correct_bias: add V̂ / 2K to the log of the mean (:func:`relative_variance`).
        coordinates: the coordinates the flow learns (``TrainConfig.coordinates``): for
            "cartesian" the flow's density is f itself; for reduced coordinates ("spherical",
            "cylindrical") the candidates w_k stay in the catalogue's columns and f(w_k) is the
            reduced-coordinate DF of the flow (:func:`tfgalflow.coordinates.wrap`: the flow's
            density of the reduced coordinates over the Jacobian, e.g. p(r, v_r, v_t) /
            (8π² r² v_t)), because the errors act on the observed columns, not on r or v_t.
        per_pass: how :meth:`log_likelihood_and_gradient` differentiates the K draws: 0 in one
            pass (fastest, memory ~K·B rows of activations), k ≥ 1 in passes of k draws (memory
            ~k·B rows, flat in K, one extra forward pass).
        proposal: "kernel" draws the candidates from the error kernel itself (z ~ N(0, I));
            "tilted" from the kernel tilted along the score of the integrand at the observation
            (z ~ N(−m, I), :meth:`tilt`; see the module docstring): same expectation, smaller
            variance where log f changes across the error ellipse, one extra gradient of f per
            star and step.
        selection_r_max: the catalogue kept the stars with observed |x_obs| < selection_r_max
            (the norm over the first min(3, D) columns, the positions; catalogue units), or None
            (no selection after the noise). Adds ∇ log P_sel to the loss gradient
            (:meth:`selection_surrogate`).
    """

    kind: str
    samples: int = 16
    seed: int = 0
    dim: int = 6
    correct_bias: bool = True
    coordinates: str = "cartesian"
    per_pass: int = 0
    selection_r_max: float | None = None
    proposal: str = "kernel"

    def __post_init__(self):
        from .coordinates import COORDINATES, check_dim
        validation.one_of(self.kind, "error_kind", ERROR_KINDS)
        validation.integer(self.samples, "noise_samples")
        validation.integer(self.seed, "seed", low=0)
        validation.integer(self.dim, "dim")
        validation.integer(self.per_pass, "noise_per_pass", low=0)
        validation.one_of(self.coordinates, "coordinates", COORDINATES)
        validation.one_of(self.proposal, "noise_proposal", NOISE_PROPOSALS)
        if self.coordinates != "cartesian":
            check_dim(self.coordinates, self.dim)
        if self.selection_r_max is not None:
            validation.positive_number(self.selection_r_max, "selection_r_max")

    @property
    def width(self) -> int:
        """E, the packed error columns per row: D (σ or s) or D² (covariance factor A)."""
        return self.dim * self.dim if self.kind == "covariance" else self.dim

    def split(self, packed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(x [..., D], errors [..., E]) from packed rows [..., D + E] (:func:`pack`)."""
        packed = tf.convert_to_tensor(packed, tf.float32)
        width = packed.shape[-1]
        if width is not None and width != self.dim + self.width:
            raise InputError(f"rows have {width} columns; a flow deconvolving {self.kind} errors "
                             f"expects x and errors packed as [..., {self.dim + self.width}] "
                             "(tfgalflow.deconvolution.pack)")
        return packed[..., :self.dim], packed[..., self.dim:]

    def candidates(self, x_obs: tf.Tensor, errors: tf.Tensor,
                   z: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Proposed true points w_k [K, B, D] and log importance weights log ω_k [K, B] for the
        observed rows x_obs [B, D] with packed errors [B, E] and standard normals z [K, B, D].
        """
        if self.kind == "absolute":
            return x_obs - errors * z, tf.zeros(tf.shape(z)[:2])
        if self.kind == "covariance":
            factor = tf.reshape(errors, [-1, self.dim, self.dim])            # [B, D, D]
            return x_obs - tf.einsum("bij,kbj->kbi", factor, z), tf.zeros(tf.shape(z)[:2])
        t = 1.0 + errors * z                                                  # fractional
        return x_obs / t, -tf.reduce_sum(tf.math.log(tf.abs(t)), axis=-1)

    def observe(self, w: tf.Tensor, errors: tf.Tensor, z: tf.Tensor) -> tf.Tensor:
        """Observed rows x_obs [B, D] of true rows w [B, D] with packed errors [B, E] and standard
        normals z [B, D]: the forward error model (w + σ z, w + A z, or w (1 + s z)).
        """
        if self.kind == "absolute":
            return w + errors * z
        if self.kind == "covariance":
            factor = tf.reshape(errors, [-1, self.dim, self.dim])
            return w + tf.einsum("bij,bj->bi", factor, z)
        return w * (1.0 + errors * z)

    def selected(self, x_obs: tf.Tensor) -> tf.Tensor:
        """S(x_obs) [...] float32: 1 where the observed radius |x_obs[..., :min(3, D)]| is below
        ``selection_r_max`` (1 everywhere without a selection), else 0.
        """
        if self.selection_r_max is None:
            return tf.ones(tf.shape(x_obs)[:-1])
        positions = x_obs[..., :min(3, self.dim)]
        inside = tf.reduce_sum(tf.square(positions), axis=-1) < self.selection_r_max ** 2
        return tf.cast(inside, tf.float32)

    def selection_surrogate(self, density: Any, errors: tf.Tensor, seed: tf.Tensor,
                            labels: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        """(s, log P̂_sel): a scalar s whose gradient is the estimate of ∇_θ log P_sel, and the
        estimate of log P_sel itself (see the module docstring).

        With one draw w_b ~ f(· | labels_b) per star (no gradient through it), its observation
        through star b's errors, S_b = S(x_obs,b) and P̂ = mean_b S_b:

            s = mean_b [(S_b − P̂) log f(w_b | labels_b)] / P̂,
            ∇_θ s = mean_b [(S_b − P̂) ∇_θ log f(w_b)] / P̂ → E_f[S ∇ log f] / P_sel.

        Args:
            density: the density of the catalogue's columns (log_prob_tensor, sample_tensor).
            errors: [B, E] packed errors of the batch (:meth:`split`): each draw is observed
                through one star's error model.
            seed: stateless seed [2] of the step (the draws are folded from it, independent of
                the likelihood's).
            labels: [B, C] or None.
        """
        fold = tf.random.experimental.stateless_fold_in
        w = tf.stop_gradient(density.sample_tensor(tf.shape(errors)[0], labels, fold(seed, 1)))
        z = tf.random.stateless_normal(tf.shape(w), seed=fold(seed, 2))
        s = self.selected(self.observe(w, errors, z))
        p_sel = tf.reduce_mean(s)
        # P̂ = 0 (no draw inside the cut) only for a flow that has left the data entirely: the
        # surrogate is then 0 and the likelihood term alone pulls it back
        safe = tf.maximum(p_sel, 1.0 / tf.cast(tf.size(s), tf.float32))
        surrogate = tf.reduce_mean((s - p_sel) * density.log_prob_tensor(w, labels)) / safe
        return surrogate, tf.math.log(safe)

    def draws(self, x_obs: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        """The standard normals z [K, B, D] of one step (stateless ``seed`` [2])."""
        return tf.random.stateless_normal(
            tf.stack([self.samples, tf.shape(x_obs)[0], self.dim]), seed=seed)

    def log_terms(self, log_prob: Callable[..., tf.Tensor], x_obs: tf.Tensor, errors: tf.Tensor,
                  z: tf.Tensor, labels: tf.Tensor | None = None,
                  tilt: tf.Tensor | None = None) -> tf.Tensor:
        """a_kb = log f(w_kb | labels_b) + log ω_kb [K', B] for the draws z [K', B, D] (any
        K' ≤ K: a pass of :meth:`log_likelihood_and_gradient` takes a few at a time).

        With ``tilt`` m [B, D] (:meth:`tilt`) the candidates are those of ζ = z − m, a draw of
        N(−m, I), and a_kb gains the proposal's weight log φ(ζ) − log φ(z) = z·m − |m|²/2.
        """
        if tilt is not None:
            log_ratio = tf.reduce_sum(z * tilt, axis=-1) - 0.5 * tf.reduce_sum(tilt * tilt, -1)
            return self.log_terms(log_prob, x_obs, errors, z - tilt, labels) + log_ratio
        w, log_weight = self.candidates(x_obs, errors, z)
        k = tf.shape(z)[0]
        flat = tf.reshape(w, [-1, self.dim])
        tiled = None if labels is None else tf.tile(labels, tf.stack([k, 1]))
        return tf.reshape(log_prob(flat, tiled), tf.stack([k, -1])) + log_weight

    def tilt(self, log_prob: Callable[..., tf.Tensor], x_obs: tf.Tensor, errors: tf.Tensor,
             labels: tf.Tensor | None = None, max_shift: float | None = None
             ) -> tf.Tensor | None:
        """m [B, D] = −∇_z a(z) at z = 0, clipped to [−max_shift, max_shift] (0 where not
        finite, e.g. a star where f = 0), no gradient: the shift of the tilted proposal (module
        docstring); None for ``proposal="kernel"``. a(0) = log f(x_obs) + log ω(0), so m is the
        score of the integrand in the standard normals at the observation.

        Args:
            log_prob: log f as a tensor function of (x [M, D], labels [M, C] | None) -> [M].
            x_obs: [B, D] observed rows.
            errors: [B, E] packed errors (:meth:`split`).
            labels: [B, C] or None.
            max_shift: the clip, in standard deviations of the kernel (default one; training
                always uses the default).
        """
        if self.proposal == "kernel":
            return None
        max_shift = _TILT_MAX if max_shift is None else float(max_shift)
        z0 = tf.zeros(tf.stack([1, tf.shape(x_obs)[0], self.dim]))
        with tf.GradientTape() as tape:
            tape.watch(z0)
            a0 = self.log_terms(log_prob, x_obs, errors, z0, labels)
        m = -tape.gradient(a0, z0)[0]
        m = tf.where(tf.math.is_finite(m), m, tf.zeros_like(m))
        return tf.stop_gradient(tf.clip_by_value(m, -max_shift, max_shift))

    def log_mean(self, log_terms: tf.Tensor) -> tf.Tensor:
        """log p̂ [B] = logsumexp_k a_kb − log K (+ V̂_b / 2K with ``correct_bias``) from the K
        terms a [K, B] (:meth:`log_terms`). A star whose K terms are all −inf (every candidate
        outside a bounded support) gets the batch's lowest finite log p̂, with no gradient.
        """
        k = self.samples
        # a candidate outside the flow's support (a bounded radius, FlowConfig.upper_bounds) has
        # a_kb = −inf and weight 0; a star with no candidate inside has p̂ = 0, an infinite loss:
        # it takes the batch's lowest finite estimate instead, as a constant (no gradient)
        # (only −inf marks a candidate outside: a NaN term stays NaN and shows in the loss)
        inside = tf.logical_not(tf.reduce_all(tf.equal(log_terms, -np.inf), axis=0))   # [B]
        log_terms = tf.where(inside[None, :], log_terms, tf.zeros_like(log_terms))
        log_mean = tf.reduce_logsumexp(log_terms, axis=0) - math.log(k)
        if self.correct_bias and k > 1:
            log_mean = log_mean + relative_variance(log_terms) / (2.0 * k)
        lowest = tf.reduce_min(tf.where(inside, log_mean, tf.fill(tf.shape(log_mean), np.inf)))
        floor = tf.stop_gradient(tf.where(tf.math.is_finite(lowest), lowest, 0.0))
        return tf.where(inside, log_mean, floor)

    def log_likelihood(self, log_prob: Callable[..., tf.Tensor], x_obs: tf.Tensor,
                       errors: tf.Tensor, seed: tf.Tensor,
                       labels: tf.Tensor | None = None) -> tf.Tensor:
        """log p̂(x_obs | labels) [B] = logsumexp_k(log f(w_k) + log ω_k) − log K (TF ops, one
        pass over all K·B candidates; differentiable, its gradient keeps the activations of all
        of them: memory ~K·B rows, see :meth:`log_likelihood_and_gradient` for flat memory).

        Args:
            log_prob: log f as a tensor function of (x [M, D], labels [M, C] | None) -> [M].
            x_obs: [B, D] observed rows.
            errors: [B, E] packed errors (:meth:`split`).
            seed: stateless seed [2] of the draws z ~ N(0, I) [K, B, D].
            labels: [B, C] or None; star b's K candidates share its labels.
        """
        z = self.draws(x_obs, seed)
        tilt = self.tilt(log_prob, x_obs, errors, labels)
        return self.log_mean(self.log_terms(log_prob, x_obs, errors, z, labels, tilt))

    def log_likelihood_and_gradient(
        self, log_prob: Callable[..., tf.Tensor], x_obs: tf.Tensor, errors: tf.Tensor,
        seed: tf.Tensor, labels: tf.Tensor | None, loss: Callable[[tf.Tensor], tf.Tensor],
        variables: list[tf.Variable],
    ) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """(log p̂ [B], ∇_θ loss(log p̂)), the training step's loss gradient.

        With ``per_pass`` = 0, one differentiated pass through :meth:`log_likelihood` (memory
        ~K·B rows of activations). With ``per_pass`` = k ≥ 1, memory flat in K: the draws are
        evaluated twice, without a tape, then k at a time under one.

        The log of the mean is a function of the K·B terms a_kb(θ) only, so by the chain rule

            ∇_θ L = Σ_kb c_kb ∇_θ a_kb,   c_kb = ∂L/∂a_kb = (∂L/∂ log p̂_b) (∂ log p̂_b/∂a_kb)

        (without the bias correction ∂ log p̂_b/∂a_kb = softmax_k(a_·b), the importance
        weights). Pass 1 evaluates a [K, B] with no tape, in groups of draws; c [K, B] follows by
        autodiff of the cheap map a → L (``loss`` of :meth:`log_mean`); pass 2 re-evaluates the
        draws ``per_pass`` at a time under a tape and accumulates the gradient of Σ c·a. Peak
        memory is that of one group's activations (~per_pass·B rows) instead of all K·B; the
        cost is one extra forward pass (the gradient equals :meth:`log_likelihood`'s to rounding).

        Args:
            log_prob: log f as a tensor function of (x [M, D], labels [M, C] | None) -> [M].
            x_obs: [B, D] observed rows.
            errors: [B, E] packed errors (:meth:`split`).
            seed: stateless seed [2] of the draws (the same draws as :meth:`log_likelihood`).
            labels: [B, C] or None.
            loss: the scalar loss as a function of log p̂ [B] (e.g. the weighted mean of −log p̂).
            variables: the variables θ to differentiate.

        Returns:
            log p̂ [B] (no gradient attached) and the gradients, one per variable (zeros for a
            variable the loss does not depend on).
        """
        z = self.draws(x_obs, seed)
        tilt = self.tilt(log_prob, x_obs, errors, labels)       # outside the tapes: no gradient
        if not self.per_pass:
            with tf.GradientTape() as tape:
                log_p = self.log_mean(self.log_terms(log_prob, x_obs, errors, z, labels, tilt))
                value = loss(log_p)
            return log_p, tape.gradient(value, variables,
                                        unconnected_gradients=tf.UnconnectedGradients.ZERO)
        k, per = self.samples, min(self.per_pass, self.samples)

        def terms(first, size):                          # a of draws first ... first + size − 1
            zi = tf.slice(z, tf.stack([first, 0, 0]), tf.stack([size, -1, -1]))
            return self.log_terms(log_prob, x_obs, errors, zi, labels, tilt)

        # pass 1: the terms a [K, B], no tape; a forward pass keeps no activations for a backward
        # one (a layer or two of rows live at a time, not every layer's), so its groups are
        # _FORWARD_GROUPS times larger at about the same peak memory
        def put(a, first, size):
            rows = (first + tf.range(size))[:, None]
            return tf.tensor_scatter_nd_update(a, rows, terms(first, size))

        a = _fold_groups(put, k, per * _FORWARD_GROUPS, tf.zeros(tf.stack([k, tf.shape(z)[1]])))
        with tf.GradientTape() as tape:
            tape.watch(a)
            log_p = self.log_mean(a)
            value = loss(log_p)
        c = tape.gradient(value, a)                      # [K, B] = ∂L/∂a

        # pass 2: Σ_kb c_kb ∇ a_kb, group by group under a tape
        def add_gradient(grads, first, size):
            ci = tf.slice(c, tf.stack([first, 0]), tf.stack([size, -1]))
            with tf.GradientTape() as t:
                ai = terms(first, size)      # −inf outside a bounded support, where c = 0
                surrogate = tf.reduce_sum(tf.where(tf.equal(ai, -np.inf), 0.0, ci * ai))
            step = t.gradient(surrogate, variables,
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return [g + d for g, d in zip(grads, step)]

        return log_p, _fold_groups(add_gradient, k, per, [tf.zeros_like(v) for v in variables])


# the largest shift of the tilted proposal (NoiseModel.tilt), per standard normal: one σ of the
# kernel keeps the proposal's overlap with it where log f is far from linear across the errors
# (scripts/deconvolution_proposals.py measures V by binding energy on the exact Hernquist DF for
# clips of 1 and 3)
_TILT_MAX = 1.0

# pass 1 of NoiseModel.log_likelihood_and_gradient takes this many times more draws per group than
# pass 2 (no tape: ~1/8 of a differentiated pass's activations for a stack of 2-hidden-layer MADEs)
_FORWARD_GROUPS = 8


def _fold_groups(body: Callable[[object, tf.Tensor, int], object], k: int, size: int,
                 state: object) -> object:
    """state ← body(state, first, n) over the groups [first, first + n) of range(k), n = size
    except a shorter last one: the full groups one after another in a ``tf.while_loop`` (one
    group's tensors alive at a time; static sizes, as XLA needs), the remainder after it.
    """
    size = min(size, k)
    full, rest = divmod(k, size)
    if full > 1:
        _, state = tf.while_loop(lambda i, st: i < full,
                                 lambda i, st: (i + 1, body(st, i * size, size)),
                                 (tf.constant(0), state), parallel_iterations=1)
    elif full == 1:
        state = body(state, 0, size)
    return body(state, full * size, rest) if rest else state


__all__ = ["NoiseModel", "pack", "error_factor", "log_mean_bias"]
