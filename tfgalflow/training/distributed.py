"""Multi-worker training: ``tf.distribute.MultiWorkerMirroredStrategy`` from TF_CONFIG or SLURM.

Every worker runs the same ``train`` call; the strategy keeps one copy of the weights per worker
and sums the gradients of the W workers' shares of each global batch with a collective
all-reduce, so W workers take the same steps as one process with the same global batch (up to
the order of float32 sums). Keras splits each global batch of B rows into W consecutive pieces of
B/W (tf.data auto-sharding, DATA policy); each replica's loss is its own -Σ w log p over the
all-reduced Σ w of the global batch (``Flow._loss``), so the summed gradient is that of the
global mean for any split (uneven pieces and an epoch's short last batch included).

Only the chief (task ``chief``, or ``worker`` 0 when the cluster has no chief) writes the run
directory; the other workers write theirs into a temporary directory that is deleted after
training (Keras' multi-worker guide: https://www.tensorflow.org/tutorials/distribute/
multi_worker_with_keras). The strategy must be created before TensorFlow runs anything else in
the process (collectives are configured at start-up), which :func:`tfgalflow.training.train` does
first when ``TrainConfig.multi_worker`` is set.

An HDF5 or Parquet file is streamed in shards: worker i reads only its own contiguous range of
the training rows, in per-replica batches of B / W (``StreamedPipelines.shard_for_workers``,
through a Keras ``DatasetCreator``), so memory per worker stays flat and no worker reads
another's rows.
In-memory data are split by tf.data's auto-sharding as above.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf

#: SLURM variables whose presence (without TF_CONFIG) selects the SLURM cluster resolver.
SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS")
#: First port SlurmClusterResolver gives the tasks of a node.
SLURM_PORT_BASE = 8888


def free_ports(k: int) -> list[int]:
    """k distinct TCP ports free on 127.0.0.1 now, for a one-machine cluster's TF_CONFIG
    (``{"cluster": {"worker": ["localhost:p0", ...]}, "task": ...}``: tests, studies, a try-out
    before SLURM). The sockets are closed before returning, so another process could take a port
    in between; bind soon.
    """
    sockets = [socket.socket() for _ in range(k)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def cluster_resolver() -> Any:
    """The cluster of this job: ``TFConfigClusterResolver`` when ``TF_CONFIG`` is set, else
    ``SlurmClusterResolver`` (one worker per SLURM task, ports from 8888) inside a SLURM step.

    Raises InputError outside both (multi-worker training needs a cluster description).
    """
    import tensorflow as tf

    if os.environ.get("TF_CONFIG"):
        try:
            spec = json.loads(os.environ["TF_CONFIG"])
            spec["cluster"], spec["task"]["type"], spec["task"]["index"]
        except (ValueError, KeyError, TypeError):
            raise InputError("TF_CONFIG: expected JSON {\"cluster\": {\"worker\": [\"host:port\", "
                             "...]}, \"task\": {\"type\": \"worker\", \"index\": i}}") from None
        return tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if all(v in os.environ for v in SLURM_VARIABLES):
        slurm = tf.distribute.cluster_resolver.SlurmClusterResolver
        # CPU nodes (this package trains on CPUs): TF 2.21 pairs each task of a node with a slot
        # of gpus_per_task GPUs (counted by nvidia-smi, which CPU nodes lack), so zero GPUs give
        # an empty cluster; one notional slot per task lists every task, and
        # auto_set_gpu=False leaves CUDA_VISIBLE_DEVICES alone.
        probe = slurm(port_base=SLURM_PORT_BASE, gpus_per_node=0, gpus_per_task=0,
                      auto_set_gpu=False)
        per_node = max(probe._task_configuration.values())
        return slurm(port_base=SLURM_PORT_BASE, gpus_per_node=per_node, gpus_per_task=1,
                     auto_set_gpu=False)
    raise InputError("multi_worker = True needs a cluster: set TF_CONFIG (JSON cluster and task) "
                     "or run inside a SLURM job step (srun), see scripts/slurm/")


def multi_worker_strategy() -> "tf.distribute.MultiWorkerMirroredStrategy":
    """``MultiWorkerMirroredStrategy`` over :func:`cluster_resolver`'s cluster (ring/auto
    collectives). Call before TensorFlow runs any op in this process.
    """
    import tensorflow as tf
    return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=cluster_resolver())


def is_chief(strategy: Any) -> bool:
    """True unless ``strategy`` is multi-worker and this process is not its chief (task
    ``chief``, or ``worker`` 0 of a cluster without a chief).
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    if resolver is None or task_type is None:
        return True
    if task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and not has_chief and int(resolver.task_id or 0) == 0


def chief_process() -> bool:
    """True unless TF_CONFIG or SLURM (:func:`cluster_resolver`) names this process a worker
    other than the chief (for the command line: only the chief reports a multi-worker run).
    """
    from types import SimpleNamespace
    return is_chief(SimpleNamespace(cluster_resolver=cluster_resolver()))


def num_workers(strategy: Any) -> int:
    """W, the worker processes (chief included) of a multi-worker strategy; 1 otherwise."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or getattr(resolver, "task_type", None) is None:
        return 1
    spec = resolver.cluster_spec()
    return sum(spec.num_tasks(job) for job in ("chief", "worker") if job in spec.jobs)


def worker_run_dir(run_dir: Path, strategy: Any, copy: bool = False) -> tuple[Path, bool]:
    """(directory this process writes, whether it is temporary): ``run_dir`` for the chief, a new
    temporary directory for every other worker (with ``copy``: a copy of ``run_dir``, to resume
    from the chief's checkpoints).
    """
    if is_chief(strategy):
        return Path(run_dir), False
    resolver = strategy.cluster_resolver
    tmp = Path(tempfile.mkdtemp(prefix=f"tfgalflow-{resolver.task_type}{resolver.task_id}-"))
    if copy:
        shutil.copytree(run_dir, tmp, dirs_exist_ok=True)
    return tmp, True


def remove_worker_dir(path: Path) -> None:
    """Delete a non-chief worker's temporary run directory."""
    shutil.rmtree(path, ignore_errors=True)
