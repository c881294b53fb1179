"""Training runs: fit a Flow (or a seed ensemble of flows) with Keras, checkpoint, resume, reload.

A run minimises the negative log-likelihood per point (maximum likelihood; Papamakarios et al.
2021, "Normalizing Flows for Probabilistic Modeling and Inference", sec. 3.1)

    L(θ) = -(1/N) Σ_n log p_θ(x_n | c_n)          [nats per point; x in physical units]

with Adam (Kingma & Ba 2015) under a learning-rate schedule η(t), t = optimizer step,
T = epochs × steps:

    constant      η(t) = η0
    cosine        η(t) = η0 (1 + cos(π t / T)) / 2          (Loshchilov & Hutter 2017, no restarts)
    exponential   η(t) = η0 · 0.01^(t / T)                  (η falls 100× over the run)

and, with ``weight_decay`` λ > 0, the decoupled decay of AdamW after each Adam update,
w ← w − η(t) λ w (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization"); with
``label_lasso`` λ_c > 0 the loss gains the group lasso λ_c Σ_j ‖V_{j·}‖₂ over the weights of each
label column j (``Flow.set_label_lasso``), which drops the label columns the density does not need.

Reproducibility: a member's whole run is a function of (data, TrainConfig, member seed). The seed
fixes the weight initialisation (``FlowConfig.seed``), the train/validation split and the order of
every epoch (a stateless permutation keyed by (seed, epoch)), so an interrupted run resumed from a
checkpoint repeats exactly the epochs the uninterrupted run would have done.

Data: a Catalogue or an array [N, D] in memory (validation = a seeded random subset), or an HDF5
catalogue streamed in batches through :class:`tfgalflow.catalogue.HDF5Catalogue` (validation = the
last rows of the file, rescaler fitted on an evenly strided subsample of at most
``adapt_samples`` rows). With ``steps_per_call`` K > 1 each epoch's batches reach
``Flow.train_step`` as stacks [K, B, D] (K optimizer steps in one compiled call, the same updates
as K calls; stacks never cross an epoch). Keras then runs fewer calls than steps per epoch; the
progress bar, t above and the checkpoints count optimizer steps (batches) and epochs.

The package's parts:

* :mod:`~tfgalflow.training.config`: :class:`TrainConfig` (no TensorFlow import, so it and the
  CLI parser built from its fields load fast);
* :mod:`~tfgalflow.training.data`: in-memory and HDF5-streamed data, splits, per-epoch batches
  and stacks;
* :mod:`~tfgalflow.training.rundir`: the run directory (layout below), config.json, history.csv,
  checkpoint names, finished members;
* :mod:`~tfgalflow.training.callbacks`: the Keras callbacks of a run (imports TensorFlow);
* :mod:`~tfgalflow.training.fit`: :func:`train`, :func:`resume`, :func:`load_run`,
  :func:`load_member`.

Run directory (``RUN_FORMAT_VERSION``)::

    RUN/config.json                     resolved TrainConfig, FlowConfig, data description,
                                        member seeds, verbosity, versions
    RUN/member_000/history.csv          one row per finished epoch: epoch (1-based), loss, val_loss
    RUN/member_000/checkpoints/ckpt-E.*       full state after E epochs (E = k, 2k, ..., the
                                              last ``keep_checkpoints`` of them): model,
                                              optimizer, epoch counter, early-stopping state
    RUN/member_000/checkpoints/best/ckpt-E.*  the same after the epoch E with the lowest monitored
                                              loss
    RUN/member_000/final/               weights.* (best-validation weights) + summary.json,
                                        written atomically once the member finished
    RUN/member_000/tensorboard/         optional TensorBoard logs
"""
from __future__ import annotations

from .config import EXPONENTIAL_FINAL_FRACTION, LR_SCHEDULES, TrainConfig
from .data import HDF5_SUFFIXES, STREAM_SHUFFLE_ROWS, split_indices
from .fit import learning_rate, load_member, load_run, resume, train
from .rundir import (
    CONFIG_FILE, HISTORY_FILE, OUTLIER_MARGIN, RUN_FORMAT, RUN_FORMAT_VERSION, WEIGHTS_PREFIX,
    member_finished, member_name, member_summary, outlying_members, read_history,
    read_run_config,
)

__all__ = [
    "CONFIG_FILE", "EXPONENTIAL_FINAL_FRACTION", "HDF5_SUFFIXES", "HISTORY_FILE", "LR_SCHEDULES",
    "RUN_FORMAT", "RUN_FORMAT_VERSION", "STREAM_SHUFFLE_ROWS", "TrainConfig", "WEIGHTS_PREFIX",
    "OUTLIER_MARGIN", "learning_rate", "load_member", "load_run", "member_finished", "member_name",
    "member_summary", "outlying_members", "read_history",
    "read_run_config", "resume", "split_indices", "train",
]
