"""Training data and the per-member tf.data pipelines: in memory or streamed from HDF5/Parquet.

Two kinds of data, one interface (``n``, ``dim``, ``label_dim``, ``streamed``, ``description``,
``pipelines(config, seed, steps_per_call)``):

* :class:`ArrayData`: x [N, D] (and labels [N, C]) float32 in memory; validation = a seeded random
  subset (:func:`split_indices`); epoch e visits the rows in a stateless permutation keyed by
  (seed, e).
* :class:`HDF5Data`: an HDF5 catalogue streamed in batches through
  :class:`tfgalflow.catalogue.HDF5Catalogue`; validation = the last rows of the file; the rescaler
  is fitted on an evenly strided subsample of at most ``adapt_samples`` rows.
* :class:`ParquetData`: a Parquet event table streamed through
  :class:`tfgalflow.catalogue.ParquetCatalogue` (row groups shuffled across label values);
  validation = rows spread evenly over the file (grids are sorted by label); rescaler as HDF5.

Both streamed kinds share :class:`StreamedPipelines`: per-epoch seeded shuffles, and in a
multi-worker run one contiguous range of training rows per worker (``shard_for_workers``).

With ``steps_per_call`` K > 1 each epoch's batches are grouped into stacks [K, B, D] (K optimizer
steps in one compiled call; stacks never cross an epoch, see :class:`Pipelines`). TensorFlow is
imported only inside the functions that build datasets.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Sequence

import numpy as np

from .. import validation
from ..errors import FileError, InputError
from .config import TrainConfig

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf

HDF5_SUFFIXES = (".h5", ".hdf5")
#: Rows shuffled together when streaming HDF5 (HDF5Catalogue.batches' shuffle_buffer): 2^18 rows of
#: (x, labels) float32 are a few MB, and chunk order is permuted as well.
STREAM_SHUFFLE_ROWS = 2**18

_log = logging.getLogger(__name__)


def split_indices(n: int, validation_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random train/validation split of rows 0..n-1: (train [n - m], validation [m]), each
    sorted.

    m = round(n · validation_split), at least 1 when validation_split > 0. The permutation is
    ``np.random.default_rng(seed).permutation(n)``; its first m entries are the validation rows.
    """
    if validation_split <= 0:
        return np.arange(n), np.arange(0)
    m = max(1, int(round(n * validation_split)))
    if m >= n:
        raise InputError(f"validation_split = {validation_split} leaves no training rows out of "
                         f"N = {n}; need N >= 2 and a split < 1")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[m:]), np.sort(perm[:m])


# ---- pipelines ----------------------------------------------------------------------------------

class Pipelines:
    """What ``fit`` needs for one member: adapt input, per-epoch training batches, validation
    batches.

    With ``steps_per_call`` K = 1 the training dataset yields batches x [B, D] (labels [B, C]);
    with K > 1 it yields stacks x [k, B, D] (labels [k, B, C]) of k <= K consecutive full batches
    of one epoch (k < K only for an epoch's last stack), and an epoch's partial last batch of
    r < B rows as a stack [1, r, D] of its own. Stacks never cross an epoch, so checkpoints stay
    at epoch ends; at most three stack shapes occur (three XLA compilations of the train step).
    """

    n_train: int
    n_val: int
    batch_size: int
    steps_per_call: int = 1

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch, ceil(n_train / B): the unit of the learning-rate schedule."""
        return math.ceil(self.n_train / self.batch_size)

    @property
    def calls_per_epoch(self) -> int:
        """Elements of the training dataset per epoch (Keras' ``steps_per_epoch``):
        ceil(full / K) + [r > 0] for full = n_train // B full batches and r = n_train mod B;
        equals steps_per_epoch when K = 1.
        """
        full, rest = divmod(self.n_train, self.batch_size)
        return math.ceil(full / self.steps_per_call) + (rest > 0)

    def steps_after_calls(self, calls: int) -> int:
        """Optimizer steps done after the first ``calls`` elements of an epoch:
        min(calls · K, full) over the full stacks, plus the partial batch [1, r] once its call ran
        (calls > ceil(full / K)); steps_after_calls(calls_per_epoch) = steps_per_epoch.
        """
        full, rest = divmod(self.n_train, self.batch_size)
        partial = rest > 0 and calls > math.ceil(full / self.steps_per_call)
        return min(calls * self.steps_per_call, full) + int(partial)


def _stacked_indices(order: "tf.Tensor", n: int, batch: int, k: int) -> "tf.data.Dataset":
    """Row indices of one epoch as stacks [k', B] of k' <= k full batches, then the partial batch
    as [1, r].
    """
    import tensorflow as tf
    full, rest = divmod(n, batch)
    whole = tf.reshape(order[:full * batch], [full, batch])
    stacks = tf.data.Dataset.from_tensor_slices(whole).batch(k)
    if rest:
        last = tf.reshape(order[full * batch:], [1, rest])
        stacks = stacks.concatenate(tf.data.Dataset.from_tensors(last))
    return stacks


def stacked_batches(batches: Iterator[Any], batch_size: int, k: int) -> Iterator[Any]:
    """Group one epoch's batches into stacks of k' <= k consecutive full batches.

    Args:
        batches: arrays [B, ...] or tuples of them (x, labels), as ``HDF5Catalogue.batches``
            yields them.
        batch_size: B; a batch of another size (an epoch's partial last one) becomes a stack of
            one on its own, after the full stack before it.
        k: most batches per stack (``steps_per_call``).

    Yields:
        arrays [k', B, ...] (or tuples of them), the batches in their original order.
    """
    pending: list = []

    def stack(group):
        if isinstance(group[0], tuple):
            return tuple(np.stack(parts) for parts in zip(*group))
        return np.stack(group)

    for b in batches:
        if len(b[0] if isinstance(b, tuple) else b) != batch_size:
            if pending:
                yield stack(pending)
                pending = []
            yield stack([b])
            continue
        pending.append(b)
        if len(pending) == k:
            yield stack(pending)
            pending = []
    if pending:
        yield stack(pending)


class ArrayPipelines(Pipelines):
    """Pipelines over in-memory arrays: x_train [n_train, D] (labels [n_train, C] | None) and the
    validation rows, shuffled per epoch from ``seed`` (see :meth:`train_dataset`).
    """

    def __init__(self, x_train: np.ndarray, l_train: np.ndarray | None, x_val: np.ndarray,
                 l_val: np.ndarray | None, batch_size: int, seed: int, steps_per_call: int = 1,
                 dim: int | None = None, adapt_rows: np.ndarray | None = None):
        self.x_train, self.l_train, self.x_val, self.l_val = x_train, l_train, x_val, l_val
        self.n_train, self.n_val = len(x_train), len(x_val)
        self.batch_size, self.seed = batch_size, seed
        self.steps_per_call = steps_per_call
        self.dim = x_train.shape[1] if dim is None else dim   # < width: errors packed after x
        # rows in the flow's coordinates when x_train holds catalogue rows and errors
        self.adapt_rows = adapt_rows

    def adapt_input(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The rows the rescaler is fitted on: every training row (x [:, :D], labels | None), in
        the flow's coordinates.
        """
        if self.adapt_rows is not None:
            return self.adapt_rows, self.l_train
        return self.x_train[:, :self.dim], self.l_train

    def train_dataset(self, initial_epoch: int, epochs: int) -> "tf.data.Dataset":
        """Batches (or stacks of batches, see Pipelines) of epochs initial_epoch..epochs-1; epoch e
        visits the rows in the order argsort(u), u ~ U(0,1)^n drawn statelessly from the seed
        (seed, e), so any epoch can be regenerated alone.
        """
        import tensorflow as tf
        x = tf.constant(self.x_train)
        labels = None if self.l_train is None else tf.constant(self.l_train)
        n, seed, batch, k = self.n_train, self.seed, self.batch_size, self.steps_per_call

        def gather(idx):
            if labels is None:
                return tf.gather(x, idx)
            return tf.gather(x, idx), tf.gather(labels, idx)

        def epoch_batches(epoch):
            key = tf.stack([tf.constant(seed, tf.int64), epoch])
            order = tf.argsort(tf.random.stateless_uniform([n], seed=key))
            if k == 1:
                return tf.data.Dataset.from_tensor_slices(order).batch(batch).map(gather)
            return _stacked_indices(order, n, batch, k).map(gather)

        # flat_map leaves the cardinality unknown, so Keras keeps one iterator across epochs
        # instead of restarting it (which would repeat epoch `initial_epoch`'s order every epoch).
        return (tf.data.Dataset.range(initial_epoch, epochs).flat_map(epoch_batches)
                .prefetch(tf.data.AUTOTUNE))

    def val_dataset(self) -> "tf.data.Dataset | None":
        """The validation rows in batches (None without a validation split)."""
        import tensorflow as tf
        if self.n_val == 0:
            return None
        rows = self.x_val if self.l_val is None else (self.x_val, self.l_val)
        return tf.data.Dataset.from_tensor_slices(rows).batch(self.batch_size)


class StreamedPipelines(Pipelines):
    """Pipelines over a file streamed in batches, never loaded whole: the shared mechanics of
    :class:`HDF5Pipelines` and :class:`ParquetPipelines`.

    The file's ``train_rows`` training rows are numbered t = 0..train_rows-1; a subclass says how
    to stream a range t in [a, b) of them shuffled per epoch (:meth:`_stream`), how to read the
    rescaler's subsample (:meth:`adapt_input`) and the validation rows (:meth:`_validation`).
    Everything else -- epochs, stacks, package errors out of tf.data, one shard per worker of a
    multi-worker run (:meth:`shard_for_workers`) -- is here, once.
    """

    def _init_stream(self, data: Any, config: TrainConfig, seed: int, steps_per_call: int,
                     n_val: int) -> None:
        self.data, self.seed, self.batch_size = data, seed, config.batch_size
        self.steps_per_call = steps_per_call
        self.n_val = n_val
        self.n_train = data.n - n_val
        self.train_rows = self.n_train      # training rows t = 0..train_rows-1
        self.workers = 1                    # > 1: each worker streams its own range (shard)
        self.adapt_samples = config.adapt_samples
        self.stream_error: Exception | None = None   # an InputError/FileError raised in tf.data

    def _stream(self, batch: int, epoch: int, start: int, stop: int) -> Iterator[Any]:
        """Epoch ``epoch`` of the training rows t in [start, stop), shuffled with the seed
        (seed, epoch), in batches [batch, D] (or (x, labels)).
        """
        raise NotImplementedError

    def _validation(self) -> Iterator[Any]:
        """The validation rows in batches [B, D] (or (x, labels)), in file order."""
        raise NotImplementedError

    def _signature(self, stacked: bool = False) -> Any:
        """Element spec of batches [B, D] (labels [B, C]), or of stacks [K, B, D] (labels
        [K, B, C]).
        """
        import tensorflow as tf
        lead = [None, None] if stacked else [None]
        x = tf.TensorSpec(lead + [self.data.dim], tf.float32)
        if not self.data.use_labels:
            return x
        return x, tf.TensorSpec(lead + [self.data.file_label_dim], tf.float32)

    def _guarded(self, generator):
        """Keep the first package error raised while streaming, so ``fit`` can re-raise it
        unwrapped.
        """
        from ..errors import TfgalflowError
        try:
            yield from generator
        except TfgalflowError as exc:
            self.stream_error = self.stream_error or exc
            raise

    def train_dataset(self, initial_epoch: int, epochs: int) -> "tf.data.Dataset":
        """Epochs initial_epoch..epochs-1 of the training rows; epoch e is shuffled with the seed
        (seed, e), so a resumed run regenerates exactly the same batches (stacked per epoch when
        steps_per_call > 1, see Pipelines).
        """
        import tensorflow as tf
        if self.workers > 1:
            return self._worker_datasets(initial_epoch, epochs)
        k = self.steps_per_call

        def generator():
            for epoch in range(initial_epoch, epochs):
                batches = self._stream(self.batch_size, epoch, 0, self.n_train)
                if k > 1:
                    batches = stacked_batches(batches, self.batch_size, k)
                yield from self._guarded(batches)

        spec = self._signature(k > 1)
        return tf.data.Dataset.from_generator(generator, output_signature=spec).prefetch(2)

    def shard_for_workers(self, workers: int) -> None:
        """Stream the training rows in ``workers`` shards, one per multi-worker worker.

        Worker i reads only training rows [i·r, (i+1)·r), r = floor(train_rows / W) (the last
        train_rows mod W < W rows sit out), shuffled per epoch with the seed (seed, e) in
        per-replica batches of B / W (B divisible by W); every worker then runs the same
        ceil(r / (B/W)) steps per epoch. ``n_train`` becomes W·r.
        """
        if self.batch_size % workers:
            raise InputError(f"TrainConfig.batch_size = {self.batch_size} is the global batch of "
                             f"{workers} workers: make it a multiple of {workers}")
        self.workers = workers
        self.n_train = workers * (self.train_rows // workers)

    def _worker_datasets(self, initial_epoch: int, epochs: int) -> Any:
        """A Keras ``DatasetCreator``: each worker's input pipeline streams its own shard."""
        import tensorflow as tf
        import tf_keras as keras
        rows = self.n_train // self.workers

        def dataset_fn(context):
            i = context.input_pipeline_id
            batch = context.get_per_replica_batch_size(self.batch_size)

            def generator():
                for epoch in range(initial_epoch, epochs):
                    yield from self._guarded(self._stream(batch, epoch, i * rows, (i + 1) * rows))

            return tf.data.Dataset.from_generator(
                generator, output_signature=self._signature()).prefetch(2)

        return keras.utils.experimental.DatasetCreator(dataset_fn)

    def val_dataset(self) -> "tf.data.Dataset | None":
        """The validation rows in batches, in file order (None without a validation split)."""
        import tensorflow as tf
        if self.n_val == 0:
            return None
        return tf.data.Dataset.from_generator(lambda: self._guarded(self._validation()),
                                              output_signature=self._signature()).prefetch(2)


class HDF5Pipelines(StreamedPipelines):
    """Per-member pipelines over an HDF5 file, through
    :class:`tfgalflow.catalogue.HDF5Catalogue`: rows [0, n_train) train (training row t is file
    row t), the last round(n · validation_split) rows validate.
    """

    def __init__(self, data: "HDF5Data", config: TrainConfig, seed: int, steps_per_call: int = 1):
        from ..catalogue import open_hdf5
        n_val = (0 if config.validation_split <= 0
                 else max(1, int(round(data.n * config.validation_split))))
        self._init_stream(data, config, seed, steps_per_call, n_val)
        self.catalogue = open_hdf5(data.path, units=data.description["units"])

    def adapt_input(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Every s-th training row, s = ceil(n_train / adapt_samples): at most adapt_samples rows,
        spread evenly over the training range (one strided HDF5 read).
        """
        step = math.ceil(self.train_rows / self.adapt_samples)
        cat = self.catalogue.read(0, self.train_rows, step)
        return cat.phase_space, (cat.labels if self.data.use_labels else None)

    def _stream(self, batch: int, epoch: int, start: int, stop: int) -> Iterator[Any]:
        return self.catalogue.batches(batch, shuffle_buffer=STREAM_SHUFFLE_ROWS, seed=self.seed,
                                      with_labels=self.data.use_labels, epoch=epoch, start=start,
                                      stop=stop)

    def _validation(self) -> Iterator[Any]:
        """Rows [train_rows, n) in file order, read in blocks of whole batches."""
        block = self.batch_size * max(1, 65536 // self.batch_size)
        for a in range(self.train_rows, self.data.n, block):
            cat = self.catalogue.read(a, min(a + block, self.data.n))
            x = cat.phase_space.astype(np.float32)
            lab = cat.labels.astype(np.float32) if self.data.use_labels else None
            for i in range(0, len(x), self.batch_size):
                j = i + self.batch_size
                yield x[i:j] if lab is None else (x[i:j], lab[i:j])


class ParquetPipelines(StreamedPipelines):
    """Per-member pipelines over a Parquet event table, through
    :class:`tfgalflow.catalogue.ParquetCatalogue`.

    Grids are stored sorted by label, so the validation rows are spread evenly over the file
    instead of being its last rows (which would be the last grid nodes, never trained on): with
    m = round(n · validation_split) of n rows, file row r validates iff
    floor((r + 1) m / n) > floor(r m / n) (exactly m rows, one every n/m, each node keeping its
    share). Training row t is the t-th other row, so a worker's range of training rows is one
    range of file rows (:meth:`file_row`) and it reads only its own row groups. A validation pass
    reads every row group (keeping 1 row in n/m).
    """

    def __init__(self, data: "ParquetData", config: TrainConfig, seed: int,
                 steps_per_call: int = 1):
        n_val = (0 if config.validation_split <= 0
                 else max(1, int(round(data.n * config.validation_split))))
        self._init_stream(data, config, seed, steps_per_call, n_val)
        self.catalogue = data.catalogue

    def is_validation(self, a: int, b: int) -> np.ndarray:
        """bool [b - a]: which file rows a:b validate, floor((r+1) m / n) > floor(r m / n)."""
        r = np.arange(a, b, dtype=np.int64)
        n, m = self.data.n, self.n_val
        return (r + 1) * m // n > r * m // n

    def file_row(self, t: int) -> int:
        """The file row of training row t (t = train_rows: n): the smallest R with
        R - floor(R m / n) = t training rows before it (bisection, monotone in R).
        """
        n, m = self.data.n, self.n_val
        low, high = t, n
        while low < high:
            mid = (low + high) // 2
            if mid - mid * m // n >= t:
                high = mid
            else:
                low = mid + 1
        return low

    def _is_training(self, a: int, b: int) -> np.ndarray:
        return ~self.is_validation(a, b)

    def adapt_input(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The training rows among every s-th file row, s = ceil(n / adapt_samples): at most
        adapt_samples rows spread evenly over the file (one pass over its row groups).
        """
        step = math.ceil(self.data.n / self.adapt_samples)
        table = self.catalogue.read(0, self.data.n, step)
        rows = np.arange(0, self.data.n, step)
        train = ~((rows + 1) * self.n_val // self.data.n > rows * self.n_val // self.data.n)
        return table.events[train], (table.labels[train] if self.data.use_labels else None)

    def _stream(self, batch: int, epoch: int, start: int, stop: int) -> Iterator[Any]:
        for x, c in self.catalogue.batches(batch, STREAM_SHUFFLE_ROWS, self.seed, epoch,
                                           start=self.file_row(start), stop=self.file_row(stop),
                                           keep=self._is_training if self.n_val else None):
            yield (x, c) if self.data.use_labels else x

    def _validation(self) -> Iterator[Any]:
        for x, c in self.catalogue.batches(self.batch_size, 0, keep=self.is_validation):
            yield (x, c) if self.data.use_labels else x


# ---- data ---------------------------------------------------------------------------------------

class ArrayData:
    """Training data held in memory: x [N, D] float32, labels [N, C] float32 | None, split per
    member seed.
    """

    streamed = False

    def __init__(self, x: np.ndarray, labels: np.ndarray | None, description: dict,
                 errors: np.ndarray | None = None, error_kind: str | None = None,
                 observed: np.ndarray | None = None, meta: dict | None = None):
        self.x, self.labels, self.description = x, labels, description
        self.meta = {} if meta is None else meta     # the catalogue's provenance (cuts, noise)
        self.errors, self.error_kind = errors, error_kind   # a Catalogue's errors, if any
        # the catalogue rows x was reduced from (in_coordinates), where the errors act
        self.observed = x if observed is None else observed

    @property
    def n(self) -> int:
        """N, the number of rows."""
        return self.x.shape[0]

    @property
    def dim(self) -> int:
        """D, the width of x."""
        return self.x.shape[1]

    @property
    def label_dim(self) -> int:
        """C, the width of the labels (0 without labels)."""
        return 0 if self.labels is None else self.labels.shape[1]

    def fingerprint(self, with_errors: bool = False) -> str:
        """sha256 of the float32 bytes of x (and labels, and with ``with_errors`` the float64
        errors a deconvolving run uses): identifies the data a run was trained on.
        """
        h = hashlib.sha256(np.ascontiguousarray(self.x).tobytes())
        if self.labels is not None:
            h.update(np.ascontiguousarray(self.labels).tobytes())
        if with_errors and self.errors is not None:
            h.update(np.ascontiguousarray(self.errors).tobytes())
        return h.hexdigest()

    def pipelines(self, config: TrainConfig, seed: int, steps_per_call: int = 1) -> ArrayPipelines:
        """The member's pipelines: :func:`split_indices` with its seed, batches of
        ``config.batch_size``.
        """
        train_idx, val_idx = split_indices(self.n, config.validation_split, seed)

        def pick(a, idx):
            return None if a is None else a[idx]

        x, adapt_rows = self.x, None
        if config.deconvolve:     # rows (x, errors): Flow.train_step splits them (deconvolution)
            from ..deconvolution import pack
            x = pack(self.observed, self.errors, self.error_kind)  # catalogue columns + errors
            adapt_rows = self.x[train_idx]                          # what the flow learns
        return ArrayPipelines(x[train_idx], pick(self.labels, train_idx), x[val_idx],
                              pick(self.labels, val_idx), config.batch_size, seed, steps_per_call,
                              dim=self.dim, adapt_rows=adapt_rows)


@dataclass(frozen=True)
class HDF5Data:
    """Training data streamed from an HDF5 catalogue (never loaded whole).

    Rows [0, n_train) train, rows [n_train, n) validate (n - n_train =
    round(n · validation_split)), so a file sorted by some property gives an unrepresentative
    validation set: shuffle such files first.
    """

    path: Path
    n: int
    file_label_dim: int
    description: dict
    want_labels: bool = True   # False: train unconditionally on a labelled file (label_dim = 0)
    streamed: ClassVar[bool] = True
    dim: ClassVar[int] = 6

    @property
    def use_labels(self) -> bool:
        """Whether the file's labels are used (wanted by the config and present)."""
        return self.want_labels and self.file_label_dim > 0

    @property
    def label_dim(self) -> int:
        """C, the width of the labels used (0 when unused)."""
        return self.file_label_dim if self.use_labels else 0

    def pipelines(self, config: TrainConfig, seed: int, steps_per_call: int = 1) -> HDF5Pipelines:
        """The streamed training and validation pipelines of one member (seed)."""
        return HDF5Pipelines(self, config, seed, steps_per_call)


@dataclass(frozen=True)
class ParquetData:
    """Training data streamed from a Parquet event table (never loaded whole): events [N, D] from
    the catalogue's event columns, labels [N, C] from its label columns.

    The validation rows are spread evenly over the file (:class:`ParquetPipelines`), so a
    label-sorted grid validates on every node.
    """

    catalogue: Any                 # a tfgalflow.catalogue.ParquetCatalogue
    description: dict
    want_labels: bool = True   # False: train unconditionally on a labelled file (label_dim = 0)
    streamed: ClassVar[bool] = True

    @property
    def path(self) -> Path:
        """The Parquet file."""
        return self.catalogue.path

    @property
    def n(self) -> int:
        """N, the number of rows."""
        return self.catalogue.n

    @property
    def dim(self) -> int:
        """D, the number of event columns."""
        return self.catalogue.dim

    @property
    def file_label_dim(self) -> int:
        """The number of label columns read from the file."""
        return self.catalogue.label_dim

    @property
    def use_labels(self) -> bool:
        """Whether the file's labels are used (wanted by the config and present)."""
        return self.want_labels and self.file_label_dim > 0

    @property
    def label_dim(self) -> int:
        """C, the width of the labels used (0 when unused)."""
        return self.file_label_dim if self.use_labels else 0

    def pipelines(self, config: TrainConfig, seed: int,
                  steps_per_call: int = 1) -> ParquetPipelines:
        """The streamed training and validation pipelines of one member (seed)."""
        return ParquetPipelines(self, config, seed, steps_per_call)


def _parquet_data(catalogue: Any) -> ParquetData:
    path = Path(catalogue.path).resolve()
    description = {"source": "parquet", "path": str(path),
                   "event_columns": list(catalogue.event_columns),
                   "label_names": list(catalogue.label_columns), "bytes": path.stat().st_size}
    return ParquetData(catalogue, description)


def reopen(description: dict) -> Any:
    """The file a run streamed, from its config.json ``data`` section: the path of an HDF5
    catalogue, or the Parquet table reopened with its recorded event and label columns.
    """
    if description.get("source") == "parquet":
        from ..catalogue import open_parquet
        return open_parquet(description["path"], description["event_columns"],
                            description["label_names"])
    return description["path"]


def _hdf5_data(catalogue: Any) -> HDF5Data:
    path = Path(catalogue.path).resolve()
    description = {"source": "hdf5", "path": str(path), "label_names": list(catalogue.label_names),
                   "units": dict(catalogue.units), "bytes": path.stat().st_size}
    return HDF5Data(path, len(catalogue), catalogue.label_dim, description)


def as_training_data(data: Any, labels: Any = None,
                     label_names: Sequence[str] | None = None
                     ) -> ArrayData | HDF5Data | ParquetData:
    """Validate ``data`` and wrap it as :class:`ArrayData` or :class:`HDF5Data`.

    Args:
        data: a Catalogue, an HDF5Catalogue, a ParquetCatalogue (``open_parquet``; streamed),
            an array x [N, D], or a path: a catalogue .npz (loaded) or an .h5/.hdf5 file
            (streamed).
        labels: [N, C] (or [N]) labels for an array ``data``; None otherwise.
        label_names: names of the C label columns of an array ``data`` (default label_0, ...).

    Raises:
        InputError for non-finite values, wrong shapes or labels given twice; FileError for a
        missing or unreadable file.
    """
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.exists():
            raise FileError(f"{path}: no such data file (expected a catalogue .npz or .h5/.hdf5)")
        if labels is not None:
            raise InputError(f"labels were given together with the file {path}; a catalogue file "
                             f"carries its own labels")
        from ..catalogue import PARQUET_SUFFIXES, Catalogue, open_hdf5
        if path.suffix.lower() in HDF5_SUFFIXES:
            return _hdf5_data(open_hdf5(path))
        if path.suffix.lower() in PARQUET_SUFFIXES:
            raise InputError(f"{path}: a Parquet table needs its columns named: pass "
                             f"tfgalflow.catalogue.open_parquet(path, event_columns, "
                             f"label_columns) (streamed) or read_parquet(...) arrays")
        return _from_catalogue(Catalogue.load(path),
                               {"source": "file", "path": str(path.resolve())})
    from ..catalogue import Catalogue, HDF5Catalogue, ParquetCatalogue
    if isinstance(data, ParquetCatalogue):
        if labels is not None:
            raise InputError(f"labels were given together with the Parquet table {data.path}; "
                             f"name its label columns in open_parquet instead")
        return _parquet_data(data)
    if isinstance(data, HDF5Catalogue):
        if labels is not None:
            raise InputError(f"labels were given together with the HDF5 catalogue {data.path}; it "
                             f"carries its own")
        return _hdf5_data(data)
    if isinstance(data, Catalogue):
        if labels is not None:
            raise InputError("labels were given together with a Catalogue; put them in the "
                             "Catalogue (Catalogue.labels) instead")
        return _from_catalogue(data, {"source": "catalogue", "path": None})
    x = _float32_matrix(data, "data", "[N, D]")
    lab = None
    if labels is not None:
        lab = _float32_matrix(labels, "labels", f"[{x.shape[0]}, C]", one_d_ok=True)
        if lab.shape[0] != x.shape[0]:
            raise InputError(f"labels have {lab.shape[0]} rows but data has {x.shape[0]}; "
                             f"expected labels [{x.shape[0]}, C]")
    names = _label_names(label_names, 0 if lab is None else lab.shape[1])
    return ArrayData(x, lab, {"source": "array", "path": None, "label_names": names})


def _float32_matrix(value: Any, name: str, expected: str, one_d_ok: bool = False) -> np.ndarray:
    """``validation.finite_matrix`` in float32; a 1-D ``value`` [N] is read as [N, 1] if
    ``one_d_ok``.
    """
    if one_d_ok:
        try:
            if np.ndim(value) == 1:
                value = np.reshape(value, (-1, 1))
        except ValueError:       # ragged input: finite_matrix names it
            pass
    return validation.finite_matrix(value, name, expected=expected, dtype=np.float32)


def _label_names(names: Sequence[str] | None, width: int) -> list[str]:
    if names is None:
        return [f"label_{i}" for i in range(width)]
    names = [str(n) for n in names]
    if len(names) != width:
        raise InputError(f"label_names has {len(names)} entries {names} but the labels have "
                         f"{width} column(s)")
    return names


def _from_catalogue(cat: Any, description: dict) -> ArrayData:
    x = _float32_matrix(cat.phase_space, "catalogue phase space (pos, vel)", "[N, 6]")
    lab = None
    if cat.labels is not None:
        lab = _float32_matrix(cat.labels, "catalogue labels", f"[{x.shape[0]}, C]", one_d_ok=True)
    names = _label_names(cat.label_names, 0 if lab is None else lab.shape[1])
    return ArrayData(x, lab, dict(description, label_names=names, units=dict(cat.units)),
                     errors=cat.errors, error_kind=cat.error_kind, meta=dict(cat.meta))


def select_labels(data: ArrayData | HDF5Data | ParquetData, config: TrainConfig) -> TrainConfig:
    """Resolve ``config.label_dim`` against the data (None -> the data's label width C).

    Raises InputError if labels were passed with ``label_dim = 0``, are missing for a conditional
    config, or have another width than ``config.label_dim``.
    """
    width = data.label_dim
    if config.label_dim is None:
        return config.with_overrides(label_dim=width)
    if config.label_dim == 0:
        if width and data.description["source"] == "array":
            raise InputError(f"labels of width {width} were given but TrainConfig.label_dim = 0 "
                             f"(unconditional); drop the labels or set label_dim = {width}")
        return config
    if width == 0:
        raise InputError(f"TrainConfig.label_dim = {config.label_dim} (a conditional flow) but "
                         f"the data has no labels; pass labels [N, {config.label_dim}]")
    if width != config.label_dim:
        raise InputError(f"labels have {width} column(s) but TrainConfig.label_dim = "
                         f"{config.label_dim}; expected labels [N, {config.label_dim}]")
    return config


def check_deconvolution(data: ArrayData | HDF5Data | ParquetData, config: TrainConfig) -> None:
    """InputError unless a ``deconvolve`` run has in-memory data with per-star errors."""
    if not config.deconvolve:
        return
    if data.streamed:
        raise InputError("TrainConfig.deconvolve = True needs the catalogue in memory: load the "
                         "HDF5 file with Catalogue.load(path) and train on the Catalogue")
    if data.errors is None:
        raise InputError("TrainConfig.deconvolve = True but the data carry no measurement errors; "
                         "train on a Catalogue(..., errors=..., error_kind=...) (e.g. from "
                         "mocks.add_noise) or set deconvolve = False")
    after_noise = [c["r_max"] for c in data.meta.get("cuts", [])
                   if c.get("after_noise") and c.get("r_max") is not None]
    if after_noise and config.selection_r_max is None:
        _log.warning("the catalogue was cut at r < %g after its noise was added (meta['cuts']); "
                     "without TrainConfig.selection_r_max = %g (--selection-r-max %g) the "
                     "deconvolved DF comes out low near the cut", min(after_noise),
                     min(after_noise), min(after_noise))
    if config.selection_r_max is not None:
        outside = _count_outside(data.observed, config.selection_r_max)
        if outside:
            raise InputError(f"TrainConfig.selection_r_max = {config.selection_r_max} but "
                             f"{outside} of {data.n} stars lie at or beyond it: the selection "
                             "must be the cut the catalogue was made with (e.g. mocks.cut)")


def check_support(data: ArrayData | HDF5Data | ParquetData, config: TrainConfig) -> None:
    """InputError if in-memory phase-space rows lie at or beyond ``config.support_r_max`` (a
    streamed file is checked as it is read, by ``Flow.adapt``).
    """
    if config.support_r_max is None or data.streamed:
        return
    outside = _count_outside(data.x, config.support_r_max)
    if outside:
        raise InputError(f"TrainConfig.support_r_max = {config.support_r_max} but {outside} of "
                         f"{data.n} stars lie at or beyond it: it must bound the true radii (for "
                         "a cut of noisy radii use selection_r_max with deconvolve)")


def _count_outside(rows: np.ndarray, r_max: float) -> int:
    """How many rows [N, D] have |position| >= r_max (the first min(3, D) columns, as
    ``deconvolution.NoiseModel.selected`` reads them).
    """
    positions = rows[:, :min(3, rows.shape[1])]
    return int(np.sum(np.sum(np.square(positions, dtype=np.float64), axis=1) >= r_max ** 2))


def check_sizes(data: ArrayData | HDF5Data | ParquetData, config: TrainConfig) -> None:
    """InputError unless N >= 2 and the validation split leaves >= 2 training rows."""
    if data.n < 2:
        raise InputError(f"data has {data.n} row(s); training needs x [N, {data.dim}] with N >= 2")
    if config.validation_split > 0:
        m = max(1, int(round(data.n * config.validation_split)))
        if data.n - m < 2:
            raise InputError(f"validation_split = {config.validation_split} of N = {data.n} rows "
                             f"leaves {data.n - m} training row(s); need >= 2")


def describe(data: ArrayData | HDF5Data | ParquetData, config: TrainConfig) -> dict:
    """The ``data`` section of config.json: source, path, label names, units, n, dim, label_dim
    and (in memory) the sha256 of the float32 values that :func:`tfgalflow.training.resume`
    checks.
    """
    d = dict(data.description, n=data.n, dim=data.dim, label_dim=config.label_dim)
    if not data.streamed:
        d["sha256"] = data.fingerprint(with_errors=config.deconvolve)
        if config.deconvolve:
            d["error_kind"] = data.error_kind
    if config.label_dim == 0:
        d["label_names"] = []
    return d


#: Rows read at a time when an HDF5 catalogue is reduced to the flow's coordinates in memory.
SPHERICAL_READ_ROWS = 1_000_000


def in_coordinates(data: ArrayData | HDF5Data, config: TrainConfig) -> ArrayData | HDF5Data:
    """The data the flow learns: unchanged for ``coordinates = 'cartesian'``; otherwise each
    star's reduced coordinates (:func:`tfgalflow.coordinates.reduce`: (r, v_r, v_t), or (R, z,
    v_R, v_φ, v_z, further columns)), labels kept, held in memory (an HDF5 file is read in chunks
    of ``SPHERICAL_READ_ROWS`` rows).

    Raises InputError for data that cannot be reduced (wrong width, a point at the centre/axis).
    """
    from ..coordinates import check_dim, column_names, reduce
    coordinates = config.coordinates
    if coordinates == "cartesian":
        return data
    check_dim(coordinates, data.dim)
    description = dict(data.description, columns=column_names(
        coordinates, data.description.get("columns"), data.dim))
    if not data.streamed:     # errors (deconvolution) stay with the catalogue rows they act on
        return ArrayData(reduce(coordinates, data.x).astype(np.float32), data.labels,
                         description, errors=data.errors, error_kind=data.error_kind,
                         observed=data.x, meta=data.meta)
    if not isinstance(data, HDF5Data):
        raise InputError(f"TrainConfig.coordinates = {coordinates!r} reads catalogues in "
                         f"memory or HDF5; load this table into memory to train on it")
    # An HDF5 phase-space catalogue (6 columns): read in chunks, keep the reduced columns and
    # the labels.
    from ..catalogue import open_hdf5
    catalogue = open_hdf5(data.path)
    chunks, labels = [], []
    for start in range(0, data.n, SPHERICAL_READ_ROWS):
        part = catalogue.read(start, min(start + SPHERICAL_READ_ROWS, data.n))
        chunks.append(reduce(coordinates, part.phase_space).astype(np.float32))
        if data.use_labels:
            labels.append(np.asarray(part.labels, np.float32).reshape(len(part), -1))
    return ArrayData(np.concatenate(chunks), np.concatenate(labels) if labels else None,
                     description)


def without_labels(data: Any) -> Any:
    """The same data with its labels dropped (TrainConfig.label_dim = 0 on a labelled
    catalogue).
    """
    if data.streamed:
        return dataclasses.replace(data, want_labels=False)
    return ArrayData(data.x, None, dict(data.description, label_names=[]), data.errors,
                     data.error_kind, meta=data.meta)
