"""What a validation task is, the registry of tasks by name, and ``run_task``.

A task is a conditional distribution p(x | c) that we can simulate and (usually) evaluate exactly,
a grid of training labels, a held-out protocol (labels never trained on: grid nodes left out, and
random labels between the nodes), a default training configuration, and metrics with targets.
:func:`run_task` simulates the training events, trains a flow on them
(:func:`tfgalflow.training.train`), evaluates it at the held-out labels against the exact answer,
and writes ``report.json`` and figures:

    OUT/task.json      task name, TaskConfig and TrainConfig (a rerun must match it)
    OUT/run/           the training run (config.json, histories, checkpoints, final weights)
    OUT/report.json    metrics per held-out label, summaries, targets (measured, threshold, met)
    OUT/*.png          the task's figures

Rerunning into the same OUT resumes an interrupted training run (or reuses a finished one) and
evaluates again; every file is written atomically.

Seeds live in one place, ``TaskConfig.seed``: simulation, held-out labels, training
(``TrainConfig.seed``) and evaluation each draw from their own stream of it (:meth:`Task.rng`).

NumPy only at import time: TensorFlow is imported when a task trains or evaluates.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping

import numpy as np

from ..atomic import json_ready, write_json
from ..config_fields import check_keys, coerce_fields, evaluation_only_fields, field_help, option
from ..errors import FileError, InputError

TASK_FILE = "task.json"
REPORT_FILE = "report.json"
RUN_DIR = "run"
#: Random streams of one task seed (``Task.rng(stream)``): each purpose draws from its own.
STREAMS = ("train_events", "heldout_labels", "evaluation")


@dataclass(frozen=True)
class TaskConfig:
    """Settings of a task (sizes, held-out protocol, evaluation), JSON-serialisable and validated.

    Subclasses add their fields with :func:`option`; every field is a ``tfgalflow task run NAME``
    flag (``--events-per-node`` for ``events_per_node``).
    """

    seed: int = option(
        0,
        "seed of everything: simulation, held-out labels, training (TrainConfig.seed "
        "is set to it) and evaluation",
        "int",
    )

    def __post_init__(self) -> None:
        coerce_fields(self)
        if not 0 <= self.seed < 2**31:
            raise InputError(
                f"{type(self).__name__}.seed = {self.seed}: expected an integer in [0, 2**31)"
            )

    def to_dict(self) -> dict:
        """JSON-able dict; ``type(c).from_dict(c.to_dict()) == c``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TaskConfig":
        """Build from field names; unknown keys -> InputError naming them and the allowed ones."""
        check_keys(cls, d)
        return cls(**dict(d))

    def with_overrides(self, **overrides: Any) -> "TaskConfig":
        """A copy with some fields replaced (values may be text, as from the command line)."""
        return type(self).from_dict({**self.to_dict(), **overrides})

    @classmethod
    def field_help(cls) -> dict[str, tuple[str, str]]:
        """{field: (kind, help)} for building command-line flags."""
        return field_help(cls)


@dataclass(frozen=True)
class Target:
    """One measured figure against its threshold: ``met`` = measured <= (or >=) threshold."""

    description: str
    measured: float
    threshold: float
    at_most: bool = True

    @property
    def met(self) -> bool:
        """Whether the measured figure satisfies the threshold (False if not finite)."""
        ok = self.measured <= self.threshold if self.at_most else self.measured >= self.threshold
        return bool(math.isfinite(self.measured) and ok)

    def to_dict(self) -> dict:
        """JSON-able dict: description, measured, threshold, relation, met."""
        return {
            "description": self.description,
            "measured": self.measured,
            "threshold": self.threshold,
            "relation": "<=" if self.at_most else ">=",
            "met": self.met,
        }


class Task(abc.ABC):
    """A validation problem with an exact answer (subclass it and :func:`register` it).

    A subclass sets ``name``, ``description``, ``config_type`` (its :class:`TaskConfig`), ``dim``,
    ``label_dim``, ``label_names``, and implements

    * :meth:`simulate` ``(labels [N, C], rng) -> x [N, D]``: one event per label row;
    * :meth:`log_prob` ``(x [N, D], labels [N, C]) -> [N]``: the exact log p(x | c) (normalised);
    * :meth:`training_labels` ``-> [M, C]`` and :meth:`heldout_labels` ``-> {group: [K, C]}``;
    * :meth:`train_config` (the default TrainConfig), :meth:`evaluate` (metrics), :meth:`targets`,
      and optionally :meth:`figures`.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    config_type: ClassVar[type[TaskConfig]] = TaskConfig
    dim: ClassVar[int]
    label_dim: ClassVar[int]
    label_names: ClassVar[tuple[str, ...]]

    def __init__(self, config: TaskConfig | Mapping[str, Any] | None = None):
        if config is None:
            config = self.config_type()
        elif isinstance(config, Mapping):
            config = self.config_type.from_dict(config)
        if not isinstance(config, self.config_type):
            raise InputError(
                f"task {self.name!r}: config must be a {self.config_type.__name__}, got "
                f"{type(config).__name__}"
            )
        self.config = config

    # -- what a task provides ---------------------------------------------------------------------
    @abc.abstractmethod
    def simulate(self, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One event x [D] per row of ``labels`` [N, C]: x [N, D] float64."""

    @abc.abstractmethod
    def log_prob(self, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """The exact log p(x | c) [N] (nats, per unit volume of x) for x [N, D], labels [N, C]."""

    @abc.abstractmethod
    def training_labels(self) -> np.ndarray:
        """The label nodes [M, C] whose events are trained on."""

    @abc.abstractmethod
    def heldout_labels(self) -> dict[str, np.ndarray]:
        """The held-out labels by group name, each [K, C] (never trained on)."""

    @abc.abstractmethod
    def train_config(self) -> Any:
        """The default :class:`~tfgalflow.training.TrainConfig` of this task (seed set by
        run_task).
        """

    @abc.abstractmethod
    def evaluate(self, model: Any) -> dict:
        """Metrics of a trained density ``model`` (a :class:`~tfgalflow.density.Density`):
        JSON-able.
        """

    @abc.abstractmethod
    def targets(self, metrics: Mapping[str, Any]) -> dict[str, Target]:
        """The task's targets, measured from ``evaluate``'s metrics."""

    def figures(self, report: Mapping[str, Any], model: Any, out_dir: Path) -> list[str]:
        """Draw figures into ``out_dir`` (atomically); the file names written. Default: none."""
        return []

    # -- shared machinery -------------------------------------------------------------------------
    @property
    def events_per_node(self) -> int:
        """Events simulated per training node (``config.events_per_node`` if the config has it)."""
        return int(getattr(self.config, "events_per_node", 1000))

    def rng(self, stream: str) -> np.random.Generator:
        """The generator of one purpose (one of ``STREAMS``) for this task's seed."""
        return np.random.default_rng([self.config.seed, STREAMS.index(stream)])

    def training_data(self) -> tuple[np.ndarray, np.ndarray]:
        """(x [M·n, D] float32, labels [M·n, C] float32): ``events_per_node`` events at each
        node.
        """
        labels = np.repeat(self.training_labels(), self.events_per_node, axis=0)
        x = self.simulate(labels, self.rng("train_events"))
        return x.astype(np.float32), labels.astype(np.float32)


# ---- registry -----------------------------------------------------------------------------------

TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: make the task available by ``cls.name`` (to get_task, run_task, the
    CLI).
    """
    if cls.name in TASKS and TASKS[cls.name] is not cls:
        raise InputError(
            f"a task named {cls.name!r} is already registered ({TASKS[cls.name].__name__})"
        )
    TASKS[cls.name] = cls
    return cls


def task_names() -> list[str]:
    """Names of the registered tasks, sorted."""
    return sorted(TASKS)


def get_task(
    name: str, config: TaskConfig | Mapping[str, Any] | None = None, **overrides: Any
) -> Task:
    """The registered task ``name`` with its config (default, a config or a dict) and overrides."""
    if name not in TASKS:
        raise InputError(f"no task named {name!r}; known tasks: {task_names()}")
    cls = TASKS[name]
    task = cls(config)
    if overrides:
        task = cls(task.config.with_overrides(**overrides))
    return task


# ---- running a task -----------------------------------------------------------------------------


def _check_task_file(out: Path, settings: dict, evaluation_only: frozenset[str] = frozenset()
                     ) -> None:
    """Write OUT/task.json, or check that an existing one records the same settings.

    Config fields in ``evaluation_only`` may differ: the run is evaluated again with the new
    values, which task.json then records. ``train.members`` may grow (the run's new members
    train, the others are kept), never shrink.
    """
    path = out / TASK_FILE
    if not path.is_file():
        write_json(path, settings)
        return
    try:
        recorded = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FileError(f"{path}: corrupt task file: {exc}") from None
    # A setting the recorded file lacks was added to the package after that run was made (the run
    # used its default behaviour): only the settings both record are compared.
    differ = [
        f"{section}.{k}"
        for section in ("task", "config", "train")
        for k in sorted(set(_as_dict(recorded.get(section))) & set(_as_dict(settings[section])))
        if _as_dict(recorded.get(section)).get(k) != _as_dict(settings[section]).get(k)
    ]
    grows = ("train.members" in differ
             and settings["train"]["members"] > recorded["train"]["members"])
    blocking = [d for d in differ if d.removeprefix("config.") not in evaluation_only
                and not (d == "train.members" and grows)]
    if blocking:
        raise InputError(
            f"{out} holds a run of other settings (differing: {', '.join(blocking)}); use a new "
            f"--out directory, or the same settings to resume"
        )
    if differ:
        write_json(path, settings)


def _as_dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {"value": value}


def run_task(
    name: str,
    out_dir: str | os.PathLike,
    overrides: Mapping[str, Any] | None = None,
    train_overrides: Mapping[str, Any] | None = None,
    *,
    verbose: int = 1,
) -> dict:
    """Simulate, train (resumable), evaluate task ``name``; write OUT/report.json and figures.

    Args:
        name: a registered task (:func:`task_names`).
        out_dir: the task directory (created; a rerun with the same settings resumes or reuses the
            training run in OUT/run and evaluates again; one with more ``members`` trains just
            the new members).
        overrides: TaskConfig fields to change (e.g. ``{"events_per_node": 200, "seed": 3}``).
        train_overrides: TrainConfig fields to change (e.g. ``{"epochs": 20}``); ``seed`` and
            ``label_dim`` are the task's own.
        verbose: Keras progress output of training (0, 1, 2).

    Returns:
        the report written to OUT/report.json: {"task", "config", "train", "metrics", "targets",
        "all_targets_met", "outlying_members", "figures"}; "outlying_members" lists the ensemble
        members whose best validation loss lies far above the others'
        (:func:`tfgalflow.training.outlying_members`: check them before trusting the targets).
    """
    from ..training import TrainConfig, outlying_members, resume, train

    task = get_task(name, **dict(overrides or {}))
    train_overrides = dict(train_overrides or {})
    reserved = sorted({"seed", "label_dim"} & set(train_overrides))
    if reserved:
        raise InputError(f"train_overrides: {reserved} are set by the task (use the task's seed)")
    config = task.train_config()
    if not isinstance(config, TrainConfig):
        raise InputError(f"task {name!r}: train_config() must return a TrainConfig")
    config = config.with_overrides(
        **train_overrides, seed=task.config.seed, label_dim=task.label_dim
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_task_file(
        out, {"task": name, "config": task.config.to_dict(), "train": config.to_dict()},
        evaluation_only_fields(type(task.config)),
    )

    x, labels = task.training_data()
    run_dir = out / RUN_DIR
    if (run_dir / "config.json").is_file():
        model = resume(run_dir, data=x, labels=labels, verbose=verbose, members=config.members)
    else:
        model = train(
            x, config, run_dir, labels=labels, label_names=list(task.label_names), verbose=verbose
        )
    metrics = task.evaluate(model)
    targets = task.targets(metrics)
    report = {
        "task": name,
        "description": task.description,
        "config": task.config.to_dict(),
        "train": config.to_dict(),
        "n_train_events": int(len(x)),
        "run_dir": RUN_DIR,
        "metrics": metrics,
        "targets": {k: t.to_dict() for k, t in targets.items()},
        "all_targets_met": all(t.met for t in targets.values()),
        "outlying_members": outlying_members(run_dir),
    }
    report["figures"] = task.figures(report, model, out)
    report = json_ready(report)
    write_json(out / REPORT_FILE, report)
    return report
