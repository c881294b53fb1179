"""Validation tasks with exact answers: simulate events at labels, train a flow, measure it.

:mod:`.base` defines the structure every task shares (:class:`Task`, :class:`TaskConfig`, the
registry, :func:`run_task`); one module per task registers itself:

``gaussian_field``  :mod:`.gaussian_field` - a 2-D conditional Gaussian on a 10 x 10 label grid
                    (the FEDHEX use: interpolating a sparse grid of event distributions)
``galaxy_population`` :mod:`.galaxy_population` - 8-D stars of toy galaxies conditioned on their
                    properties, whole galaxies held out (the GalacticFlow use)
``photoz``          :mod:`.photoz` - 1-D redshift posteriors p(z | 10 fluxes + 10 errors),
                    bimodal from break confusion; fresh galaxies held out (the photo-z use)

Example::

    >>> from tfgalflow.tasks import run_task
    >>> report = run_task("gaussian_field", "studies/gaussian_field", train_overrides={"epochs":
    50})
    >>> report["targets"]["kl"]["met"]

Command line: ``tfgalflow task list``; ``tfgalflow task run gaussian_field --out DIR [--epochs
50]``.
"""

from __future__ import annotations

from .base import (
    REPORT_FILE,
    TASKS,
    Target,
    Task,
    TaskConfig,
    get_task,
    option,
    register,
    run_task,
    task_names,
)
from .galaxy_population import GalaxyPopulation, GalaxyPopulationConfig
from .gaussian_field import GaussianField, GaussianFieldConfig
from .photoz import PhotoZConfig, PhotoZTask

__all__ = [
    "Task",
    "TaskConfig",
    "Target",
    "TASKS",
    "register",
    "get_task",
    "task_names",
    "run_task",
    "option",
    "REPORT_FILE",
    "GaussianField",
    "GaussianFieldConfig",
    "GalaxyPopulation",
    "GalaxyPopulationConfig",
    "PhotoZTask",
    "PhotoZConfig",
]
