"""Arguments of the exact spherical models (Hernquist, Dehnen): radii and phase-space points.

One copy of the checks both models make at their boundary, in NumPy (float64) and TensorFlow (any
float dtype, usable inside ``tf.function``), and |x| with a gradient that is finite at x = 0.
TensorFlow is imported only by the TF functions, so the NumPy physics stays light.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InputError
from .validation import finite_matrix


def radii(r: Any) -> np.ndarray:
    """r as float64 (any shape); InputError if some radius is negative or NaN."""
    r = np.asarray(r, dtype=np.float64)
    if np.any(np.isnan(r)) or np.any(r < 0):
        raise InputError("radius r must be non-negative and not NaN")
    return r


def phase_space(x: Any, v: Any) -> tuple[np.ndarray, np.ndarray]:
    """(x, v) as finite float64 [N, 3] arrays with the same N, or InputError naming the problem."""
    x, v = finite_matrix(x, "x", 3), finite_matrix(v, "v", 3)
    if x.shape[0] != v.shape[0]:
        raise InputError(
            f"x and v must both have shape [N, 3] with the same N, got {list(x.shape)} "
            f"and {list(v.shape)}"
        )
    return x, v


def tf_vectors(x: Any, name: str) -> Any:
    """``x`` as a float tensor [N, 3] (integers cast to float32); InputError for another shape."""
    import tensorflow as tf

    x = tf.convert_to_tensor(x)
    if not x.dtype.is_floating:
        x = tf.cast(x, tf.float32)
    if x.shape.rank != 2 or (x.shape[1] is not None and x.shape[1] != 3):
        raise InputError(f"{name} must have shape [N, 3], got {x.shape}")
    return x


def tf_phase_space(x: Any, v: Any) -> tuple[Any, Any]:
    """(x, v) as tensors [N, 3] in x's float dtype, with the same N where it is known."""
    import tensorflow as tf

    x = tf_vectors(x, "x")
    v = tf.cast(tf_vectors(v, "v"), x.dtype)
    if x.shape[0] is not None and v.shape[0] is not None and x.shape[0] != v.shape[0]:
        raise InputError(f"x and v must both have shape [N, 3] with the same N, got {x.shape} and "
                         f"{v.shape}")
    return x, v


def tf_safe_norm(x: Any) -> Any:
    """|x| [N] along the last axis of x [N, 3], with a zero (not NaN) gradient at x = 0."""
    import tensorflow as tf

    r2 = tf.reduce_sum(x * x, axis=1)
    positive = r2 > 0
    return tf.where(positive, tf.sqrt(tf.where(positive, r2, tf.ones_like(r2))), tf.zeros_like(r2))
