"""TrainConfig: everything that defines a training run except the data, with no TensorFlow import.

A frozen dataclass, serialisable to JSON/YAML and validated on construction; every field is also a
``tfgalflow train`` flag (the CLI builds them from :meth:`TrainConfig.field_help`; fields and their
parsing: :mod:`tfgalflow.config_fields`), so this module imports only the standard library, NumPy
and :mod:`tfgalflow.validation`: ``tfgalflow --help`` and configuration code stay fast.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .. import validation
from ..catalogue.core import NOISE_PROPOSALS
from ..config_fields import check_keys, coerce_fields, field_help, option
from ..coordinates import COORDINATES, flow_log_columns
from ..errors import FileError, InputError
from .rundir import RUN_FORMAT

#: Learning-rate schedules η(t) (formulas in :mod:`tfgalflow.training`).
LR_SCHEDULES = ("constant", "cosine", "exponential")
#: η(T)/η0 of the exponential schedule.
EXPONENTIAL_FINAL_FRACTION = 0.01


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run except the data; JSON/YAML-serialisable, validated.

    The flow fields (layers ... log_columns) become a :class:`tfgalflow.flows.FlowConfig` together
    with the data's dim and label_dim. Member k of an ensemble is trained with seed ``seed + k``
    and nothing else changed. Every field is also a ``tfgalflow train`` flag (``--batch-size`` for
    ``batch_size``).

    Example::

        cfg = TrainConfig(layers=4, hidden=(32, 32), epochs=50).with_overrides(lr=3e-3)
        TrainConfig.from_file("RUN/config.json")   # JSON or YAML; a run's config.json works too
    """

    layers: int = option(8, "autoregressive layers L of the flow", "int")
    hidden: tuple = option((64, 64), "hidden widths of each MADE network, e.g. 64,64", "ints")
    activation: str = option("relu", "hidden activation of the MADE networks", "str")
    context_blocks: int = option(
        0, "residual blocks of a context network that encodes the labels for every MADE "
        "(tfgalflow.context; 0: the labels enter the MADEs directly)", "int")
    context_width: int = option(256, "width of the context network (with context_blocks > 0)",
                                "int")
    kind: str = option("affine", "'affine' (MAF) or 'spline' (rational-quadratic spline MAF)",
                       "str")
    bins: int = option(8, "spline bins K (kind='spline')", "int")
    log_columns: tuple = option((), "0-based data columns modelled as log(x) (strictly "
                                    "positive), e.g. 0,3", "ints")
    label_log_columns: tuple = option(
        (),
        "0-based label columns standardised as log(c) (strictly "
        "positive, e.g. a metallicity Z), e.g. 0",
        "ints",
    )
    label_asinh: tuple = option(
        (),
        "label columns k standardised as asinh(c_k / s_k) (a softened log, for labels that "
        "reach 0), as k:s pairs, e.g. 1:0.01",
        "pairs?",
    )
    conditional_rescaling: bool = option(
        False,
        "rescale each data column by a mean and log-scale linear in the labels (least squares "
        "at adapt), so the flow learns only what is left: interpolates better between few "
        "distinct labels (conditional flows only)",
        "bool",
    )
    rescaling_labels: tuple = option(
        (), "0-based label columns the conditional rescaler regresses on (default: all), e.g. "
        "0,1: the trusted labels, not latents or noise columns (FlowConfig.rescaling_labels; "
        "ignored without conditional_rescaling)",
        "ints")
    rescaling_columns: tuple = option(
        (), "0-based columns of the flow's data the conditional rescaler moves and scales "
        "(default: all); in the learned coordinates: cylindrical (R, z, v_R, v_phi, v_z, then "
        "the catalogue's columns after the sixth), spherical (r, v_r, v_t), else the catalogue's "
        "(FlowConfig.rescaling_columns; ignored without conditional_rescaling)",
        "ints")
    coordinates: str = option(
        "cartesian",
        "what the flow learns of the catalogue: 'cartesian' (its columns), 'spherical' "
        "(r, v_r, v_t) of a steady spherical system's 6-D (x, v), or 'cylindrical' (R, z, v_R, "
        "v_phi, v_z, further columns) of an axisymmetric one; the model is then the exactly "
        "symmetric SphericalDF / AxisymmetricDF (tfgalflow.coordinates)",
        "str",
    )
    support_r_max: float | None = option(
        None, "with coordinates = spherical: the true radii lie below this (catalogue units; a "
        "cut in true space, like a simulation's sphere or a mock's r_max; none: unbounded); the "
        "flow then learns log(r / (r_max - r)) instead of log r, so the density's step to zero "
        "at r_max becomes a tail it can represent", "float?")
    label_dim: int | None = option(None, "label columns C to condition on: none = as many as the "
                                         "data has, 0 = ignore labels", "int?")
    epochs: int = option(100, "maximum number of epochs", "int")
    batch_size: int = option(512, "points per optimizer step", "int")
    lr: float = option(1e-3, "initial (peak) learning rate of Adam", "float")
    lr_schedule: str = option("cosine", "learning-rate schedule: constant, cosine or exponential",
                              "str")
    lr_warmup: float = option(
        0.0, "epochs of linear learning-rate warm-up from 0 to lr before the schedule (0 = off; "
        "with the cosine or constant schedule; at most the run's length less one step): keeps "
        "the first Adam steps at a high peak rate from throwing a flow into a poor region it "
        "does not train out of", "float")
    clip_norm: float | None = option(
        None, "clip each step's gradient to this global norm (none: no clipping); guards an "
        "affine flow against the first steps' blow-ups on wide or many-label data", "float?")
    weight_decay: float = option(
        0.0, "decoupled weight decay λ of Adam (AdamW: every step also shrinks each weight by "
        "η(t) λ w; 0 = off): regularises a flow that overfits its training set", "float")
    label_noise: float = option(
        0.0, "σ of Gaussian noise added to the standardised labels at every training step "
        "(0 = off): smooths p(x | c) between sparse training labels (Flow.set_label_noise)",
        "float")
    label_lasso: float = option(
        0.0, "group-lasso strength λ on each label column's weights, in nats per point per unit "
        "weight norm (0 = off): drops the label columns that carry no information on the "
        "density, so a flow trained on few objects with many labels does not memorise them "
        "(Flow.set_label_lasso)", "float")
    validation_split: float = option(0.1, "fraction of the points held out for validation "
                                          "(0 = none)", "float")
    patience: int = option(10, "stop after this many epochs without a lower monitored loss "
                               "(0 = never stop); the final weights are always those of the "
                               "best epoch", "int")
    checkpoint_every: int = option(10, "save a resumable checkpoint every k epochs (0 = only the "
                                       "best)", "int")
    keep_checkpoints: int = option(3, "keep the last k periodic checkpoints (0 = keep all); the "
                                      "checkpoint of the best epoch is always kept", "int")
    seed: int = option(0, "seed of member 0 (member k uses seed + k)", "int")
    members: int = option(1, "ensemble size K", "int")
    parallel: bool = option(False, "train ensemble members in parallel processes", "bool")
    tensorboard: bool = option(False, "write TensorBoard logs to RUN/member_XXX/tensorboard",
                               "bool")
    # Defaults are the fast path. Measured on 2 shared CPU cores (8-layer 2x64 MAF, batch 2048, 6D
    # Hernquist mock, training's own pipeline, medians of 20 epochs): samples/s 1.27x with XLA and
    # 2.05x with XLA and K = 16 (K = 8..32 alike) relative to no XLA, one step per call; XLA
    # compiles 2-3 train shapes once.
    jit_compile: bool = option(True, "XLA-compile the training step (one-time compilation of a "
                                     "few seconds per member; faster steps)", "bool")
    steps_per_call: int = option(16, "optimizer steps K per compiled train call: each epoch's "
                                     "batches are stacked K at a time [K, B, D] and run in one "
                                     "loop (same updates as K calls, less per-call overhead)",
                                 "int")
    adapt_samples: int = option(100_000, "rows used to fit the rescaler when streaming an HDF5 "
                                         "file", "int")
    multi_worker: bool = option(False, "train with tf.distribute.MultiWorkerMirroredStrategy "
                                       "over the cluster in TF_CONFIG (or the SLURM job step); "
                                       "only the chief writes the run directory", "bool")
    deconvolve: bool = option(False, "learn the error-free DF from a catalogue with errors: "
                                     "maximise the likelihood of each star under the flow "
                                     "convolved with its error model (tfgalflow.deconvolution; "
                                     "in-memory data only; with reduced coordinates the errors "
                                     "stay in the catalogue's columns)", "bool")
    noise_samples: int = option(16, "noise draws K per star and step of the deconvolution "
                                    "estimator (cost ~K; bias of log p ~ -1/K)", "int")
    noise_proposal: str = option(
        "tilted", "where the deconvolution estimator draws each star's candidates: 'tilted' "
        "(its error model tilted along the gradient of log f at the observed star, clipped to "
        "one sigma: same expectation, lower variance where the DF changes across the errors; "
        "one extra gradient of f per star and step) or 'kernel' (the error model itself)",
        "str")
    selection_r_max: float | None = option(
        None, "the catalogue kept the stars whose *observed* radius |x| < this (catalogue units; "
        "none: no cut after the noise): the deconvolution adds the selection's normaliser "
        "log P_sel to the loss, so the fitted DF is not pushed low near the cut (needs "
        "deconvolve)", "float?")
    noise_per_pass: int = option(2, "noise draws per differentiated pass of the deconvolution "
                                     "gradient: k >= 1 evaluates all K draws without a tape, "
                                     "then differentiates them k at a time (memory ~k, flat in "
                                     "K; one extra forward pass); 0 differentiates all K at "
                                     "once (a little faster; memory grows ~K)", "int")

    def __post_init__(self) -> None:
        coerce_fields(self)

        def check(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise InputError(f"TrainConfig.{name} = {getattr(self, name)!r}: "
                                 f"expected {expected}")

        for name, low in (("layers", 1), ("bins", 2), ("epochs", 1), ("batch_size", 1),
                          ("patience", 0), ("checkpoint_every", 0), ("keep_checkpoints", 0),
                          ("seed", 0), ("members", 1), ("adapt_samples", 2),
                          ("steps_per_call", 1), ("noise_samples", 1), ("noise_per_pass", 0),
                          ("context_blocks", 0), ("context_width", 1)):
            validation.integer(getattr(self, name), f"TrainConfig.{name}", low=low)
        check(len(self.hidden) > 0 and all(h >= 1 for h in self.hidden), "hidden",
              "a non-empty list of positive widths, e.g. 64,64")
        for name in ("log_columns", "label_log_columns", "rescaling_labels",
                     "rescaling_columns"):
            cols = getattr(self, name)
            check(all(j >= 0 for j in cols) and len(set(cols)) == len(cols), name,
                  "distinct column indices >= 0")
        if self.label_dim is not None:
            validation.integer(self.label_dim, "TrainConfig.label_dim", low=0)
        validation.one_of(self.kind, "TrainConfig.kind", ("affine", "spline"))
        validation.one_of(self.coordinates, "TrainConfig.coordinates", COORDINATES)
        flow_log_columns(self.coordinates, self.log_columns)       # InputError where they can't
        validation.positive_number(self.lr, "TrainConfig.lr")
        if self.clip_norm is not None:
            validation.positive_number(self.clip_norm, "TrainConfig.clip_norm")
        validation.one_of(self.lr_schedule, "TrainConfig.lr_schedule", LR_SCHEDULES)
        validation.positive_number(self.lr_warmup, "TrainConfig.lr_warmup", allow_zero=True)
        if self.lr_warmup:
            check(self.lr_schedule != "exponential", "lr_warmup",
                  "0 with lr_schedule = 'exponential' (warm-up is for cosine and constant)")
        validation.one_of(self.noise_proposal, "TrainConfig.noise_proposal", NOISE_PROPOSALS)
        if self.support_r_max is not None:
            validation.positive_number(self.support_r_max, "TrainConfig.support_r_max")
            check(self.coordinates == "spherical", "support_r_max",
                  "none unless coordinates = 'spherical' (it bounds the flow's radius r)")
        if self.selection_r_max is not None:
            validation.positive_number(self.selection_r_max, "TrainConfig.selection_r_max")
            check(self.deconvolve, "selection_r_max",
                  "none without deconvolve (a noise-free catalogue's cut is its support, which "
                  "the plain fit learns)")
        validation.positive_number(self.label_noise, "TrainConfig.label_noise", allow_zero=True)
        validation.positive_number(self.weight_decay, "TrainConfig.weight_decay",
                                   allow_zero=True)
        validation.positive_number(self.label_lasso, "TrainConfig.label_lasso", allow_zero=True)
        check(self.label_noise == 0 or self.label_dim != 0, "label_noise",
              "0 for an unconditional flow (label_dim = 0)")
        check(self.label_lasso == 0 or self.label_dim != 0, "label_lasso",
              "0 for an unconditional flow (label_dim = 0)")
        check(all(float(k).is_integer() and k >= 0 and s > 0 for k, s in self.label_asinh)
              and len({k for k, _ in self.label_asinh}) == len(self.label_asinh),
              "label_asinh", "k:s pairs of distinct label columns k >= 0 and scales s > 0, "
              "e.g. 1:0.01")
        check(0.0 <= self.validation_split < 1.0, "validation_split", "a fraction in [0, 1)")
        check(self.seed + self.members - 1 < 2**31, "seed",
              f"seed + members - 1 < 2**31 ({self.members} members)")

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-able dict (tuples as lists); ``TrainConfig.from_dict(c.to_dict()) == c``."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        """Build from a mapping of field names; unknown keys -> InputError naming them."""
        check_keys(cls, d)
        return cls(**dict(d))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "TrainConfig":
        """Read a JSON (.json) or YAML (.yaml/.yml) file of fields, or a run's ``config.json``.

        Raises FileError if the file is missing or unparsable, InputError for unknown keys or bad
        values.
        """
        path = Path(path)
        d = _read_mapping(path)
        if d.get("format") == RUN_FORMAT:   # a run's config.json: its resolved training section
            if not isinstance(d.get("train"), Mapping):
                raise FileError(f"{path}: run config has no 'train' section")
            d = d["train"]
        try:
            return cls.from_dict(d)
        except InputError as exc:
            raise InputError(f"{path}: {exc}") from None

    def with_overrides(self, **overrides: Any) -> "TrainConfig":
        """A copy with some fields replaced (values may be text, as from the command line)."""
        check_keys(TrainConfig, overrides, "TrainConfig.with_overrides")
        return dataclasses.replace(self, **overrides)

    def flow_config(self, dim: int, label_dim: int, seed: int | None = None) -> Any:
        """The :class:`~tfgalflow.flows.FlowConfig` of this run for data of width ``dim`` and
        ``label_dim`` labels (the member's ``seed``; default ``self.seed``); with reduced
        ``coordinates`` the data are the reduced columns and the log columns those of
        :func:`tfgalflow.coordinates.flow_log_columns` (log r and log v_t; log R and the given
        columns after the sixth); ``support_r_max`` bounds r (``FlowConfig.upper_bounds``).
        """
        from ..flows import FlowConfig
        log_columns = flow_log_columns(self.coordinates, self.log_columns)
        rescaled = self.conditional_rescaling and label_dim > 0
        return FlowConfig(dim=dim, label_dim=label_dim, layers=self.layers, hidden=self.hidden,
                          activation=self.activation, kind=self.kind, bins=self.bins,
                          log_columns=log_columns, label_log_columns=self.label_log_columns,
                          label_asinh=tuple((int(k), float(s)) for k, s in self.label_asinh),
                          conditional_rescaling=rescaled,
                          rescaling_labels=self.rescaling_labels if rescaled else (),
                          rescaling_columns=self.rescaling_columns if rescaled else (),
                          context_blocks=self.context_blocks if label_dim > 0 else 0,
                          context_width=self.context_width,
                          upper_bounds=() if self.support_r_max is None else (
                              (0, self.support_r_max),),          # r, column 0 of (r, v_r, v_t)
                          seed=self.seed if seed is None else seed)

    @classmethod
    def field_help(cls) -> dict[str, tuple[str, str]]:
        """{field: (kind, help)} for building command-line flags."""
        return field_help(cls)


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
        kind = "JSON" if suffix == ".json" else "YAML/JSON"
        raise FileError(f"{path}: not valid {kind}: {exc}") from None
    if not isinstance(d, dict):
        raise FileError(f"{path}: expected a mapping of settings at the top level, got "
                        f"{type(d).__name__}")
    return d
