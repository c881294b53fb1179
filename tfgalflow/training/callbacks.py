"""Keras callbacks of a training run and the counters its checkpoints carry.

* :class:`MemberState`: epochs done and the early-stopping state, saved in every checkpoint.
* :class:`ResumableEarlyStopping`: Keras EarlyStopping whose state survives a resume.
* :class:`RunCheckpoint`: writes the periodic and best checkpoints after each epoch.
* :class:`StepProgbar`: Keras' progress bar, counting optimizer steps (batches) per epoch.
* :class:`HistoryLogger`: Keras' CSVLogger writing history.csv with epochs counted from 1.

This module imports TensorFlow and tf-keras; :mod:`tfgalflow.training.fit` imports it only when a
member is trained.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import tensorflow as tf
import tf_keras as keras

from ..errors import InputError


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
    from a checkpoint, applied right after that reset. ``patience`` 0 means never stop.
    """

    def __init__(self, monitor: str, patience: int, verbose: int):
        super().__init__(monitor=monitor, mode="min",
                         patience=patience if patience > 0 else math.inf,
                         restore_best_weights=True, verbose=verbose)
        self._pending = None

    def resume_from(self, best: float, best_epoch: int, wait: int,
                    best_weights: list | None) -> None:
        """Continue from a checkpoint's state: the best loss, its 0-based epoch, the epochs
        waited since, and the best weights (None: not known).
        """
        self._pending = (best, best_epoch, wait, best_weights)

    def on_train_begin(self, logs=None):
        """Restore the early-stopping state of a resumed run before the first epoch."""
        super().on_train_begin(logs)
        if self._pending is not None:
            self.best, self.best_epoch, self.wait, self.best_weights = self._pending
            self._pending = None


class RunCheckpoint(keras.callbacks.Callback):
    """After each epoch E (1-based count): record the early-stopping state, save ckpt-E every
    ``every`` epochs and best/ckpt-E when the monitored loss improved. Non-finite losses stop the
    run with an InputError.

    Args:
        state: the MemberState inside the checkpoint both managers save.
        early: the run's ResumableEarlyStopping (its best, best_epoch, wait are recorded).
        periodic: ``tf.train.CheckpointManager`` of ``checkpoints/``.
        best: ``tf.train.CheckpointManager`` of ``checkpoints/best/``.
        every: period k in epochs (0: no periodic checkpoints).
    """

    def __init__(self, state: MemberState, early: ResumableEarlyStopping, periodic: Any,
                 best: Any, every: int):
        super().__init__()
        self.state, self.early, self.every = state, early, every
        self.periodic, self.best_manager = periodic, best

    def on_epoch_end(self, epoch, logs=None):
        """Stop on a non-finite loss; save ckpt-E every k epochs and best/ckpt-E on improvement."""
        bad = {k: v for k, v in (logs or {}).items() if not np.isfinite(v)}
        done = epoch + 1
        if bad:
            raise InputError(f"training diverged in epoch {done}: {bad}; lower the learning rate "
                             f"(--lr) or check the data for extreme values")
        self.state.epoch.assign(done)
        self.state.best.assign(self.early.best)
        self.state.best_epoch.assign(self.early.best_epoch)
        self.state.wait.assign(self.early.wait)
        self.state.stopped.assign(bool(self.model.stop_training))
        if self.early.best_epoch == epoch:
            self.best_manager.save(checkpoint_number=done)
        if self.every and done % self.every == 0:
            self.periodic.save(checkpoint_number=done)


class StepProgbar(keras.callbacks.ProgbarLogger):
    """Keras' progress bar (``verbose`` 1 or 2) counting optimizer steps instead of train calls.

    With ``steps_per_call`` K > 1 one call of the compiled train function runs up to K optimizer
    steps, and Keras counts calls (its ``steps_per_epoch`` is the number of calls). This bar's
    target is the epoch's optimizer steps (batches), and after call i it shows
    ``steps_after_calls(i + 1)`` of them; times per step are per optimizer step.

    Args:
        steps_per_epoch: optimizer steps per epoch, ceil(n_train / B).
        steps_after_calls: optimizer steps done after the first c calls of an epoch
            (:attr:`tfgalflow.training.data.Pipelines.steps_after_calls`).
    """

    def __init__(self, steps_per_epoch: int, steps_after_calls: Callable[[int], int]):
        super().__init__(count_mode="steps")
        self.steps_per_epoch, self.steps_after_calls = steps_per_epoch, steps_after_calls

    def set_params(self, params):
        """The bar's total: optimizer steps per epoch (not compiled calls)."""
        super().set_params(params)
        self.target = self.steps_per_epoch

    def on_train_batch_end(self, batch, logs=None):
        """Advance the bar to the last optimizer step that compiled call ``batch`` ran."""
        # Keras shows batch + 1 done: pass the index of the last optimizer step of call `batch`
        super().on_train_batch_end(self.steps_after_calls(batch + 1) - 1, logs)


class HistoryLogger(keras.callbacks.CSVLogger):
    """Keras' CSVLogger (appending to ``history.csv``) with epochs numbered from 1, as in the logs
    and the checkpoint names: the row of epoch E holds the losses of the E-th pass, and ``ckpt-E``
    the state after it. Keras passes 0-based epoch indices to callbacks.
    """

    def __init__(self, path: str):
        super().__init__(path, append=True)

    def on_epoch_end(self, epoch, logs=None):
        """Write the row of epoch ``epoch`` (0-based in Keras) numbered from 1."""
        super().on_epoch_end(epoch + 1, logs)
