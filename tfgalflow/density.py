"""The density contract: what every model with a density p(x | c) offers, whatever it is made of.

Every density of the package implements :class:`Density`: a learned :class:`~tfgalflow.model.Flow`,
an :class:`~tfgalflow.model.Ensemble` of them, a :class:`~tfgalflow.symmetry.SphericalAverage`, the
exact DFs (:class:`~tfgalflow.exact.ExactDF`), and a SavedModel loaded back
(:class:`~tfgalflow.export.ExportedModel`). The CBE solver, the spherical average, the export and
the scripts use only the names below, so any new density that implements the two hooks works with
all of them.

A subclass implements

* ``dim`` and ``label_dim`` (``label_dim = 0``: unconditional);
* :meth:`Density.log_prob_tensor` ``(x [N, D], labels [N, C] | None) -> [N]``: log p as plain TF
ops,
  no validation, traceable inside any ``tf.function`` (and under XLA when
  :attr:`Density.inlinable`);
* optionally :meth:`Density.sample_tensor` ``(n, labels, seed [2]) -> [n, D]`` (stateless draws),
and
  :meth:`Density.scale_hint`, :attr:`Density.evaluations_per_row`, :attr:`Density.members`;

and inherits the validated public methods ``log_prob``, ``prob``, ``grad_log_prob``, ``sample``,
``sample_stateless``, each a ``tf.function`` with a fixed ``input_signature`` (free batch
dimension: traced once). Units are the model's own (e.g. x = (kpc, km/s)); log p is per unit volume
of x.

Labels are part of the contract everywhere: an unconditional density takes ``labels=None``, and
giving it labels is an :class:`~tfgalflow.errors.InputError`, as are missing labels for a
conditional one. Inputs are validated eagerly (rank, width, NaN/inf, row counts); symbolic inputs
(inside another ``tf.function``) get the static shape checks only.

Reference: the contract follows zuko's ``LazyDistribution`` and gala's ``PotentialBase`` (public
methods over private hooks); the change of variables is Papamakarios et al. 2021, JMLR 22, 57, eq.
2.
"""
from __future__ import annotations

import abc
import math
import warnings
from typing import Any, Sequence

import numpy as np
import tensorflow as tf

from .errors import InputError
from .validation import check_finite_rows


# ---- validation at the public boundary ---------------------------------------------------------

def as_float32(value: Any, name: str) -> tf.Tensor:
    """Tensor view of ``value`` in float32; tensors are cast (not copied to NumPy), so tapes still
    see them.
    """
    if isinstance(value, (tf.Tensor, tf.Variable)):
        if not (value.dtype.is_floating or value.dtype.is_integer):
            raise InputError(f"{name} has dtype {value.dtype.name}; expected a float array")
        return value if value.dtype == tf.float32 else tf.cast(value, tf.float32)
    try:
        array = np.asarray(value)
        if array.dtype.kind not in "fiub":         # strings, objects: the float64 parser
            array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} cannot be read as a float array: {exc}") from None
    # one conversion at most (none for float32 input); overflow becomes inf, which the finite
    # check names
    with np.errstate(over="ignore"):
        return tf.constant(array.astype(np.float32, copy=False))


def shape_of(value: Any) -> tuple:
    """The shape of an array or tensor as a tuple, for messages ('?' for an unknown rank)."""
    if isinstance(value, (tf.Tensor, tf.Variable)):
        return tuple(value.shape.as_list()) if value.shape.rank is not None else ("?",)
    return tuple(np.shape(value))


def check_finite(t: tf.Tensor, name: str) -> None:
    """NaN/inf check on concrete (eager) tensors; symbolic tensors are left to the graph."""
    if tf.executing_eagerly():
        check_finite_rows(t.numpy(), name, note=" (or values beyond float32 range)")


def validate_inputs(x: Any, labels: Any, dim: int, label_dim: int, what: str = "flow"
                    ) -> tuple[tf.Tensor, tf.Tensor | None]:
    """Check and convert ``x: [N, dim]`` and ``labels: [N, label_dim] | None`` to float32 tensors.

    Raises InputError for a wrong rank or width, labels missing for a conditional model or given to
    an unconditional one, mismatched row counts, and (for concrete inputs) NaN or inf.
    """
    x = as_float32(x, "x")
    if x.shape.rank != 2 or (x.shape[1] is not None and x.shape[1] != dim):
        raise InputError(f"x has shape {shape_of(x)}; the {what} expects [N, {dim}]")
    check_finite(x, "x")
    if label_dim == 0:
        if labels is not None:
            raise InputError(f"labels were given (shape {shape_of(labels)}) but the {what} is "
                             f"unconditional (label_dim = 0); pass labels=None")
        return x, None
    if labels is None:
        raise InputError(
            f"the {what} is conditional: labels of shape [N, {label_dim}] are required "
            f"(x has shape {shape_of(x)})"
        )
    c = as_float32(labels, "labels")
    if c.shape.rank != 2 or (c.shape[1] is not None and c.shape[1] != label_dim):
        raise InputError(f"labels have shape {shape_of(c)}; the {what} expects [N, {label_dim}]")
    n_x, n_c = x.shape[0], c.shape[0]
    if n_x is not None and n_c is not None and n_x != n_c:
        raise InputError(
            f"x has {n_x} rows but labels have {n_c}; expected x [N, {dim}] and labels "
            f"[N, {label_dim}] with the same N"
        )
    check_finite(c, "labels")
    return x, c


def stateless_seed(seed: Any) -> tf.Tensor:
    """Stateless seed [2] int64 from None (fresh entropy), an int >= 0 (-> [seed, 0]), or two
    integers.

    The ``tf.random.stateless_*`` convention: the same seed gives the same draws.
    """
    if seed is None:
        return tf.constant(np.random.SeedSequence().generate_state(2).astype(np.int64))
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, (bool, np.bool_)):
        if seed < 0:
            raise InputError(f"seed = {seed}: expected an integer >= 0")
        return tf.constant([int(seed), 0], tf.int64)
    if isinstance(seed, (tf.Tensor, tf.Variable)):
        if not seed.dtype.is_integer or seed.shape.as_list() != [2]:
            raise InputError(
                f"seed tensor has dtype {seed.dtype.name} and shape {shape_of(seed)}; "
                f"expected an integer tensor of shape [2]"
            )
        return tf.cast(seed, tf.int64)
    array = np.asarray(seed)
    if array.shape != (2,) or not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"seed {seed!r}: expected None, an int >= 0, or two integers (shape [2])")
    return tf.constant(array.astype(np.int64))


def _sample_request(n_or_labels: Any, label_dim: int, what: str) -> tuple[Any, tf.Tensor | None]:
    """(n, labels) from ``sample_stateless``'s first argument: an int n >= 1, or labels [n, C]."""
    if label_dim == 0:
        n = n_or_labels
        if isinstance(n, (tf.Tensor, tf.Variable)):
            if n.shape.rank not in (0, None) or not n.dtype.is_integer:
                raise InputError(
                    f"n must be a scalar integer, got a {n.dtype.name} tensor of shape "
                    f"{shape_of(n)}"
                )
            if tf.executing_eagerly() and int(n) < 1:
                raise InputError(f"n = {int(n)}: the number of samples must be >= 1")
            return tf.cast(n, tf.int32), None
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
            raise InputError(f"n = {n!r}: expected an integer number of samples (the {what} is "
                             f"unconditional, so no labels)")
        if n < 1:
            raise InputError(f"n = {n}: the number of samples must be >= 1")
        return tf.constant(int(n), tf.int32), None
    if isinstance(n_or_labels, (int, np.integer)) and not isinstance(n_or_labels, bool):
        raise InputError(f"the {what} is conditional: pass labels of shape [n, {label_dim}], "
                         f"not n = {n_or_labels}")
    c = as_float32(n_or_labels, "labels")
    if c.shape.rank != 2 or (c.shape[1] is not None and c.shape[1] != label_dim):
        raise InputError(f"labels have shape {shape_of(c)}; the {what} expects [n, {label_dim}]")
    if c.shape[0] == 0:
        raise InputError(f"labels have shape {shape_of(c)}: the number of samples must be >= 1")
    check_finite(c, "labels")
    return None, c


# ---- labels outside the training range ----------------------------------------------------------

class ExtrapolationWarning(UserWarning):
    """A model was evaluated or sampled at labels outside the range it was trained on."""


def extrapolated_labels(labels: Any, low: Any, high: Any) -> np.ndarray:
    """Mask [N] bool: rows of ``labels`` [N, C] with some column outside [low_j, high_j].

    A relative tolerance of 1e-6 of the range (float32 rounding of the recorded ends) counts a
    label on the edge of the training grid as inside.
    """
    c = np.asarray(labels, np.float64)
    c = c.reshape(1, -1) if c.ndim == 1 else c
    low, high = np.asarray(low, np.float64), np.asarray(high, np.float64)
    tol = 1e-6 * np.maximum(high - low, np.abs(high) + np.abs(low) + 1e-30)
    return np.any((c < low - tol) | (c > high + tol), axis=-1)


def bounds_arrays(bounds: Any, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(low [D], high [D]) float64 from per-column bounds: D entries, each (low, high) or None
    (unbounded; either end may also be None). InputError for a wrong count or low >= high.
    """
    if not isinstance(bounds, (list, tuple)) or len(bounds) != dim:
        raise InputError(
            f"bounds = {bounds!r}: expected {dim} entries, one (low, high) pair or None per "
            f"column of x"
        )
    low, high = np.full(dim, -np.inf), np.full(dim, np.inf)
    for j, b in enumerate(bounds):
        if b is None:
            continue
        if not isinstance(b, (list, tuple, np.ndarray)) or len(b) != 2:
            raise InputError(f"bounds[{j}] = {b!r}: expected a (low, high) pair or None")
        lo, hi = (
            (-np.inf if b[0] is None else float(b[0])),
            (np.inf if b[1] is None else float(b[1])),
        )
        if math.isnan(lo) or math.isnan(hi) or not lo < hi:
            raise InputError(f"bounds[{j}] = {b!r}: expected low < high")
        low[j], high[j] = lo, hi
    return low, high


#: Passes of bounded sampling before it gives up (see :meth:`Density.sample`).
MAX_PASSES = 50
#: Acceptance rate below which bounded sampling stops with InputError.
MIN_ACCEPTANCE = 1e-3
#: Draws of the first bounded pass at least (so that the measured rate means something).
FIRST_PASS_DRAWS = 4096
#: Draws per bounded pass at most (memory).
MAX_PASS_DRAWS = 2**21


# ---- XLA-compiled eager calls in row buckets ----------------------------------------------------

#: Rows per XLA-compiled call of the eager public methods at most (a bucket of
#: :func:`row_bucket`): longer inputs run in chunks of this many rows, so XLA compiles a bounded
#: set of shapes whatever the row count.
XLA_CHUNK_ROWS = 65536
#: The smallest row bucket (a power of two): smaller chunks are padded up to it.
XLA_MIN_ROWS = 256
#: Up to this many rows (a power of two) the buckets are powers of two; above it, quarter octaves.
XLA_OCTAVE_ROWS = 4096


def row_bucket(n: int) -> int:
    """Rows that a chunk of n rows is padded to for an XLA-compiled call (1 <= n <= chunk).

    XLA compiles one program per input shape, so row counts are rounded up to a small set:

        bucket(n) = max(XLA_MIN_ROWS, 2^ceil(log2 n))            for n <= XLA_OCTAVE_ROWS,
        bucket(n) = s ceil(n / s),  s = 2^(floor(log2(n - 1)) - 2)   above (quarter octaves),

    i.e. 256, 512, ..., 4096, then 5120, 6144, 7168, 8192, 10240, ... up to XLA_CHUNK_ROWS: 21
    programs per method at most, padding below 2x the rows for small chunks and below 1.25x above
    XLA_OCTAVE_ROWS (none for the bucket sizes themselves, so that, e.g., 20480 rows run as one
    call rather than 16384 + 4096: larger calls cost less per row, benchmarks/README.md).
    Padded rows repeat the chunk's last row (a valid input: no NaN or -inf enters even the dropped
    rows), and rows are independent, so slicing the padded output back gives the unpadded numbers.
    """
    n = int(n)
    if n < 1 or n > XLA_CHUNK_ROWS:
        raise InputError(f"row_bucket(n = {n}): expected 1 <= n <= {XLA_CHUNK_ROWS}")
    if n <= XLA_OCTAVE_ROWS:
        return max(XLA_MIN_ROWS, 1 << (n - 1).bit_length())
    step = 1 << ((n - 1).bit_length() - 3)
    return -(-n // step) * step


def _in_row_buckets(fn: Any, tensors: list[tf.Tensor]) -> tf.Tensor:
    """fn(*tensors) for row-wise fn on tensors [N, ...] with the same N, called in chunks of at
    most XLA_CHUNK_ROWS rows, each padded to :func:`row_bucket` rows (last row repeated) and its
    output sliced back: the rows of fn's output, concatenated. Padding and slicing are TF ops, so
    an outer GradientTape sees through them.
    """
    # variables as tensors (a tape still records the read), so the traces key on shapes only
    tensors = [tf.convert_to_tensor(t) for t in tensors]
    n = int(tensors[0].shape[0])
    pieces = []
    for start in range(0, n, XLA_CHUNK_ROWS):
        m = min(XLA_CHUNK_ROWS, n - start)
        bucket = row_bucket(m)
        args = tensors if m == n else [t[start:start + m] for t in tensors]
        if bucket > m:
            args = [tf.concat([a, tf.repeat(a[-1:], bucket - m, axis=0)], 0) for a in args]
        out = fn(*args)
        pieces.append(out if bucket == m else out[:m])
    return pieces[0] if len(pieces) == 1 else tf.concat(pieces, 0)


# ---- the contract ------------------------------------------------------------------------------

class Density(abc.ABC):
    """A probability density p(x | c) over x [N, D] given labels c [N, C] (C = ``label_dim`` >= 0).

    Subclasses implement :meth:`log_prob_tensor` (and :meth:`sample_tensor` if they can sample) and
    the ``dim``/``label_dim`` attributes; the validated, traced public methods come from this
    class. With ``jit_log_prob = True`` (set before the first call, or call :meth:`retrace`;
    Flow and Ensemble set it by default) eager calls of ``log_prob``, ``grad_log_prob`` and
    ``sample`` run XLA-compiled functions on row buckets (:func:`row_bucket`: chunks of at most
    ``XLA_CHUNK_ROWS`` rows padded to one of a few sizes, so no recompilation per row count); calls
    inside another ``tf.function`` (export signatures, the CBE graph) always use the plain graphs.
    Sampling under XLA draws the base noise outside XLA (:meth:`noise_tensor`), so a seed gives the
    same draws as the plain graph, up to float32 round-off.

    Example::

        class Gauss(Density):                      # N(0, I) in 2-D
            dim, label_dim = 2, 0
            def log_prob_tensor(self, x, labels=None):
                return -0.5 * tf.reduce_sum(x * x, -1) - tf.math.log(2 * np.pi)

        Gauss().log_prob([[0.0, 0.0]])             # [-1.8379]
    """

    #: what error messages call this density ("flow", "ensemble", ...)
    what: str = "density"
    #: Run eager log_prob / grad_log_prob / sample XLA-compiled in row buckets (set before the
    #: first call, or call :meth:`retrace` after changing it)
    jit_log_prob: bool = False

    # -- what a subclass provides ----------------------------------------------------------------
    dim: int
    label_dim: int

    @abc.abstractmethod
    def log_prob_tensor(self, x: tf.Tensor, labels: tf.Tensor | None = None) -> tf.Tensor:
        """log p(x | labels) [N] float32 as TF ops, for x [N, D] and labels [N, C] | None (no
        checks).
        """

    def sample_tensor(
        self, n: tf.Tensor | None, labels: tf.Tensor | None, seed: tf.Tensor
    ) -> tf.Tensor:
        """Stateless draws [n, D] float32 as TF ops: n (scalar int) draws, or one per row of labels
        [n, C].

        The default raises InputError: a density that cannot sample says so.
        """
        raise InputError(f"the {self.what} ({type(self).__name__}) cannot sample")

    def noise_tensor(self, n: tf.Tensor, seed: tf.Tensor) -> tf.Tensor | None:
        """The random part of :meth:`sample_tensor`, if it splits: base draws [n, ...] from a
        stateless seed [2] such that ``sample_tensor(n, labels, seed) ==
        transform_noise_tensor(noise_tensor(n, seed), labels)``; None (the default) if it does not
        split (then sampling never runs under XLA). Row i of the draws depends on row i of the
        noise only.
        """
        return None

    def transform_noise_tensor(self, noise: tf.Tensor, labels: tf.Tensor | None) -> tf.Tensor:
        """Draws [n, D] from base draws ``noise`` [n, ...] (:meth:`noise_tensor`), as TF ops."""
        raise InputError(f"the {self.what} ({type(self).__name__}) does not split its sampler")

    @property
    def can_sample(self) -> bool:
        """Whether :meth:`sample_tensor` is implemented."""
        return type(self).sample_tensor is not Density.sample_tensor

    @property
    def inlinable(self) -> bool:
        """Whether :meth:`log_prob_tensor` is plain TF ops that XLA may compile inline (False for a
        loaded SavedModel's functions, or a wrapper around one).
        """
        return True

    @property
    def evaluations_per_row(self) -> int:
        """Model evaluations behind one row of ``log_prob`` (K for a K-member ensemble, M x that
        for an average over M rotations): batched callers such as the CBE shrink their chunks by
        it.
        """
        return 1

    #: The members whose mean density this is (an ensemble), else None.
    members: list["Density"] | None = None

    def label_range(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(min [C], max [C]) of the labels the model was trained on, or None if unknown (then
        nothing counts as extrapolated). Flows record it when they are adapted.
        """
        return None

    def extrapolated(self, labels: Any) -> np.ndarray:
        """Mask [N] bool: rows of ``labels`` [N, C] (or one label [C]) outside the training range
        :meth:`label_range` in some column. All False when the range is unknown.

        Such labels are evaluated as asked (finite results, never NaN), and ``log_prob``/``sample``
        warn (:class:`ExtrapolationWarning`); this mask says which rows to distrust.
        """
        c = np.asarray(labels.numpy() if isinstance(labels, (tf.Tensor, tf.Variable)) else labels,
                       np.float64)
        c = c.reshape(1, -1) if c.ndim == 1 else c
        if c.ndim != 2 or c.shape[1] != self.label_dim:
            raise InputError(
                f"labels have shape {c.shape}; the {self.what} expects [N, {self.label_dim}]"
            )
        span = self.label_range() if self.label_dim else None
        if span is None:
            return np.zeros(c.shape[0], bool)
        return extrapolated_labels(c, *span)

    def _warn_extrapolated(self, c: tf.Tensor | None) -> None:
        """ExtrapolationWarning naming the first label outside the training range (eager inputs
        only).
        """
        if c is None or not tf.executing_eagerly() or self.label_range() is None:
            return
        mask = self.extrapolated(c)
        if mask.any():
            low, high = self.label_range()
            row = int(np.argmax(mask))
            values = ", ".join(f"{v:.6g}" for v in c.numpy()[row])
            warnings.warn(
                f"{int(mask.sum())} of {mask.size} label row(s) lie outside the training label "
                f"range {_bounds_text(low, high)} (first: row {row}, label [{values}]): the "
                f"{self.what} extrapolates there",
                ExtrapolationWarning,
                stacklevel=3,
            )

    def scale_hint(self) -> tf.Tensor | tf.Variable | None:
        """Typical magnitude of each column of x, [D] float32 (read when traced), or None if
        unknown.

        Flows return their rescaler's scales; the exact DFs their natural units. The CBE centres
        its velocity sampler on it, so it may be off by a large factor.
        """
        return None

    # -- the public, validated methods ------------------------------------------------------------
    def check_inputs(self, x: Any, labels: Any = None) -> tuple[tf.Tensor, tf.Tensor | None]:
        """Validate and convert (x [N, D], labels [N, C] | None) as every public method does."""
        return validate_inputs(x, labels, self.dim, self.label_dim, self.what)

    def log_prob(self, x: Any, labels: Any = None) -> tf.Tensor:
        """log p(x | labels): [N] float32 per unit volume of x; x [N, D] in the model's units."""
        x, c = self.check_inputs(x, labels)
        self._warn_extrapolated(c)
        inputs = [x] if c is None else [x, c]
        if self._xla_call(x.shape[0]):
            return _in_row_buckets(self._traced()["log_prob_xla"], inputs)
        return self._traced()["log_prob"](*inputs)

    def prob(self, x: Any, labels: Any = None) -> tf.Tensor:
        """p(x | labels) = exp(log_prob): [N] float32."""
        return tf.exp(self.log_prob(x, labels))

    def grad_log_prob(self, x: Any, labels: Any = None) -> tf.Tensor:
        """∂ log p(x | labels) / ∂x: [N, D] float32 in 1/(unit of each column) (GradientTape).

        Zero for rows outside the support (log p = -inf).
        """
        x, c = self.check_inputs(x, labels)
        inputs = [x] if c is None else [x, c]
        if self._xla_call(x.shape[0]):
            return _in_row_buckets(self._traced()["grad_xla"], inputs)
        return self._traced()["grad"](*inputs)

    def sample(
        self,
        n: int,
        labels: Any = None,
        seed: Any = None,
        bounds: Sequence[Any] | None = None,
        max_passes: int = MAX_PASSES,
        min_acceptance: float = MIN_ACCEPTANCE,
    ) -> tf.Tensor:
        """n draws x ~ p(x | labels): [n, D] float32 in the model's units.

        With ``bounds`` the draws follow p truncated to the box B = Π_j [low_j, high_j] (rejection:
        a row keeps the first of its candidate draws that falls inside B). Each pass p draws fresh
        candidates with the seed ``fold_in(seed, p)`` (never the same draws twice), sized by the
        acceptance rate measured so far; sampling stops with InputError after ``max_passes`` passes
        or as soon as the measured acceptance rate is below ``min_acceptance``.

        Args:
            n: number of samples (>= 1).
            labels: [n, C] (one draw per row) or [C] (all n draws at that label); None if
                unconditional.
            seed: None (fresh entropy), an int, or a stateless seed [2]; the same seed gives the
                same draws.
            bounds: None, or D entries (one per column of x), each a (low, high) pair or None
                (unbounded column); ``None`` as either end leaves that side open.
            max_passes: rejection passes at most (bounds only).
            min_acceptance: smallest acceptable fraction of draws inside the bounds (bounds only).

        Labels outside the training range (:meth:`extrapolated`) are sampled as asked, with an
        :class:`ExtrapolationWarning`.
        """
        if self.label_dim == 0:
            if labels is not None:
                raise InputError(
                    f"labels were given (shape {shape_of(labels)}) but the {self.what} is "
                    f"unconditional (label_dim = 0)"
                )
            if bounds is not None:
                return self._sample_within(n, None, stateless_seed(seed), bounds, max_passes,
                                           min_acceptance)
            return self.sample_stateless(n, stateless_seed(seed))
        if labels is None:
            raise InputError(
                f"the {self.what} is conditional: sample(n, labels) needs labels of shape "
                f"[n, {self.label_dim}] or [{self.label_dim}]"
            )
        c = as_float32(labels, "labels")
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 1:
            raise InputError(f"n = {n!r}: expected an integer number of samples >= 1")
        if c.shape.rank == 1 and c.shape[0] == self.label_dim:
            c = tf.tile(c[tf.newaxis, :], [int(n), 1])
        if c.shape.rank == 2 and c.shape[0] != n:
            raise InputError(
                f"sample: n = {n} but labels have shape {shape_of(c)}; expected [{n}, "
                f"{self.label_dim}] or [{self.label_dim}]"
            )
        if bounds is not None:
            _sample_request(c, self.label_dim, self.what)        # shape and NaN checks
            self._warn_extrapolated(c)
            return self._sample_within(int(n), c, stateless_seed(seed), bounds, max_passes,
                                       min_acceptance)
        return self.sample_stateless(c, stateless_seed(seed))

    def _sample_within(self, n: int, c: tf.Tensor | None, seed: tf.Tensor, bounds: Sequence[Any],
                       max_passes: int, min_acceptance: float) -> tf.Tensor:
        """Rejection sampling of :meth:`sample` with ``bounds`` (eager): [n, D] float32."""
        from .validation import integer, positive_number
        n = integer(n, "n")
        max_passes = integer(max_passes, "max_passes", low=1)
        min_acceptance = positive_number(min_acceptance, "min_acceptance")
        low, high = bounds_arrays(bounds, self.dim)
        labels = None if c is None else c.numpy()
        out = np.empty((n, self.dim), np.float32)
        todo = np.arange(n)                       # rows still without an accepted draw
        drawn = accepted = 0
        copies = max(1, math.ceil(FIRST_PASS_DRAWS / n))
        for p in range(max_passes):
            copies = max(1, min(copies, MAX_PASS_DRAWS // todo.size))
            pass_seed = tf.random.experimental.stateless_fold_in(seed, p)
            rows = np.repeat(todo, copies)        # `copies` candidates per row, grouped by row
            with warnings.catch_warnings():       # sample() warned once already
                warnings.simplefilter("ignore", ExtrapolationWarning)
                x = self.sample_stateless(int(rows.size) if labels is None else labels[rows],
                                          pass_seed).numpy()
            inside = np.all((x >= low) & (x <= high), axis=1)
            drawn, accepted = drawn + rows.size, accepted + int(inside.sum())
            inside = inside.reshape(todo.size, copies)
            hit = inside.any(axis=1)
            first = np.argmax(inside, axis=1)
            out[todo[hit]] = x.reshape(todo.size, copies, self.dim)[hit, first[hit]]
            todo = todo[~hit]
            if todo.size == 0:
                return tf.constant(out)
            rate = accepted / drawn
            if rate < min_acceptance:
                raise InputError(
                    f"sample: only {accepted} of {drawn} draws ({rate:.2g}) fall inside bounds "
                    f"{_bounds_text(low, high)}, below min_acceptance = {min_acceptance:g}; "
                    f"widen the bounds or check that they overlap the model's support"
                )
            copies = math.ceil(1.5 / rate)
        raise InputError(
            f"sample: {todo.size} of {n} rows still have no draw inside bounds "
            f"{_bounds_text(low, high)} after max_passes = {max_passes} passes (acceptance "
            f"rate {accepted / drawn:.2g} of {drawn} draws); raise max_passes or widen the "
            f"bounds"
        )

    def sample_stateless(self, n_or_labels: Any, seed: Any) -> tf.Tensor:
        """Deterministic draws for a tensor seed: [n, D] float32 in the model's units.

        ``n_or_labels`` is n (scalar int) for unconditional models and labels [n, C] for
        conditional ones; ``seed`` is an integer tensor of shape [2] (``tf.random.stateless_*``
        convention). Usable inside ``tf.function`` / export signatures (symbolic inputs skip the
        eager checks).
        """
        if not self.can_sample:
            self.sample_tensor(None, None, None)          # raises the density's own message
        n, c = _sample_request(n_or_labels, self.label_dim, self.what)
        self._warn_extrapolated(c)
        seed = stateless_seed(seed)
        fns = self._traced()
        if "sample_xla" in fns and self._xla_call(None):
            rows = int(n) if c is None else int(c.shape[0])
            # the same noise as the plain graph draws (one eager op), the transform under XLA
            noise = self.noise_tensor(tf.constant(rows, tf.int32), seed)
            if noise is not None:     # None: a wrapper whose base does not split its sampler
                return _in_row_buckets(fns["sample_xla"], [noise] if c is None else [noise, c])
        return fns["sample"](c, seed) if self.label_dim else fns["sample"](n, seed)

    # -- tracing ----------------------------------------------------------------------------------
    def gradient_tensor(self, x: tf.Tensor, labels: tf.Tensor | None = None) -> tf.Tensor:
        """∂ log p/∂x [N, D] as TF ops (one GradientTape pass; rows are independent)."""
        with tf.GradientTape() as tape:
            tape.watch(x)
            lp = self.log_prob_tensor(x, labels)
        # d(Σ_n log p_n)/dx_n = d log p_n/dx_n; a density constant in x has gradient 0.
        return tape.gradient(lp, x, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    def tracing_counts(self) -> dict[str, int]:
        """How often the function behind each eager public method was traced, {"log_prob",
        "grad", "sample"}.

        A plain graph (free batch dimension) is traced once for any row counts; an XLA-compiled
        one once per row bucket it met (:func:`row_bucket`), each trace being one XLA compilation:
        row counts inside a bucket already met add nothing.
        """
        fns = self._traced()
        return {name: fns.get(name + "_xla", fns[name]).experimental_get_tracing_count()
                for name in ("log_prob", "grad", "sample")}

    @property
    def uses_xla(self) -> bool:
        """Whether eager log_prob / grad_log_prob calls run XLA-compiled (``jit_log_prob`` and
        :attr:`inlinable`).
        """
        return bool(self.jit_log_prob) and self.inlinable

    def _xla_call(self, rows: Any) -> bool:
        """Whether a call on ``rows`` rows runs the XLA functions: eager (concrete inputs), at
        least one row, and :attr:`uses_xla`.
        """
        return self.uses_xla and tf.executing_eagerly() and rows != 0

    def retrace(self) -> None:
        """Forget the traced functions (after changing ``jit_log_prob``); they are rebuilt on next
        use.
        """
        self.__dict__.pop("_density_functions", None)

    def _traced(self) -> dict:
        """The three ``tf.function``s behind the public methods, built on first use."""
        fns = self.__dict__.get("_density_functions")
        if fns is None:
            fns = self._trace()
            # Stored outside Keras/tf.Module attribute tracking (functions are not state to save).
            self.__dict__["_density_functions"] = fns
        return fns

    def _trace(self) -> dict:
        x_spec = tf.TensorSpec([None, self.dim], tf.float32, name="x")
        c_spec = tf.TensorSpec([None, self.label_dim], tf.float32, name="labels")
        n_spec = tf.TensorSpec([], tf.int32, name="n")
        seed_spec = tf.TensorSpec([2], tf.int64, name="seed")
        # autograph=False: the maths has no Python control flow on tensors (loops are explicit
        # tf.while_loops), so conversion would only slow tracing down.
        if self.label_dim:
            fns = {
                "log_prob": tf.function(lambda x, labels: self.log_prob_tensor(x, labels),
                                        input_signature=[x_spec, c_spec], autograph=False),
                "grad": tf.function(lambda x, labels: self.gradient_tensor(x, labels),
                                    input_signature=[x_spec, c_spec], autograph=False),
                "sample": tf.function(lambda labels, seed: self.sample_tensor(None, labels, seed),
                                      input_signature=[c_spec, seed_spec], autograph=False)}
        else:
            fns = {
                "log_prob": tf.function(lambda x: self.log_prob_tensor(x, None),
                                        input_signature=[x_spec], autograph=False),
                "grad": tf.function(lambda x: self.gradient_tensor(x, None),
                                    input_signature=[x_spec], autograph=False),
                "sample": tf.function(lambda n, seed: self.sample_tensor(n, None, seed),
                                      input_signature=[n_spec, seed_spec], autograph=False)}
        if not self.uses_xla:
            return fns
        # Called only with row-bucketed shapes (no input_signature: one trace, i.e. one XLA
        # compilation, per bucket; reduce_retracing=False keeps the shapes static).
        xla = dict(jit_compile=True, autograph=False, reduce_retracing=False)
        fns["log_prob_xla"] = tf.function(
            lambda x, labels=None: self.log_prob_tensor(x, labels), **xla)
        fns["grad_xla"] = tf.function(
            lambda x, labels=None: self.gradient_tensor(x, labels), **xla)
        if self.can_sample and type(self).noise_tensor is not Density.noise_tensor:
            fns["sample_xla"] = tf.function(
                lambda noise, labels=None: self.transform_noise_tensor(noise, labels), **xla)
        return fns


class DerivedDensity(Density, tf.Module):
    """A density defined from another one, ``base`` (a symmetry average, a DF of reduced
    coordinates): labels, training label range, sampling ability, inlining and the XLA default are
    the base's, and an ensemble base gives members that are the same construction over each
    member.

    A subclass calls ``super().__init__(base, name)``, sets :attr:`base_evaluations` (base
    evaluations per row of its own ``log_prob``) and implements :meth:`with_base`.
    """

    #: base evaluations per row of this density's log_prob (a subclass may compute it)
    base_evaluations: int = 1

    def __init__(self, base: Density, name: str):
        tf.Module.__init__(self, name=name)
        self.base = base
        self._members: list | None = None
        # eager calls XLA-compiled in row buckets when the base's are (Flow, Ensemble: default)
        self.jit_log_prob = bool(base.inlinable and base.jit_log_prob)

    def with_base(self, base: Density) -> "DerivedDensity":
        """The same construction over another base density (e.g. one ensemble member)."""
        raise NotImplementedError

    @property
    def label_dim(self) -> int:
        """The base density's label width."""
        return self.base.label_dim

    @property
    def inlinable(self) -> bool:
        """As the base density (XLA may compile this density only if it may compile the base:
        not around a loaded SavedModel).
        """
        return self.base.inlinable

    @property
    def evaluations_per_row(self) -> int:
        """Base evaluations per row: :attr:`base_evaluations` times the base's own (K for a
        K-member ensemble).
        """
        return self.base_evaluations * self.base.evaluations_per_row

    @property
    def members(self) -> list["DerivedDensity"] | None:
        """The base ensemble's members, each under the same construction (None for a single
        density).
        """
        if not self.base.members:
            return None
        if self._members is None:
            self._members = [self.with_base(m) for m in self.base.members]
        return self._members

    @property
    def can_sample(self) -> bool:
        """Whether the base density samples (then so does this one)."""
        return self.base.can_sample

    def label_range(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The base density's training label range."""
        return self.base.label_range()


def _bounds_text(low: np.ndarray, high: np.ndarray) -> str:
    """Per-column (low, high) pairs as text, e.g. [(0, 1), (-inf, 2.5)]."""
    return "[" + ", ".join(f"({lo:.6g}, {hi:.6g})" for lo, hi in zip(low, high)) + "]"


__all__ = [
    "Density",
    "DerivedDensity",
    "ExtrapolationWarning",
    "extrapolated_labels",
    "bounds_arrays",
    "row_bucket",
    "XLA_CHUNK_ROWS",
    "XLA_MIN_ROWS",
    "validate_inputs",
    "as_float32",
    "check_finite",
    "shape_of",
    "stateless_seed",
]
