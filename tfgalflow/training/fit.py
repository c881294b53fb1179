"""Fitting runs: train a member (or an ensemble of seeds), resume an interrupted run, load a
finished one.

Each member minimises the mean negative log-likelihood with Adam under
:func:`learning_rate`'s schedule, writes its history and checkpoints into the run directory
(:mod:`tfgalflow.training.rundir`) and finally its best-validation weights. TensorFlow is imported
inside the functions that need it.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..atomic import atomic_dir, write_json
from ..errors import FileError, InputError
from .config import EXPONENTIAL_FINAL_FRACTION, TrainConfig
from .data import (
    as_training_data, check_deconvolution, check_sizes, check_support, describe, in_coordinates,
    reopen, select_labels, without_labels,
)
from .rundir import (
    BEST_DIR, CHECKPOINTS_DIR, CONFIG_FILE, DEFAULT_VERBOSE, FINAL_DIR, HISTORY_FILE, SUMMARY_FILE,
    WEIGHTS_PREFIX,
    checkpoint_epoch, final_weights_prefix, grow_members, member_finished, new_run,
    outlying_members,
    read_history, read_run_config, truncate_history,
)

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf
    from ..catalogue import Catalogue
    from ..axisymmetric_df import AxisymmetricDF
    from ..spherical_df import SphericalDF
    from ..model import Ensemble, Flow

_log = logging.getLogger(__name__)


def learning_rate(config: TrainConfig, steps_per_epoch: int) -> Any:
    """η(t) of ``config.lr_schedule`` as a Keras schedule of the optimizer step t.

    A float for "constant"; with T = epochs × steps_per_epoch:

        constant      η(t) = η0
        cosine        η(t) = η0 (1 + cos(π t / T)) / 2     (Loshchilov & Hutter 2017, no restarts)
        exponential   η(t) = η0 · 0.01^(t / T)             (η falls 100× over the run)

    With ``config.lr_warmup`` = w epochs (cosine or constant), W = round(w × steps_per_epoch)
    steps of linear warm-up come first, η(t) = η0 t / W (Goyal et al. 2017), and the schedule
    runs over the remaining T − W steps (cosine: η0 (1 + cos(π (t − W) / (T − W))) / 2). A
    warm-up as long as the run or longer is cut to T − 1 steps (a short trial run of a task whose
    default has a warm-up still trains).
    """
    import tf_keras as keras
    total = max(1, config.epochs * steps_per_epoch)
    if config.lr_warmup:
        warm = min(total - 1, max(1, round(config.lr_warmup * steps_per_epoch)))
        # CosineDecay's warm-up: from 0 to warmup_target over warm steps, then the decay from
        # it (alpha = 1: no decay, the constant schedule)
        return keras.optimizers.schedules.CosineDecay(
            0.0, decay_steps=total - warm, alpha=1.0 if config.lr_schedule == "constant" else 0.0,
            warmup_target=config.lr, warmup_steps=warm)
    if config.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(config.lr, decay_steps=total, alpha=0.0)
    if config.lr_schedule == "exponential":
        return keras.optimizers.schedules.ExponentialDecay(
            config.lr, decay_steps=total, decay_rate=EXPONENTIAL_FINAL_FRACTION)
    return config.lr


def _seed_everything(seed: int) -> None:
    """The one place that seeds Python, NumPy and TensorFlow's global generators for a member."""
    import tf_keras as keras
    keras.utils.set_random_seed(seed)


def _restore(checkpoint: Any, path: str, written: bool = False) -> None:
    """Restore every object of ``checkpoint`` from ``path``; FileError naming the files if that
    fails.

    ``written`` marks files from ``Checkpoint.write`` (no ``save_counter``, unlike
    CheckpointManager saves). Every saved value must match an object and every object must be
    restored (``assert_consumed``).
    """
    import tensorflow as tf
    try:
        # Checkpoints written before flows recorded their training label range have no
        # label_min/label_max: everything else must match, and the range becomes unknown (±inf).
        legacy = not any("label_min" in name for name, _ in tf.train.list_variables(path))
        status = checkpoint.read(path) if written else checkpoint.restore(path)
        model = getattr(checkpoint, "model", None)
        if legacy and model is not None and hasattr(model, "label_min"):
            status.expect_partial()
            model.label_min.assign(tf.fill(tf.shape(model.label_min), -float("inf")))
            model.label_max.assign(tf.fill(tf.shape(model.label_max), float("inf")))
        else:
            status.assert_consumed()
    except (tf.errors.OpError, AssertionError, ValueError) as exc:
        raise FileError(f"{path}.index / {path}.data-*: cannot restore checkpoint (missing, "
                        f"corrupt or from another architecture): "
                        f"{str(exc).splitlines()[0][:300]}") from None


def _run_train_config(run: dict) -> TrainConfig:
    """The TrainConfig recorded in a run's parsed config.json.

    Runs written before ``keep_checkpoints`` existed kept every periodic checkpoint; their
    config.json lacks the field, which is read as 0 (keep all), so a resume keeps doing that.
    """
    return TrainConfig.from_dict({"keep_checkpoints": 0, **run["train"]})


# ---- one member ---------------------------------------------------------------------------------

def _fit_member(run_dir: Path, run: dict, k: int, data: Any, *, strategy: Any = None,
                verbose: int = 1, callbacks: Sequence[Any] = ()) -> "Flow":
    """Train member k of the run (continuing from its latest checkpoint if any) and write its
    final weights.
    """
    import tensorflow as tf
    import tf_keras as keras
    from ..flows import FlowConfig
    from ..model import Flow
    from .callbacks import (
        HistoryLogger, MemberState, ResumableEarlyStopping, RunCheckpoint, StepProgbar,
    )

    config = _run_train_config(run)
    member = run["members"][k]
    seed, member_dir = int(member["seed"]), run_dir / member["name"]
    flow_config = dataclasses.replace(FlowConfig.from_dict(run["flow"]), seed=seed)

    _seed_everything(seed)
    strategy = strategy or tf.distribute.get_strategy()
    pipelines = data.pipelines(config, seed, _steps_per_call(config, strategy))
    if data.streamed:                 # multi-worker: each worker streams its own shard
        from .distributed import num_workers
        if num_workers(strategy) > 1:
            pipelines.shard_for_workers(num_workers(strategy))
    with strategy.scope():
        flow = Flow(flow_config)
        if config.deconvolve:     # loss: the noise-convolved likelihood (tfgalflow.deconvolution)
            from ..deconvolution import NoiseModel
            flow.set_noise_model(NoiseModel(data.error_kind, config.noise_samples, seed,
                                            data.observed.shape[1],
                                            coordinates=config.coordinates,
                                            per_pass=config.noise_per_pass,
                                            selection_r_max=config.selection_r_max,
                                            proposal=config.noise_proposal))
        if config.label_noise > 0:
            flow.set_label_noise(config.label_noise, seed)
        if config.label_lasso > 0:
            flow.set_label_lasso(config.label_lasso)
        optimizer = keras.optimizers.Adam(learning_rate(config, pipelines.steps_per_epoch),
                                          global_clipnorm=config.clip_norm,
                                          weight_decay=config.weight_decay or None)
        flow.compile(optimizer=optimizer, jit_compile=_jit_compile(config, strategy))
        optimizer.build(flow.trainable_variables)   # slots exist before a restore: checked whole
    state = MemberState()
    checkpoint = tf.train.Checkpoint(model=flow, optimizer=optimizer, state=state)
    ckpt_dir = member_dir / CHECKPOINTS_DIR
    periodic = tf.train.CheckpointManager(checkpoint, str(ckpt_dir),
                                          max_to_keep=config.keep_checkpoints or None,
                                          checkpoint_name="ckpt")
    best = tf.train.CheckpointManager(checkpoint, str(ckpt_dir / BEST_DIR), max_to_keep=1,
                                      checkpoint_name="ckpt")
    monitor = "val_loss" if pipelines.n_val else "loss"
    early = ResumableEarlyStopping(monitor, config.patience, verbose=1 if verbose else 0)

    latest = max(periodic.latest_checkpoint, best.latest_checkpoint, key=checkpoint_epoch)
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
        if initial_epoch != checkpoint_epoch(latest):
            raise FileError(f"{latest}.index: checkpoint number {checkpoint_epoch(latest)} "
                            f"disagrees with its saved epoch counter {initial_epoch}")
        early.resume_from(float(state.best.numpy()), int(state.best_epoch.numpy()),
                          int(state.wait.numpy()), best_weights)
    history_path = member_dir / HISTORY_FILE
    truncate_history(history_path, initial_epoch)

    if initial_epoch < config.epochs and not bool(state.stopped.numpy()):
        run_callbacks = [early,
                         RunCheckpoint(state, early, periodic, best, config.checkpoint_every),
                         HistoryLogger(str(history_path)),
                         StepProgbar(pipelines.steps_per_epoch, pipelines.steps_after_calls)]
        if config.tensorboard:
            run_callbacks.append(keras.callbacks.TensorBoard(str(member_dir / "tensorboard"),
                                                             write_graph=False))
        try:
            flow.fit(pipelines.train_dataset(initial_epoch, config.epochs), epochs=config.epochs,
                     initial_epoch=initial_epoch, steps_per_epoch=pipelines.calls_per_epoch,
                     validation_data=pipelines.val_dataset(),
                     callbacks=run_callbacks + list(callbacks), verbose=verbose)
        except tf.errors.OpError:
            # tf.data wraps exceptions of Python generators: give back the file's own error
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
    if flow.label_dim:        # which labels the flow uses (0: not at all; see the label lasso)
        names = run["data"].get("label_names") or [f"label_{j}" for j in range(flow.label_dim)]
        summary["label_weight_norms"] = dict(zip(names, map(float, flow.label_weight_norms())))
    _write_final(member_dir / FINAL_DIR, flow, summary)
    return flow


def _steps_per_call(config: TrainConfig, strategy: Any) -> int:
    """``config.steps_per_call``, or 1 (with a logged warning) under a strategy with several
    replicas.

    Keras splits every element of a distributed dataset along its first axis, which for a stack
    [K, B, D] is K, not the batch; ``Flow.train_step`` refuses stacks there. K only changes how
    many steps one call runs, never the updates, so falling back to K = 1 gives the same run.
    """
    replicas = strategy.num_replicas_in_sync
    if config.steps_per_call > 1 and replicas > 1:
        _log.warning("TrainConfig.steps_per_call = %d needs a single replica; the distribution "
                     "strategy has %d, so each call runs one optimizer step (steps_per_call = 1)",
                     config.steps_per_call, replicas)
        return 1
    return config.steps_per_call


def _jit_compile(config: TrainConfig, strategy: Any) -> bool:
    """``config.jit_compile``, or False (with a logged warning) for several replicas on CPU
    devices.

    XLA compiles the replicated train step for one CPU device and then cannot read the other
    replicas' variables ("Trying to access resource ... located in device CPU:1 from device
    CPU:0", TF 2.21; see https://www.tensorflow.org/xla/known_issues), so logical-CPU
    MirroredStrategy runs train in graph mode.
    """
    if not (config.jit_compile and strategy.num_replicas_in_sync > 1):
        return config.jit_compile
    if any("CPU" in d.upper() for d in strategy.extended.worker_devices):
        _log.warning("TrainConfig.jit_compile = True: XLA cannot compile a train step replicated "
                     "over %d CPU devices; training without XLA", strategy.num_replicas_in_sync)
        return False
    return config.jit_compile


def _write_final(final_dir: Path, flow: "Flow", summary: dict) -> None:
    """Write the final weights and summary.json into ``final_dir`` atomically (a good one is never
    lost).

    The weights are copied into a fresh, uncompiled Flow first, so the file holds the model alone
    (no optimizer state, no distribution-strategy wrappers) and reloads into ``Flow(config)``.
    """
    import tensorflow as tf
    from ..model import Flow
    plain = Flow(flow.config)
    plain.set_weights(flow.get_weights())
    with atomic_dir(final_dir, overwrite=True) as tmp:
        tf.train.Checkpoint(model=plain).write(str(tmp / WEIGHTS_PREFIX))
        write_json(tmp / SUMMARY_FILE, summary)


def load_member(run_dir: str | os.PathLike, run: dict, k: int) -> "Flow":
    """The trained Flow of member k from its final weights.

    Args:
        run_dir: the run directory.
        run: its parsed config.json (:func:`~tfgalflow.training.read_run_config`).
        k: member index, 0 <= k < len(run["members"]).

    Raises:
        FileError if the member has not finished (no final weights; the message says how to resume)
        or its weights or the flow section of config.json are corrupt.
    """
    import tensorflow as tf
    from ..flows import FlowConfig
    from ..model import Flow

    run_dir = Path(run_dir)
    member = run["members"][k]
    prefix = final_weights_prefix(run_dir, run, k)
    if not member_finished(run_dir, run, k):
        raise FileError(f"{prefix}.index: no final weights for {member['name']}; the run did not "
                        f"finish - continue it with `tfgalflow train --resume {run_dir}`")
    try:
        flow_config = dataclasses.replace(FlowConfig.from_dict(run["flow"]),
                                          seed=int(member["seed"]))
    except (InputError, TypeError, ValueError) as exc:
        raise FileError(f"{run_dir / CONFIG_FILE}: invalid flow section: {exc}") from None
    flow = Flow(flow_config)
    _restore(tf.train.Checkpoint(model=flow), str(prefix), written=True)
    return flow


# ---- public API ---------------------------------------------------------------------------------

def train(data: "Catalogue | np.ndarray | str | os.PathLike", config: TrainConfig,
          run_dir: str | os.PathLike, labels: Any = None,
          label_names: Sequence[str] | None = None,
          strategy: "tf.distribute.Strategy | None" = None, *, verbose: int = 1,
          callbacks: Sequence[Any] = ()) -> "Flow | Ensemble":
    """Fit a flow (or ``config.members`` flows differing only by seed) by maximum likelihood;
    write a run dir.

    Args:
        data: a Catalogue (its phase space [N, 6] and labels are used), an array x [N, D]
            (physical units), or a path: a catalogue .npz (loaded) or an .h5/.hdf5 file (streamed
            in batches; the rescaler is fitted on a subsample of ``config.adapt_samples`` rows and
            the last ``validation_split`` fraction of rows is the validation set), or a
            ``tfgalflow.catalogue.open_parquet(path, event_columns, label_columns)`` table
            (streamed likewise; validation rows spread evenly over the file).
        config: the TrainConfig; ``label_dim=None`` takes the data's labels, 0 ignores them.
        run_dir: new (or empty) directory for config.json, histories, checkpoints and final
            weights.
        labels: [N, C] conditioning labels for an array ``data`` (a Catalogue carries its own).
        label_names: names of the C label columns (recorded in config.json).
        strategy: a ``tf.distribute.Strategy``; model and optimizer are built in its scope and
            Keras splits every batch across its replicas. ``config.multi_worker`` without one
            builds ``MultiWorkerMirroredStrategy`` from TF_CONFIG or SLURM
            (:mod:`tfgalflow.training.distributed`); then only the chief writes ``run_dir``.
            With several replicas ``steps_per_call`` falls back to 1 (logged warning; Keras
            would split a stack [K, B, D] along K), which changes no update; with several CPU
            replicas ``jit_compile`` falls back to False (logged; an XLA limitation).
        verbose: Keras progress output (0 silent, 1 progress bar, 2 one line per epoch); recorded
            in config.json, so :func:`resume` keeps it.
        callbacks: extra Keras callbacks, run after the run's own (not with ``parallel``).

    Returns:
        the trained Flow (members == 1) or an Ensemble of the members, with best-validation
        weights.

    Raises:
        InputError for empty data, NaN/inf, wrong label width or labels missing for a conditional
        config; FileError if ``run_dir`` is not empty or a data file is missing/unreadable.
    """
    if not isinstance(config, TrainConfig):
        raise InputError(f"config must be a TrainConfig, got {type(config).__name__}")
    if config.multi_worker and strategy is None:    # first: before TensorFlow runs anything
        from .distributed import multi_worker_strategy
        strategy = multi_worker_strategy()
    data = as_training_data(data, labels, label_names)
    config = select_labels(data, config)
    if config.label_dim == 0 and data.label_dim:
        data = without_labels(data)
    check_deconvolution(data, config)      # before the reduction: it keeps errors in memory only
    check_support(data, config)            # the catalogue's positions, before the reduction
    data = in_coordinates(data, config)
    check_sizes(data, config)
    _check_tensorboard(config)
    flow_config = config.flow_config(data.dim, config.label_dim)    # validates the architecture
    from .distributed import remove_worker_dir, worker_run_dir
    run_dir, temporary = worker_run_dir(Path(run_dir), strategy)   # non-chief: a temporary dir
    run = new_run(run_dir, config, flow_config, describe(data, config), verbose=verbose)
    try:
        return _fit_members(run_dir, run, data, strategy=strategy, verbose=verbose,
                            callbacks=callbacks)
    finally:
        if temporary:
            remove_worker_dir(run_dir)


def resume(run_dir: str | os.PathLike, data: Any = None, labels: Any = None,
           strategy: "tf.distribute.Strategy | None" = None, *, verbose: int | None = None,
           callbacks: Sequence[Any] = (), members: int | None = None) -> "Flow | Ensemble":
    """Continue an interrupted run: finished members are loaded, the others continue from their
    latest checkpoint (or start over if they have none). The history continues as if never
    interrupted.

    ``members`` grows a run (finished or not) to that many ensemble members: the new member k
    trains with seed ``seed + k``, so the grown run equals one started with ``members``
    (command line: ``tfgalflow train --resume RUN --members K``). Fewer than recorded is an
    InputError; None keeps the recorded number.

    ``data`` is needed only for runs trained on in-memory arrays or Catalogues (checked against
    the recorded sha256); runs trained from a file re-read that file. ``verbose`` None keeps the
    verbosity the run was started with (recorded in config.json); 0, 1 or 2 override it.

    A ``multi_worker`` run resumes on every worker (all must call ``resume``, the same
    directory on a shared filesystem): each restores the chief's last checkpoint; a non-chief
    worker continues in a temporary copy of the run directory, deleted at the end. The epoch
    that was interrupted is repeated from its start (Keras ``BackupAndRestore`` at epoch ends).
    """
    from .distributed import multi_worker_strategy, remove_worker_dir, worker_run_dir
    run_dir = Path(run_dir)
    run = read_run_config(run_dir)
    if strategy is None and run.get("train", {}).get("multi_worker"):
        strategy = multi_worker_strategy()        # first: before TensorFlow runs anything
    run_dir, temporary = worker_run_dir(run_dir, strategy, copy=True)
    try:
        return _resume(run_dir, run, data, labels, strategy, verbose, callbacks, members)
    finally:
        if temporary:
            remove_worker_dir(run_dir)


def _resume(run_dir: Path, run: dict, data: Any, labels: Any, strategy: Any,
            verbose: int | None, callbacks: Sequence[Any], members: int | None
            ) -> "Flow | Ensemble":
    if verbose is None:
        verbose = run.get("verbose", DEFAULT_VERBOSE)
    recorded = run["data"]
    if data is None:
        if not recorded.get("path"):
            raise InputError(f"{run_dir} was trained on in-memory data; pass the same data to "
                             f"resume({str(run_dir)!r}, data=..., labels=...) (command line: "
                             f"tfgalflow train --resume RUN CATALOGUE [--units ...])")
        data = reopen(recorded)
    data = as_training_data(data, labels, None)
    config = _run_train_config(run)
    if config.label_dim and not data.label_dim:
        raise InputError(f"{run_dir} is a conditional run (label_dim = {config.label_dim}): pass "
                         f"the labels [N, {config.label_dim}] it was trained with")
    if config.label_dim == 0 and data.label_dim:
        data = without_labels(data)
    check_deconvolution(data, config)
    check_support(data, config)
    data = in_coordinates(data, config)
    shape = (data.n, data.dim, data.label_dim)
    if shape != (recorded["n"], recorded["dim"], recorded["label_dim"]) or (
            "sha256" in recorded and not data.streamed
            and data.fingerprint(with_errors=config.deconvolve) != recorded["sha256"]):
        raise InputError(f"the data differ from those {run_dir} was trained on (recorded "
                         f"N = {recorded['n']}, D = {recorded['dim']}, C = "
                         f"{recorded['label_dim']}; got N = {data.n}, D = {data.dim}, "
                         f"C = {data.label_dim}, or different values)")
    if members is not None:
        members = _run_train_config(run).with_overrides(members=members).members  # validated
        run = grow_members(run_dir, run, members)
    return _fit_members(run_dir, run, data, strategy=strategy, verbose=verbose,
                        callbacks=callbacks)


def load_run(run_dir: str | os.PathLike) -> "Flow | Ensemble | SphericalDF | AxisymmetricDF":
    """Rebuild the trained model of a finished run from config.json and the members' final
    weights (a run with reduced ``coordinates``: the
    :class:`~tfgalflow.spherical_df.SphericalDF` or
    :class:`~tfgalflow.axisymmetric_df.AxisymmetricDF` of its flow or ensemble).

    Raises FileError naming the file if config.json is missing/corrupt/of another run-format
    version or a member's weights are missing or corrupt.
    """
    run_dir = Path(run_dir)
    run = read_run_config(run_dir)
    return _run_model(run, [load_member(run_dir, run, k) for k in range(len(run["members"]))])


def _run_model(run: dict, flows: list) -> "Flow | Ensemble | SphericalDF | AxisymmetricDF":
    """The run's model made of its member flows: one Flow or their Ensemble, wrapped in the DF of
    the coordinates the run learned (:func:`tfgalflow.coordinates.wrap`).
    """
    from ..coordinates import wrap
    from ..model import Ensemble
    model = flows[0] if len(flows) == 1 else Ensemble(flows)
    return wrap(run.get("train", {}).get("coordinates", "cartesian"), model)


def _check_tensorboard(config: TrainConfig) -> None:
    """TensorFlow >= 2.16 no longer depends on TensorBoard: say so before training, not after
    epoch 1.
    """
    import importlib.util
    if config.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise InputError("TrainConfig.tensorboard = True needs the 'tensorboard' package "
                         "(pip install tensorboard); or train with tensorboard = False")


def _fit_members(run_dir: Path, run: dict, data: Any, *, strategy: Any, verbose: int,
                 callbacks: Sequence[Any]) -> "Flow | Ensemble":
    config = _run_train_config(run)
    todo = [k for k in range(config.members) if not member_finished(run_dir, run, k)]
    if config.parallel and len(todo) > 1:
        if strategy is not None or callbacks:
            raise InputError("parallel=True trains members in separate processes: it cannot take "
                             "a tf.distribute strategy or extra callbacks")
        _fit_in_processes(run_dir, todo, data, verbose)
        todo = []
    flows = [_fit_member(run_dir, run, k, data, strategy=strategy, verbose=verbose,
                         callbacks=callbacks)
             if k in todo else load_member(run_dir, run, k) for k in range(config.members)]
    for odd in outlying_members(run_dir):
        _log.warning("%s: best validation loss %.3f nats/point is %.3f above the members' median "
                     "(%.3f): it may have diverged or stalled, and the ensemble weights it like "
                     "the others; see its history.csv, retrain it with another seed or leave it "
                     "out (Ensemble of the other members)", odd["member"], odd["best"],
                     odd["excess"], odd["median"])
    return _run_model(run, flows)


# ---- parallel members ---------------------------------------------------------------------------

def _member_process(run_dir: str, k: int, data: Any, verbose: int, threads: int) -> None:
    """Entry point of a spawned process: train member k of the run (TF threads limited to
    ``threads``).
    """
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    run = read_run_config(run_dir)
    _fit_member(Path(run_dir), run, k, data, verbose=verbose)


def _fit_in_processes(run_dir: Path, members: Sequence[int], data: Any, verbose: int) -> None:
    """Train the given members concurrently, one spawned process each (at most one per CPU
    core).
    """
    import concurrent.futures
    import multiprocessing

    workers = max(1, min(len(members), os.cpu_count() or 1))
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")     # fork after TensorFlow started is unsafe
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(_member_process, str(run_dir), k, data, 2 if verbose else 0,
                               threads): k
                   for k in members}
        for future in concurrent.futures.as_completed(futures):
            future.result()     # re-raises a member's error (InputError, FileError, ...) here
