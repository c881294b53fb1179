"""Training runs: fit a Flow (or a seed ensemble of flows) with Keras, checkpoint, resume and reload.

A run minimises the negative log-likelihood per point (maximum likelihood; Papamakarios et al. 2021,
"Normalizing Flows for Probabilistic Modeling and Inference", sec. 3.1)

    L(θ) = -(1/N) Σ_n log p_θ(x_n | c_n)          [nats per point; x in physical units]

with Adam (Kingma & Ba 2015) under a learning-rate schedule η(t), t = optimizer step, T = epochs × steps:

    constant      η(t) = η0
    cosine        η(t) = η0 (1 + cos(π t / T)) / 2          (Loshchilov & Hutter 2017, no restarts)
    exponential   η(t) = η0 · 0.01^(t / T)                  (η falls 100× over the run)

Reproducibility: a member's whole run is a function of (data, TrainConfig, member seed). The seed fixes
the weight initialisation (``FlowConfig.seed``), the train/validation split and the order of every epoch
(a stateless permutation keyed by (seed, epoch)), so an interrupted run resumed from a checkpoint
repeats exactly the epochs the uninterrupted run would have done.

Data: a Catalogue or an array [N, D] in memory (validation = a seeded random subset), or an HDF5
catalogue streamed in batches through :class:`tfgalflow.catalogue.HDF5Catalogue` (validation = the
last rows of the file, rescaler fitted on an evenly strided subsample of at most ``adapt_samples`` rows).
With ``steps_per_call`` K > 1 each epoch's batches reach ``Flow.train_step`` as stacks [K, B, D] (K
optimizer steps in one compiled call, the same updates as K calls; stacks never cross an epoch), so
Keras counts calls per epoch while t above and the checkpoints count optimizer steps and epochs.

Run directory (``RUN_FORMAT_VERSION``)::

    RUN/config.json                     resolved TrainConfig, FlowConfig, data description, member seeds, versions
    RUN/member_000/history.csv          one row per finished epoch: epoch (0-based), loss, val_loss
    RUN/member_000/checkpoints/ckpt-E.*       full state after E epochs (E = k, 2k, ...): model, optimizer,
                                              epoch counter, early-stopping state
    RUN/member_000/checkpoints/best/ckpt-E.*  the same after the epoch E with the lowest monitored loss
    RUN/member_000/final/               weights.* (best-validation weights) + summary.json, written
                                        atomically once the member finished
    RUN/member_000/tensorboard/         optional TensorBoard logs

TensorFlow is imported only when a function needs it, so ``TrainConfig`` (and the CLI parser built from
its fields) load fast.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import hashlib
import io
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

import numpy as np

from . import __version__
from .atomic import atomic_dir, write_json, write_text
from .errors import FileError, InputError

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf
    from .catalogue import Catalogue
    from .model import Ensemble, Flow

RUN_FORMAT = "tfgalflow-run"
#: Version of the run-directory layout; ``load_run``/``resume`` refuse any other.
RUN_FORMAT_VERSION = 1
LR_SCHEDULES = ("constant", "cosine", "exponential")
#: η(T)/η0 of the exponential schedule.
EXPONENTIAL_FINAL_FRACTION = 0.01
HDF5_SUFFIXES = (".h5", ".hdf5")
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.csv"
WEIGHTS_PREFIX = "weights"


# ---- configuration ---------------------------------------------------------------------------

def _option(default: Any, help: str, kind: str) -> Any:
    """A TrainConfig field; ``kind`` (int, int?, float, str, bool, ints) drives parsing from text/JSON/YAML."""
    return field(default=default, metadata={"help": help, "kind": kind})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run except the data; JSON/YAML-serialisable, validated.

    The flow fields (layers ... log_columns) become a :class:`tfgalflow.flows.FlowConfig` together with the
    data's dim and label_dim. Member k of an ensemble is trained with seed ``seed + k`` and nothing else
    changed. Every field is also a ``tfgalflow train`` flag (``--batch-size`` for ``batch_size``).

    Example::

        cfg = TrainConfig(layers=4, hidden=(32, 32), epochs=50).with_overrides(lr=3e-3)
        TrainConfig.from_file("RUN/config.json")      # JSON or YAML; a run's config.json works too
    """

    layers: int = _option(8, "autoregressive layers L of the flow", "int")
    hidden: tuple = _option((64, 64), "hidden widths of each MADE network, e.g. 64,64", "ints")
    activation: str = _option("relu", "hidden activation of the MADE networks", "str")
    kind: str = _option("affine", "'affine' (MAF) or 'spline' (rational-quadratic spline MAF)", "str")
    bins: int = _option(8, "spline bins K (kind='spline')", "int")
    log_columns: tuple = _option((), "0-based data columns modelled as log(x) (strictly positive), e.g. 0,3",
                                 "ints")
    label_dim: int | None = _option(None, "label columns C to condition on: none = as many as the data has, "
                                          "0 = ignore labels", "int?")
    epochs: int = _option(100, "maximum number of epochs", "int")
    batch_size: int = _option(512, "points per optimizer step", "int")
    lr: float = _option(1e-3, "initial (peak) learning rate of Adam", "float")
    lr_schedule: str = _option("cosine", "learning-rate schedule: constant, cosine or exponential", "str")
    validation_split: float = _option(0.1, "fraction of the points held out for validation (0 = none)", "float")
    patience: int = _option(10, "stop after this many epochs without a lower monitored loss (0 = never stop); "
                                "the final weights are always those of the best epoch", "int")
    checkpoint_every: int = _option(10, "save a resumable checkpoint every k epochs (0 = only the best)", "int")
    seed: int = _option(0, "seed of member 0 (member k uses seed + k)", "int")
    members: int = _option(1, "ensemble size K", "int")
    parallel: bool = _option(False, "train ensemble members in parallel processes", "bool")
    tensorboard: bool = _option(False, "write TensorBoard logs to RUN/member_XXX/tensorboard", "bool")
    # Defaults are the fast path. Measured on 2 shared CPU cores (8-layer 2x64 MAF, batch 2048, 6D Hernquist
    # mock, training's own pipeline, medians of 20 epochs): samples/s 1.27x with XLA and 2.05x with XLA and
    # K = 16 (K = 8..32 alike) relative to no XLA, one step per call; XLA compiles 2-3 train shapes once.
    jit_compile: bool = _option(True, "XLA-compile the training step (one-time compilation of a few "
                                      "seconds per member; faster steps)", "bool")
    steps_per_call: int = _option(16, "optimizer steps K per compiled train call: each epoch's batches are "
                                      "stacked K at a time [K, B, D] and run in one loop (same updates as K "
                                      "calls, less per-call overhead)", "int")
    adapt_samples: int = _option(100_000, "rows used to fit the rescaler when streaming an HDF5 file", "int")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, f.metadata["kind"], getattr(self, f.name)))

        def check(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise InputError(f"TrainConfig.{name} = {getattr(self, name)!r}: expected {expected}")

        for name, low in (("layers", 1), ("bins", 2), ("epochs", 1), ("batch_size", 1), ("patience", 0),
                          ("checkpoint_every", 0), ("seed", 0), ("members", 1), ("adapt_samples", 2),
                          ("steps_per_call", 1)):
            check(getattr(self, name) >= low, name, f"an integer >= {low}")
        check(len(self.hidden) > 0 and all(h >= 1 for h in self.hidden), "hidden",
              "a non-empty list of positive widths, e.g. 64,64")
        check(all(j >= 0 for j in self.log_columns) and len(set(self.log_columns)) == len(self.log_columns),
              "log_columns", "distinct column indices >= 0")
        check(self.label_dim is None or self.label_dim >= 0, "label_dim", "None or an integer >= 0")
        check(self.kind in ("affine", "spline"), "kind", "'affine' or 'spline'")
        check(math.isfinite(self.lr) and self.lr > 0, "lr", "a finite number > 0")
        check(self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"one of {LR_SCHEDULES}")
        check(0.0 <= self.validation_split < 1.0, "validation_split", "a fraction in [0, 1)")
        check(self.seed + self.members - 1 < 2**31, "seed", f"seed + members - 1 < 2**31 ({self.members} members)")

    # -- serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-able dict (tuples as lists); ``TrainConfig.from_dict(c.to_dict()) == c``."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        """Build from a mapping of field names; unknown keys -> InputError naming them."""
        if not isinstance(d, Mapping):
            raise InputError(f"TrainConfig: expected a mapping of field names, got {type(d).__name__}")
        _reject_unknown(d, "TrainConfig")
        return cls(**dict(d))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "TrainConfig":
        """Read a JSON (.json) or YAML (.yaml/.yml) file of fields, or a run's ``config.json``.

        Raises FileError if the file is missing or unparsable, InputError for unknown keys or bad values.
        """
        path = Path(path)
        d = _read_mapping(path)
        if d.get("format") == RUN_FORMAT:       # a run's config.json: take its resolved training section
            if not isinstance(d.get("train"), Mapping):
                raise FileError(f"{path}: run config has no 'train' section")
            d = d["train"]
        try:
            return cls.from_dict(d)
        except InputError as exc:
            raise InputError(f"{path}: {exc}") from None

    def with_overrides(self, **overrides: Any) -> "TrainConfig":
        """A copy with some fields replaced (values may be text, as from the command line)."""
        _reject_unknown(overrides, "TrainConfig.with_overrides")
        return dataclasses.replace(self, **overrides)

    def flow_config(self, dim: int, label_dim: int, seed: int | None = None) -> "Any":
        """The :class:`~tfgalflow.flows.FlowConfig` of this run for data of width ``dim`` and ``label_dim``."""
        from .flows import FlowConfig
        return FlowConfig(dim=dim, label_dim=label_dim, layers=self.layers, hidden=self.hidden,
                          activation=self.activation, kind=self.kind, bins=self.bins,
                          log_columns=self.log_columns, seed=self.seed if seed is None else seed)

    @classmethod
    def field_help(cls) -> dict[str, tuple[str, str]]:
        """{field: (kind, help)} for building command-line flags."""
        return {f.name: (f.metadata["kind"], f.metadata["help"]) for f in dataclasses.fields(cls)}


def _reject_unknown(d: Mapping[str, Any], where: str) -> None:
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise InputError(f"{where}: unknown key(s) {unknown}; allowed: {names}")


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _coerce(name: str, kind: str, value: Any) -> Any:
    """Parse ``value`` (Python, JSON, YAML or command-line text) as a field of kind ``kind``."""
    def fail(expected: str) -> InputError:
        return InputError(f"TrainConfig.{name} = {value!r}: expected {expected}")

    def as_int(v: Any) -> int:
        if isinstance(v, (bool, np.bool_)):
            raise fail("an integer")
        if isinstance(v, (int, np.integer)):
            return int(v)
        if isinstance(v, (float, np.floating)) and float(v).is_integer():
            return int(v)
        if isinstance(v, str):
            try:
                return int(v.strip())
            except ValueError:
                pass
        raise fail("an integer")

    if kind == "int":
        return as_int(value)
    if kind == "int?":
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
            return None
        return as_int(value)
    if kind == "float":
        if isinstance(value, (bool, np.bool_)):
            raise fail("a number")
        try:
            return float(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            raise fail("a number") from None
    if kind == "str":
        if not isinstance(value, str):
            raise fail("a string")
        return value
    if kind == "bool":
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise fail("true or false")
    if kind == "ints":
        if isinstance(value, str):
            value = [v for v in value.replace(" ", "").split(",") if v]
        elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise fail("a list of integers, e.g. 64,64")
        return tuple(as_int(v) for v in value)
    raise AssertionError(f"unknown field kind {kind!r}")


def _read_mapping(path: Path) -> dict:
    """A JSON or YAML mapping from ``path`` (by suffix; JSON, then YAML, for other suffixes)."""
    if not path.is_file():
        raise FileError(f"{path}: no such config file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise FileError(f"{path}: cannot read config file: {exc}") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            d = json.loads(text)
        else:
            import yaml
            d = yaml.safe_load(text)
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError: both mean a corrupt file
        raise FileError(f"{path}: not valid {'JSON' if suffix == '.json' else 'YAML/JSON'}: {exc}") from None
    if not isinstance(d, dict):
        raise FileError(f"{path}: expected a mapping of settings at the top level, got {type(d).__name__}")
    return d


# ---- data --------------------------------------------------------------------------------------

def split_indices(n: int, validation_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random train/validation split of rows 0..n-1: (train [n - m], validation [m]), each sorted.

    m = round(n · validation_split), at least 1 when validation_split > 0. The permutation is
    ``np.random.default_rng(seed).permutation(n)``; its first m entries are the validation rows.
    """
    if validation_split <= 0:
        return np.arange(n), np.arange(0)
    m = max(1, int(round(n * validation_split)))
    if m >= n:
        raise InputError(f"validation_split = {validation_split} leaves no training rows out of N = {n}; "
                         f"need N >= 2 and a split < 1")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[m:]), np.sort(perm[:m])


def _check_finite_rows(a: np.ndarray, name: str) -> None:
    finite = np.isfinite(a)
    if not finite.all():
        rows = np.unique(np.nonzero(~finite)[0])
        raise InputError(f"{name} contains NaN or inf in {rows.size} row(s), first rows {rows[:5].tolist()}; "
                         f"remove or fix them before training")


class _ArrayData:
    """Training data held in memory: x [N, D] float32, labels [N, C] float32 | None, split per member seed."""

    streamed = False

    def __init__(self, x: np.ndarray, labels: np.ndarray | None, description: dict):
        self.x, self.labels, self.description = x, labels, description

    @property
    def n(self) -> int:
        return self.x.shape[0]

    @property
    def dim(self) -> int:
        return self.x.shape[1]

    @property
    def label_dim(self) -> int:
        return 0 if self.labels is None else self.labels.shape[1]

    def fingerprint(self) -> str:
        """sha256 of the float32 bytes of x (and labels): identifies the data a run was trained on."""
        h = hashlib.sha256(np.ascontiguousarray(self.x).tobytes())
        if self.labels is not None:
            h.update(np.ascontiguousarray(self.labels).tobytes())
        return h.hexdigest()

    def pipelines(self, config: TrainConfig, seed: int, steps_per_call: int = 1) -> "_Pipelines":
        train_idx, val_idx = split_indices(self.n, config.validation_split, seed)
        pick = (lambda a, idx: None if a is None else a[idx])
        return _ArrayPipelines(self.x[train_idx], pick(self.labels, train_idx),
                               self.x[val_idx], pick(self.labels, val_idx), config.batch_size, seed,
                               steps_per_call)


class _Pipelines:
    """What ``fit`` needs for one member: adapt input, per-epoch training batches, validation batches.

    With ``steps_per_call`` K = 1 the training dataset yields batches x [B, D] (labels [B, C]); with K > 1
    it yields stacks x [k, B, D] (labels [k, B, C]) of k <= K consecutive full batches of one epoch
    (k < K only for an epoch's last stack), and an epoch's partial last batch of r < B rows as a stack
    [1, r, D] of its own. Stacks never cross an epoch, so checkpoints stay at epoch ends; at most three
    stack shapes occur (three XLA compilations of the train step).
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
        """Elements of the training dataset per epoch (Keras' ``steps_per_epoch``): ceil(full / K) + [r > 0]
        for full = n_train // B full batches and r = n_train mod B; equals steps_per_epoch when K = 1.
        """
        full, rest = divmod(self.n_train, self.batch_size)
        return math.ceil(full / self.steps_per_call) + (rest > 0)


def _stacked_indices(order: "tf.Tensor", n: int, batch: int, k: int) -> "tf.data.Dataset":
    """Row indices of one epoch as stacks [k', B] of k' <= k full batches, then the partial batch as [1, r]."""
    import tensorflow as tf
    full, rest = divmod(n, batch)
    stacks = tf.data.Dataset.from_tensor_slices(tf.reshape(order[:full * batch], [full, batch])).batch(k)
    if rest:
        stacks = stacks.concatenate(tf.data.Dataset.from_tensors(tf.reshape(order[full * batch:], [1, rest])))
    return stacks


def _stacked_batches(batches: Any, batch_size: int, k: int) -> Any:
    """Group a generator of one epoch's batches (arrays [B, ...] or tuples of them) into stacks [k', B, ...]
    of k' <= k consecutive full batches; a short batch (size != B) becomes a stack of one on its own.
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


class _ArrayPipelines(_Pipelines):
    def __init__(self, x_train, l_train, x_val, l_val, batch_size: int, seed: int, steps_per_call: int = 1):
        self.x_train, self.l_train, self.x_val, self.l_val = x_train, l_train, x_val, l_val
        self.n_train, self.n_val, self.batch_size, self.seed = len(x_train), len(x_val), batch_size, seed
        self.steps_per_call = steps_per_call

    def adapt_input(self) -> tuple[np.ndarray, np.ndarray | None]:
        return self.x_train, self.l_train

    def train_dataset(self, initial_epoch: int, epochs: int) -> "tf.data.Dataset":
        """Batches (or stacks of batches, see _Pipelines) of epochs initial_epoch..epochs-1; epoch e visits
        the rows in the order argsort(u), u ~ U(0,1)^n drawn statelessly from the seed (seed, e), so any
        epoch can be regenerated alone.
        """
        import tensorflow as tf
        x = tf.constant(self.x_train)
        labels = None if self.l_train is None else tf.constant(self.l_train)
        n, seed, batch, k = self.n_train, self.seed, self.batch_size, self.steps_per_call

        def gather(idx):
            return tf.gather(x, idx) if labels is None else (tf.gather(x, idx), tf.gather(labels, idx))

        def epoch_batches(epoch):
            key = tf.stack([tf.constant(seed, tf.int64), epoch])
            order = tf.argsort(tf.random.stateless_uniform([n], seed=key))
            if k == 1:
                return tf.data.Dataset.from_tensor_slices(order).batch(batch).map(gather)
            return _stacked_indices(order, n, batch, k).map(gather)

        # flat_map leaves the cardinality unknown, so Keras keeps one iterator across epochs instead of
        # restarting it (which would repeat epoch `initial_epoch`'s order every epoch).
        return (tf.data.Dataset.range(initial_epoch, epochs).flat_map(epoch_batches)
                .prefetch(tf.data.AUTOTUNE))

    def val_dataset(self) -> "tf.data.Dataset | None":
        import tensorflow as tf
        if self.n_val == 0:
            return None
        rows = self.x_val if self.l_val is None else (self.x_val, self.l_val)
        return tf.data.Dataset.from_tensor_slices(rows).batch(self.batch_size)


#: Rows shuffled together when streaming HDF5 (HDF5Catalogue.batches' shuffle_buffer): 2^18 rows of
#: (x, labels) float32 are a few MB, and chunk order is permuted as well.
STREAM_SHUFFLE_ROWS = 2**18


@dataclass(frozen=True)
class _HDF5Data:
    """Training data streamed from an HDF5 catalogue (never loaded whole).

    Rows [0, n_train) train, rows [n_train, n) validate (n - n_train = round(n · validation_split)), so
    a file sorted by some property gives an unrepresentative validation set: shuffle such files first.
    """

    path: Path
    n: int
    file_label_dim: int
    description: dict
    want_labels: bool = True       # False: train unconditionally on a labelled file (label_dim = 0)
    streamed: ClassVar[bool] = True
    dim: ClassVar[int] = 6

    @property
    def use_labels(self) -> bool:
        return self.want_labels and self.file_label_dim > 0

    @property
    def label_dim(self) -> int:
        return self.file_label_dim if self.use_labels else 0

    def pipelines(self, config: TrainConfig, seed: int, steps_per_call: int = 1) -> "_Pipelines":
        return _HDF5Pipelines(self, config, seed, steps_per_call)


def _hdf5_data(catalogue: Any) -> _HDF5Data:
    path = Path(catalogue.path).resolve()
    description = {"source": "hdf5", "path": str(path), "label_names": list(catalogue.label_names),
                   "units": dict(catalogue.units), "bytes": path.stat().st_size}
    return _HDF5Data(path, len(catalogue), catalogue.label_dim, description)


class _HDF5Pipelines(_Pipelines):
    """Per-member pipelines over an HDF5 file, through :class:`tfgalflow.catalogue.HDF5Catalogue`."""

    def __init__(self, data: _HDF5Data, config: TrainConfig, seed: int, steps_per_call: int = 1):
        from .catalogue import open_hdf5
        self.data, self.seed, self.batch_size = data, seed, config.batch_size
        self.steps_per_call = steps_per_call
        self.n_val = 0 if config.validation_split <= 0 else max(1, int(round(data.n * config.validation_split)))
        self.n_train = data.n - self.n_val
        self.adapt_samples = config.adapt_samples
        self.catalogue = open_hdf5(data.path, units=data.description["units"])
        self.stream_error: Exception | None = None     # an InputError/FileError raised inside tf.data

    def adapt_input(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Every s-th training row, s = ceil(n_train / adapt_samples): at most adapt_samples rows, spread
        evenly over the training range (one strided HDF5 read).
        """
        step = math.ceil(self.n_train / self.adapt_samples)
        cat = self.catalogue.read(0, self.n_train, step)
        return cat.phase_space, (cat.labels if self.data.use_labels else None)

    def _signature(self, stacked: bool = False) -> Any:
        """Element spec of batches [B, 6] (labels [B, C]), or of stacks [K, B, 6] (labels [K, B, C])."""
        import tensorflow as tf
        lead = [None, None] if stacked else [None]
        x = tf.TensorSpec(lead + [6], tf.float32)
        return (x, tf.TensorSpec(lead + [self.data.file_label_dim], tf.float32)) if self.data.use_labels else x

    def _guarded(self, generator):
        """Keep the first package error raised while streaming, so ``fit`` can re-raise it unwrapped."""
        from .errors import TfgalflowError
        try:
            yield from generator
        except TfgalflowError as exc:
            self.stream_error = self.stream_error or exc
            raise

    def train_dataset(self, initial_epoch: int, epochs: int) -> "tf.data.Dataset":
        """Epochs initial_epoch..epochs-1 of the training rows; epoch e is shuffled with the seed (seed, e)
        (``HDF5Catalogue.batches(..., epoch=e)``), so a resumed run regenerates exactly the same batches
        (stacked per epoch when steps_per_call > 1, see _Pipelines).
        """
        import tensorflow as tf
        rows = dataclasses.replace(self.catalogue, n=self.n_train)     # the first n_train rows of the file
        k = self.steps_per_call

        def generator():
            for epoch in range(initial_epoch, epochs):
                batches = rows.batches(self.batch_size, shuffle_buffer=STREAM_SHUFFLE_ROWS, seed=self.seed,
                                       with_labels=self.data.use_labels, epoch=epoch)
                yield from self._guarded(batches if k == 1 else _stacked_batches(batches, self.batch_size, k))

        return tf.data.Dataset.from_generator(generator, output_signature=self._signature(k > 1)).prefetch(2)

    def val_dataset(self) -> "tf.data.Dataset | None":
        """Rows [n_train, n) in file order, read in blocks of whole batches."""
        import tensorflow as tf
        if self.n_val == 0:
            return None
        block = self.batch_size * max(1, 65536 // self.batch_size)

        def blocks():
            for a in range(self.n_train, self.data.n, block):
                cat = self.catalogue.read(a, min(a + block, self.data.n))
                x = cat.phase_space.astype(np.float32)
                lab = cat.labels.astype(np.float32) if self.data.use_labels else None
                for i in range(0, len(x), self.batch_size):
                    j = i + self.batch_size
                    yield x[i:j] if lab is None else (x[i:j], lab[i:j])

        return tf.data.Dataset.from_generator(lambda: self._guarded(blocks()),
                                              output_signature=self._signature()).prefetch(2)


def _as_training_data(data: Any, labels: Any, label_names: Sequence[str] | None) -> Any:
    """Validate ``data`` (Catalogue | array [N, D] | path) and wrap it; InputError/FileError on bad input."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.exists():
            raise FileError(f"{path}: no such data file (expected a catalogue .npz or .h5/.hdf5)")
        if labels is not None:
            raise InputError(f"labels were given together with the file {path}; a catalogue file carries its "
                             f"own labels")
        from .catalogue import Catalogue, open_hdf5
        if path.suffix.lower() in HDF5_SUFFIXES:
            return _hdf5_data(open_hdf5(path))
        return _from_catalogue(Catalogue.load(path), {"source": "file", "path": str(path.resolve())})
    from .catalogue import Catalogue, HDF5Catalogue
    if isinstance(data, HDF5Catalogue):
        if labels is not None:
            raise InputError(f"labels were given together with the HDF5 catalogue {data.path}; it carries its own")
        return _hdf5_data(data)
    if isinstance(data, Catalogue):
        if labels is not None:
            raise InputError("labels were given together with a Catalogue; put them in the Catalogue "
                             "(Catalogue.labels) instead")
        return _from_catalogue(data, {"source": "catalogue", "path": None})
    x = _as_2d_float32(data, "data", "[N, D]")
    lab = None if labels is None else _as_2d_float32(labels, "labels", f"[{x.shape[0]}, C]", one_d_ok=True)
    if lab is not None and lab.shape[0] != x.shape[0]:
        raise InputError(f"labels have {lab.shape[0]} rows but data has {x.shape[0]}; expected labels "
                         f"[{x.shape[0]}, C]")
    names = _label_names(label_names, 0 if lab is None else lab.shape[1])
    return _ArrayData(x, lab, {"source": "array", "path": None, "label_names": names})


def _as_2d_float32(a: Any, name: str, expected: str, one_d_ok: bool = False) -> np.ndarray:
    try:
        arr = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} cannot be read as a float array ({exc}); expected {expected}") from None
    if arr.ndim == 1 and one_d_ok:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise InputError(f"{name} has shape {arr.shape}; expected {expected}")
    if arr.shape[0] == 0:
        raise InputError(f"{name} is empty (shape {arr.shape}); expected {expected} with N >= 2")
    _check_finite_rows(arr, name)
    with np.errstate(over="raise"):
        try:
            return arr.astype(np.float32)
        except FloatingPointError:
            raise InputError(f"{name} has values beyond the float32 range (|x| > 3.4e38)") from None


def _label_names(names: Sequence[str] | None, width: int) -> list[str]:
    if names is None:
        return [f"label_{i}" for i in range(width)]
    names = [str(n) for n in names]
    if len(names) != width:
        raise InputError(f"label_names has {len(names)} entries {names} but the labels have {width} column(s)")
    return names


def _from_catalogue(cat: Any, description: dict) -> _ArrayData:
    x = _as_2d_float32(cat.phase_space, "catalogue phase space (pos, vel)", "[N, 6]")
    lab = None
    if cat.labels is not None:
        lab = _as_2d_float32(cat.labels, "catalogue labels", f"[{x.shape[0]}, C]", one_d_ok=True)
    description = dict(description, label_names=_label_names(cat.label_names, 0 if lab is None else lab.shape[1]),
                       units=dict(cat.units))
    return _ArrayData(x, lab, description)


def _select_labels(data: Any, config: TrainConfig) -> TrainConfig:
    """Resolve ``config.label_dim`` against the data (None -> the data's width); InputError on mismatch."""
    width = data.label_dim
    if config.label_dim is None:
        return config.with_overrides(label_dim=width)
    if config.label_dim == 0:
        if width and data.description["source"] == "array":
            raise InputError(f"labels of width {width} were given but TrainConfig.label_dim = 0 "
                             f"(unconditional); drop the labels or set label_dim = {width}")
        return config
    if width == 0:
        raise InputError(f"TrainConfig.label_dim = {config.label_dim} (a conditional flow) but the data has no "
                         f"labels; pass labels [N, {config.label_dim}]")
    if width != config.label_dim:
        raise InputError(f"labels have {width} column(s) but TrainConfig.label_dim = {config.label_dim}; "
                         f"expected labels [N, {config.label_dim}]")
    return config


def _describe(data: Any, config: TrainConfig) -> dict:
    d = dict(data.description, n=data.n, dim=data.dim, label_dim=config.label_dim)
    if not data.streamed:
        d["sha256"] = data.fingerprint()
    if config.label_dim == 0:
        d["label_names"] = []
    return d


def _without_labels(data: Any) -> Any:
    """The same data with its labels dropped (TrainConfig.label_dim = 0 on a labelled catalogue)."""
    if data.streamed:
        return dataclasses.replace(data, want_labels=False)
    return _ArrayData(data.x, None, dict(data.description, label_names=[]))


# ---- run directory ---------------------------------------------------------------------------

def member_name(k: int) -> str:
    """Directory name of ensemble member k inside a run: ``member_000``, ``member_001``, ..."""
    return f"member_{k:03d}"


def read_run_config(run_dir: str | os.PathLike) -> dict:
    """Parsed ``RUN/config.json``; FileError if missing, corrupt, or of another run-format version."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileError(f"{path}: no such file; {run_dir} is not a tfgalflow run directory")
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FileError(f"{path}: corrupt run config: {exc}") from None
    if not isinstance(d, dict) or d.get("format") != RUN_FORMAT:
        raise FileError(f"{path}: not a tfgalflow run config (expected \"format\": \"{RUN_FORMAT}\")")
    if d.get("format_version") != RUN_FORMAT_VERSION:
        raise FileError(f"{path}: run-format version {d.get('format_version')!r} is not supported by tfgalflow "
                        f"{__version__} (expected {RUN_FORMAT_VERSION}); retrain with "
                        f"`tfgalflow train DATA --config {path} --out NEWRUN`")
    for key in ("train", "flow", "members", "data"):
        if key not in d:
            raise FileError(f"{path}: run config lacks the '{key}' section")
    return d


def _new_run(run_dir: Path, config: TrainConfig, flow_config: Any, data_description: dict) -> dict:
    """Create the run directory and its config.json; FileError if it already holds something."""
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise FileError(f"{run_dir}: run directory exists and is not empty; continue it with resume() "
                        f"(`tfgalflow train --resume {run_dir}`) or choose another directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    run = {
        "format": RUN_FORMAT,
        "format_version": RUN_FORMAT_VERSION,
        "tfgalflow_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "train": config.to_dict(),
        "flow": flow_config.to_dict(),
        "members": [{"name": member_name(k), "seed": config.seed + k} for k in range(config.members)],
        "data": data_description,
    }
    write_json(run_dir / CONFIG_FILE, run)
    return run


def read_history(run_dir: str | os.PathLike, member: int = 0) -> dict[str, np.ndarray]:
    """The per-epoch history of one member: {"epoch": int [E], "loss": [E], "val_loss": [E], ...}."""
    path = Path(run_dir) / member_name(member) / HISTORY_FILE
    rows = _read_history_rows(path)
    if not rows:
        return {"epoch": np.zeros(0, int)}
    keys = list(rows[0])
    return {k: np.array([int(r[k]) if k == "epoch" else float(r[k]) for r in rows]) for k in keys}


def _read_history_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a history.csv, skipping torn lines (a crash mid-write) and keeping the first of duplicates."""
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        rows, seen = [], set()
        for row in reader:
            try:
                epoch = int(row["epoch"])
                [float(v) for k, v in row.items() if k != "epoch"]
            except (TypeError, ValueError, KeyError):
                continue
            if epoch not in seen:
                seen.add(epoch)
                rows.append(row)
    return rows


def _truncate_history(path: Path, epochs_done: int) -> None:
    """Keep only the rows of epochs 0..epochs_done-1, so a resumed run appends without duplicates."""
    rows = _read_history_rows(path)
    kept = [r for r in rows if int(r["epoch"]) < epochs_done]
    if not path.exists() or (len(kept) == len(rows) and _well_formed(path, len(rows))):
        return
    if not kept:
        path.unlink()
        return
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(kept[0]), dialect="excel")   # Keras CSVLogger's dialect
    writer.writeheader()
    writer.writerows(kept)
    write_text(path, out.getvalue())


def _well_formed(path: Path, n_rows: int) -> bool:
    """True if the file has exactly a header and n_rows lines, the last one complete."""
    text = path.read_text()
    return text.endswith("\n") and text.count("\n") == n_rows + 1


# ---- learning rate and seeds -------------------------------------------------------------------

def _learning_rate(config: TrainConfig, steps_per_epoch: int) -> Any:
    """η(t) of the module docstring as a Keras schedule (a float for "constant")."""
    import tf_keras as keras
    total = max(1, config.epochs * steps_per_epoch)
    if config.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(config.lr, decay_steps=total, alpha=0.0)
    if config.lr_schedule == "exponential":
        return keras.optimizers.schedules.ExponentialDecay(config.lr, decay_steps=total,
                                                           decay_rate=EXPONENTIAL_FINAL_FRACTION)
    return config.lr


def _seed_everything(seed: int) -> None:
    """The one place that seeds Python, NumPy and TensorFlow's global generators for a member."""
    import tf_keras as keras
    keras.utils.set_random_seed(seed)


# ---- callbacks -----------------------------------------------------------------------------------

@cache
def _callback_types() -> tuple[type, type, type]:
    """(ResumableEarlyStopping, RunCheckpoint, MemberState), defined on first use (they need tf_keras)."""
    import tensorflow as tf
    import tf_keras as keras

    class MemberState(tf.Module):
        """Counters saved in every checkpoint: epochs done and the early-stopping state after them."""

        def __init__(self):
            super().__init__(name="member_state")
            self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
            self.best = tf.Variable(np.inf, dtype=tf.float64, trainable=False, name="best")
            self.best_epoch = tf.Variable(-1, dtype=tf.int64, trainable=False, name="best_epoch")
            self.wait = tf.Variable(0, dtype=tf.int64, trainable=False, name="wait")
            self.stopped = tf.Variable(False, trainable=False, name="stopped")

    class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
        """Keras EarlyStopping (restore_best_weights) whose state can be carried across a resume.

        Keras resets best/wait/best_weights in on_train_begin; ``resume_from`` queues the values read
        from a checkpoint, applied right after that reset.
        """

        def __init__(self, monitor: str, patience: int, verbose: int):
            super().__init__(monitor=monitor, mode="min", patience=patience if patience > 0 else math.inf,
                             restore_best_weights=True, verbose=verbose)
            self._pending = None

        def resume_from(self, best: float, best_epoch: int, wait: int, best_weights: list | None) -> None:
            self._pending = (best, best_epoch, wait, best_weights)

        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            if self._pending is not None:
                self.best, self.best_epoch, self.wait, self.best_weights = self._pending
                self._pending = None

    class RunCheckpoint(keras.callbacks.Callback):
        """After each epoch E (1-based count): record the early-stopping state, save ckpt-E every k epochs
        and best/ckpt-E when the monitored loss improved. Non-finite losses stop the run with an error.
        """

        def __init__(self, state: MemberState, early: ResumableEarlyStopping, periodic, best, every: int):
            super().__init__()
            self.state, self.early, self.periodic, self.best_manager, self.every = state, early, periodic, best, every

        def on_epoch_end(self, epoch, logs=None):
            bad = {k: v for k, v in (logs or {}).items() if not np.isfinite(v)}
            if bad:
                raise InputError(f"training diverged in epoch {epoch} (0-based): {bad}; lower the learning rate "
                                 f"(--lr) or check the data for extreme values")
            done = epoch + 1
            self.state.epoch.assign(done)
            self.state.best.assign(self.early.best)
            self.state.best_epoch.assign(self.early.best_epoch)
            self.state.wait.assign(self.early.wait)
            self.state.stopped.assign(bool(self.model.stop_training))
            if self.early.best_epoch == epoch:
                self.best_manager.save(checkpoint_number=done)
            if self.every and done % self.every == 0:
                self.periodic.save(checkpoint_number=done)

    return ResumableEarlyStopping, RunCheckpoint, MemberState


# ---- one member --------------------------------------------------------------------------------

def _checkpoint_epoch(path: str | None) -> int:
    return -1 if path is None else int(re.search(r"-(\d+)$", path).group(1))


def _restore(checkpoint: Any, path: str, written: bool = False) -> None:
    """Restore every object of ``checkpoint`` from ``path``; FileError naming the files if that fails.

    ``written`` marks files from ``Checkpoint.write`` (no ``save_counter``, unlike CheckpointManager saves).
    Every saved value must match an object and every object must be restored (``assert_consumed``).
    """
    import tensorflow as tf
    try:
        (checkpoint.read(path) if written else checkpoint.restore(path)).assert_consumed()
    except (tf.errors.OpError, AssertionError, ValueError) as exc:
        raise FileError(f"{path}.index / {path}.data-*: cannot restore checkpoint (missing, corrupt or from "
                        f"another architecture): {str(exc).splitlines()[0][:300]}") from None


def _fit_member(run_dir: Path, run: dict, k: int, data: Any, *, strategy: Any = None, verbose: int = 1,
                callbacks: Sequence[Any] = ()) -> "Flow":
    """Train member k of the run (continuing from its latest checkpoint if any) and write its final weights."""
    import tensorflow as tf
    import tf_keras as keras
    from .flows import FlowConfig
    from .model import Flow

    config = TrainConfig.from_dict(run["train"])
    member = run["members"][k]
    seed, member_dir = int(member["seed"]), run_dir / member["name"]
    flow_config = dataclasses.replace(FlowConfig.from_dict(run["flow"]), seed=seed)
    EarlyStopping, RunCheckpoint, MemberState = _callback_types()

    _seed_everything(seed)
    strategy = strategy or tf.distribute.get_strategy()
    pipelines = data.pipelines(config, seed, _steps_per_call(config, strategy))
    with strategy.scope():
        flow = Flow(flow_config)
        optimizer = keras.optimizers.Adam(_learning_rate(config, pipelines.steps_per_epoch))
        flow.compile(optimizer=optimizer, jit_compile=_jit_compile(config, strategy))
        optimizer.build(flow.trainable_variables)     # slots exist before a restore, so it is checked whole
    state = MemberState()
    checkpoint = tf.train.Checkpoint(model=flow, optimizer=optimizer, state=state)
    ckpt_dir = member_dir / "checkpoints"
    periodic = tf.train.CheckpointManager(checkpoint, str(ckpt_dir), max_to_keep=None, checkpoint_name="ckpt")
    best = tf.train.CheckpointManager(checkpoint, str(ckpt_dir / "best"), max_to_keep=1, checkpoint_name="ckpt")
    monitor = "val_loss" if pipelines.n_val else "loss"
    early = EarlyStopping(monitor, config.patience, verbose=1 if verbose else 0)

    latest = max(periodic.latest_checkpoint, best.latest_checkpoint, key=_checkpoint_epoch)
    best_weights = None
    if latest is None:
        flow.adapt(*pipelines.adapt_input())
        initial_epoch = 0
    else:   # continue: best weights from best/, then everything else from the latest checkpoint
        if best.latest_checkpoint is not None:
            _restore(checkpoint, best.latest_checkpoint)
            best_weights = flow.get_weights()
        _restore(checkpoint, latest)
        initial_epoch = int(state.epoch.numpy())
        if initial_epoch != _checkpoint_epoch(latest):
            raise FileError(f"{latest}.index: checkpoint number {_checkpoint_epoch(latest)} disagrees with its "
                            f"saved epoch counter {initial_epoch}")
        early.resume_from(float(state.best.numpy()), int(state.best_epoch.numpy()), int(state.wait.numpy()),
                          best_weights)
    history_path = member_dir / HISTORY_FILE
    _truncate_history(history_path, initial_epoch)

    if initial_epoch < config.epochs and not bool(state.stopped.numpy()):
        run_callbacks = [early, RunCheckpoint(state, early, periodic, best, config.checkpoint_every),
                         keras.callbacks.CSVLogger(str(history_path), append=True)]
        if config.tensorboard:
            run_callbacks.append(keras.callbacks.TensorBoard(str(member_dir / "tensorboard"), write_graph=False))
        try:
            flow.fit(pipelines.train_dataset(initial_epoch, config.epochs), epochs=config.epochs,
                     initial_epoch=initial_epoch, steps_per_epoch=pipelines.calls_per_epoch,
                     validation_data=pipelines.val_dataset(), callbacks=run_callbacks + list(callbacks),
                     verbose=verbose)
        except tf.errors.OpError:
            # tf.data wraps exceptions of Python generators; give back the file's own error (bad row, ...)
            if getattr(pipelines, "stream_error", None) is not None:
                raise pipelines.stream_error from None
            raise
        best_epoch, best_value = early.best_epoch, early.best
    else:   # the checkpoint is the end of training: its best weights are the final model
        if best_weights is not None:
            flow.set_weights(best_weights)
        best_epoch, best_value = int(state.best_epoch.numpy()), float(state.best.numpy())

    history = read_history(run_dir, k)
    summary = {"member": member["name"], "seed": seed, "epochs_run": int(len(history["epoch"])),
               "monitor": monitor, "best_epoch": int(best_epoch), "best": float(best_value),
               "stopped_early": bool(len(history["epoch"]) < config.epochs)}
    _write_final(member_dir / "final", flow, summary)
    return flow


def _steps_per_call(config: TrainConfig, strategy: Any) -> int:
    """``config.steps_per_call``, or 1 (with a logged warning) under a strategy with several replicas.

    Keras splits every element of a distributed dataset along its first axis, which for a stack
    [K, B, D] is K, not the batch; ``Flow.train_step`` refuses stacks there. K only changes how many
    steps one call runs, never the updates, so falling back to K = 1 gives the same training run.
    """
    replicas = strategy.num_replicas_in_sync
    if config.steps_per_call > 1 and replicas > 1:
        logging.getLogger(__name__).warning(
            "TrainConfig.steps_per_call = %d needs a single replica; the distribution strategy has %d, so "
            "each call runs one optimizer step (steps_per_call = 1)", config.steps_per_call, replicas)
        return 1
    return config.steps_per_call


def _jit_compile(config: TrainConfig, strategy: Any) -> bool:
    """``config.jit_compile``, or False (with a logged warning) for several replicas on CPU devices.

    XLA compiles the replicated train step for one CPU device and then cannot read the other replicas'
    variables ("Trying to access resource ... located in device CPU:1 from device CPU:0", TF 2.21; see
    https://www.tensorflow.org/xla/known_issues), so logical-CPU MirroredStrategy runs train in graph mode.
    """
    if not (config.jit_compile and strategy.num_replicas_in_sync > 1):
        return config.jit_compile
    if any("CPU" in d.upper() for d in strategy.extended.worker_devices):
        logging.getLogger(__name__).warning(
            "TrainConfig.jit_compile = True: XLA cannot compile a train step replicated over %d CPU devices; "
            "training without XLA", strategy.num_replicas_in_sync)
        return False
    return config.jit_compile


def _write_final(final_dir: Path, flow: "Flow", summary: dict) -> None:
    """Write the final weights and summary.json into ``final_dir`` atomically (a good one is never lost).

    The weights are copied into a fresh, uncompiled Flow first, so the file holds the model alone (no
    optimizer state, no distribution-strategy wrappers) and reloads into ``Flow(config)``.
    """
    import tensorflow as tf
    from .model import Flow
    plain = Flow(flow.config)
    plain.set_weights(flow.get_weights())
    with atomic_dir(final_dir, overwrite=True) as tmp:
        tf.train.Checkpoint(model=plain).write(str(tmp / WEIGHTS_PREFIX))
        write_json(tmp / "summary.json", summary)


def _load_member(run_dir: Path, run: dict, k: int) -> "Flow":
    from .flows import FlowConfig
    from .model import Flow
    import tensorflow as tf

    member = run["members"][k]
    final = run_dir / member["name"] / "final"
    prefix = final / WEIGHTS_PREFIX
    if not Path(f"{prefix}.index").is_file():
        raise FileError(f"{prefix}.index: no final weights for {member['name']}; the run did not finish - continue "
                        f"it with `tfgalflow train --resume {run_dir}`")
    try:
        flow_config = dataclasses.replace(FlowConfig.from_dict(run["flow"]), seed=int(member["seed"]))
    except (InputError, TypeError, ValueError) as exc:
        raise FileError(f"{run_dir / CONFIG_FILE}: invalid flow section: {exc}") from None
    flow = Flow(flow_config)
    _restore(tf.train.Checkpoint(model=flow), str(prefix), written=True)
    return flow


def _finished(run_dir: Path, run: dict, k: int) -> bool:
    return Path(f"{run_dir / run['members'][k]['name'] / 'final' / WEIGHTS_PREFIX}.index").is_file()


# ---- public API --------------------------------------------------------------------------------

def train(data: "Catalogue | np.ndarray | str | os.PathLike", config: TrainConfig,
          run_dir: str | os.PathLike, labels: Any = None, label_names: Sequence[str] | None = None,
          strategy: "tf.distribute.Strategy | None" = None, *, verbose: int = 1,
          callbacks: Sequence[Any] = ()) -> "Flow | Ensemble":
    """Fit a flow (or ``config.members`` flows differing only by seed) by maximum likelihood; write a run dir.

    Args:
        data: a Catalogue (its phase space [N, 6] and labels are used), an array x [N, D] (physical
            units), or a path: a catalogue .npz (loaded) or an .h5/.hdf5 file (streamed in batches; the
            rescaler is fitted on a subsample of ``config.adapt_samples`` rows and the last
            ``validation_split`` fraction of rows is the validation set).
        config: the TrainConfig; ``label_dim=None`` takes the data's labels, 0 ignores them.
        run_dir: new (or empty) directory for config.json, histories, checkpoints and final weights.
        labels: [N, C] conditioning labels for an array ``data`` (a Catalogue carries its own).
        label_names: names of the C label columns (recorded in config.json).
        strategy: a ``tf.distribute.Strategy``; model and optimizer are built in its scope and Keras
            splits every batch across its replicas. With several replicas ``steps_per_call`` falls back
            to 1 (logged warning; Keras would split a stack [K, B, D] along K), which changes no update;
            with several CPU replicas ``jit_compile`` falls back to False (logged; an XLA limitation).
        verbose: Keras progress output (0 silent, 1 progress bar, 2 one line per epoch).
        callbacks: extra Keras callbacks, run after the run's own (not with ``parallel``).

    Returns:
        the trained Flow (members == 1) or an Ensemble of the members, with best-validation weights.

    Raises:
        InputError for empty data, NaN/inf, wrong label width or labels missing for a conditional config;
        FileError if ``run_dir`` is not empty or a data file is missing/unreadable.
    """
    if not isinstance(config, TrainConfig):
        raise InputError(f"config must be a TrainConfig, got {type(config).__name__}")
    data = _as_training_data(data, labels, label_names)
    config = _select_labels(data, config)
    if config.label_dim == 0 and data.label_dim:
        data = _without_labels(data)
    _check_sizes(data, config)
    _check_tensorboard(config)
    flow_config = config.flow_config(data.dim, config.label_dim)     # validates the architecture
    run_dir = Path(run_dir)
    run = _new_run(run_dir, config, flow_config, _describe(data, config))
    return _fit_members(run_dir, run, data, strategy=strategy, verbose=verbose, callbacks=callbacks)


def resume(run_dir: str | os.PathLike, data: Any = None, labels: Any = None,
           strategy: "tf.distribute.Strategy | None" = None, *, verbose: int = 1,
           callbacks: Sequence[Any] = ()) -> "Flow | Ensemble":
    """Continue an interrupted run: finished members are loaded, the others continue from their latest
    checkpoint (or start over if they have none). The history continues as if never interrupted.

    ``data`` is needed only for runs trained on in-memory arrays or Catalogues (checked against the
    recorded sha256); runs trained from a file re-read that file.
    """
    run_dir = Path(run_dir)
    run = read_run_config(run_dir)
    recorded = run["data"]
    if data is None:
        if not recorded.get("path"):
            raise InputError(f"{run_dir} was trained on in-memory data; pass the same data to resume("
                             f"{str(run_dir)!r}, data=..., labels=...)")
        data = recorded["path"]
    data = _as_training_data(data, labels, None)
    config = TrainConfig.from_dict(run["train"])
    if config.label_dim and not data.label_dim:
        raise InputError(f"{run_dir} is a conditional run (label_dim = {config.label_dim}): pass the labels "
                         f"[N, {config.label_dim}] it was trained with")
    if config.label_dim == 0 and data.label_dim:
        data = _without_labels(data)
    if (data.n, data.dim, data.label_dim) != (recorded["n"], recorded["dim"], recorded["label_dim"]) or (
            "sha256" in recorded and not data.streamed and data.fingerprint() != recorded["sha256"]):
        raise InputError(f"the data differ from those {run_dir} was trained on (recorded N = {recorded['n']}, "
                         f"D = {recorded['dim']}, C = {recorded['label_dim']}; got N = {data.n}, D = {data.dim}, "
                         f"C = {data.label_dim}, or different values)")
    return _fit_members(run_dir, run, data, strategy=strategy, verbose=verbose, callbacks=callbacks)


def load_run(run_dir: str | os.PathLike) -> "Flow | Ensemble":
    """Rebuild the trained model of a finished run from config.json and the members' final weights.

    Raises FileError naming the file if config.json is missing/corrupt/of another run-format version or
    a member's weights are missing or corrupt.
    """
    from .model import Ensemble
    run_dir = Path(run_dir)
    run = read_run_config(run_dir)
    flows = [_load_member(run_dir, run, k) for k in range(len(run["members"]))]
    return flows[0] if len(flows) == 1 else Ensemble(flows)


def _check_tensorboard(config: TrainConfig) -> None:
    """TensorFlow >= 2.16 no longer depends on TensorBoard: say so before training, not after epoch 1."""
    import importlib.util
    if config.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise InputError("TrainConfig.tensorboard = True needs the 'tensorboard' package "
                         "(pip install tensorboard); or train with tensorboard = False")


def _check_sizes(data: Any, config: TrainConfig) -> None:
    if data.n < 2:
        raise InputError(f"data has {data.n} row(s); training needs x [N, {data.dim}] with N >= 2")
    if config.validation_split > 0:
        m = max(1, int(round(data.n * config.validation_split)))
        if data.n - m < 2:
            raise InputError(f"validation_split = {config.validation_split} of N = {data.n} rows leaves "
                             f"{data.n - m} training row(s); need >= 2")


def _fit_members(run_dir: Path, run: dict, data: Any, *, strategy: Any, verbose: int,
                 callbacks: Sequence[Any]) -> "Flow | Ensemble":
    from .model import Ensemble
    config = TrainConfig.from_dict(run["train"])
    todo = [k for k in range(config.members) if not _finished(run_dir, run, k)]
    if config.parallel and len(todo) > 1:
        if strategy is not None or callbacks:
            raise InputError("parallel=True trains members in separate processes: it cannot take a "
                             "tf.distribute strategy or extra callbacks")
        _fit_in_processes(run_dir, todo, data, verbose)
        todo = []
    flows = [_fit_member(run_dir, run, k, data, strategy=strategy, verbose=verbose, callbacks=callbacks)
             if k in todo else _load_member(run_dir, run, k) for k in range(config.members)]
    return flows[0] if len(flows) == 1 else Ensemble(flows)


# ---- parallel members ----------------------------------------------------------------------------

def _member_process(run_dir: str, k: int, data: Any, verbose: int, threads: int) -> None:
    """Entry point of a spawned process: train member k of the run (TF threads limited to ``threads``)."""
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    run = read_run_config(run_dir)
    _fit_member(Path(run_dir), run, k, data, verbose=verbose)


def _fit_in_processes(run_dir: Path, members: Sequence[int], data: Any, verbose: int) -> None:
    """Train the given members concurrently, one spawned process each (at most one per CPU core)."""
    import concurrent.futures
    import multiprocessing

    workers = max(1, min(len(members), os.cpu_count() or 1))
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")     # fork after TensorFlow started is unsafe
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(_member_process, str(run_dir), k, data, 2 if verbose else 0, threads): k
                   for k in members}
        for future in concurrent.futures.as_completed(futures):
            future.result()     # re-raises a member's error (InputError, FileError, ...) here
