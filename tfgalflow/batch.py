"""Batch inference at catalogue scale: log p, samples and accelerations streamed to HDF5 in chunks.

Each job reads its input ``chunk`` rows at a time, evaluates them, and writes the results into
chunked HDF5 datasets, so memory stays flat (about one chunk of input and output) for any N:

* :func:`log_prob_file`  points file [N, D] (and labels) -> ``log_prob`` [N];
* :func:`sample_file`    N draws -> a tfgalflow HDF5 catalogue (``pos``, ``vel`` [, ``labels``])
  for a 6-D model, else ``samples`` [N, D]; chunk i is drawn with the seed
  :func:`chunk_seed` (seed, i), so one chunk of N rows equals ``model.sample(N, seed=seed)``;
* :func:`accel_file`     positions [B, 3] -> the arrays of :meth:`AccelerationResult.save`;
  chunk i solved with the seed :func:`chunk_seed` (seed, i).

Resume and atomicity: results go to a hidden sibling ``.NAME.partial`` whose ``done`` dataset
[n_chunks] marks each chunk once its rows are written and flushed; the root attribute ``job``
(JSON: task, input file size and mtime, N, chunk, model fingerprint, seed, ...) identifies the
job. Run again after a kill and every chunk marked done is kept, not recomputed; a partial file
of another job (or unreadable after a hard kill) is started over. When every chunk is done the
partial file is renamed onto the output (``os.replace``, atomic on POSIX): the output is either
absent or complete, never half-written. An output that already exists is replaced at the end.

Example::

    >>> log_prob_file(flow, "gaia.h5", "lp.h5", chunk=2**16)          # resumable, flat memory
    >>> h5py.File("lp.h5")["log_prob"]                                 # [N] float64
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from . import validation
from .errors import FileError, InputError

#: Rows per chunk by default: 2^16 rows of [6] float64 in and out are a few MB.
DEFAULT_CHUNK = 2**16
#: Positions per chunk of :func:`accel_file` by default (each solves K velocities).
DEFAULT_ACCEL_CHUNK = 4096
#: Version of the partial-file layout (a partial file of another version is started over).
PARTIAL_VERSION = 1

ChunkCallback = Callable[[int, int, int], None]   # (chunks done, chunks in all, rows done)


# ---- input -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RowSource:
    """Rows [N, D] of a file, read ``a:b`` at a time (and labels [N, C] | None alike).

    HDF5 catalogues (via :class:`~tfgalflow.catalogue.HDF5Catalogue`) and ``.npy`` files
    (memory-mapped) are read lazily; any other format of :func:`tfgalflow.points.read_points` is
    read whole once (memory ~ N rows).
    """

    path: Path | None
    n: int
    width: int
    reader: Callable[[int, int], tuple[np.ndarray, np.ndarray | None]]
    has_labels: bool
    digest: str = ""

    def read(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(x [b - a, D] float64, labels [b - a, C] | None) of rows a:b."""
        return self.reader(a, b)

    def stamp(self) -> dict:
        """What identifies the input for a resume: path, size in bytes, mtime in ns, N (an
        in-memory array: the sha256 of its bytes).
        """
        if self.path is None:
            return {"input": "array", "sha256": self.digest, "n": self.n}
        st = self.path.stat()
        return {"input": str(self.path.resolve()), "input_bytes": st.st_size,
                "input_mtime_ns": st.st_mtime_ns, "n": self.n}


def open_rows(path: Any, units: Mapping[str, str] | None = None,
              column_ok: bool = False) -> RowSource:
    """A :class:`RowSource` over ``path`` (HDF5 catalogue, ``.npy``, or any point file), or
    over an in-memory array [N, D].
    """
    if isinstance(path, np.ndarray):
        array = np.asarray(path, np.float64)
        if array.ndim != 2:
            raise InputError(f"points have shape {list(array.shape)}; expected [N, D]")
        digest = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
        return RowSource(None, len(array), array.shape[1], lambda a, b: (array[a:b], None),
                         False, digest)
    path = Path(path)
    if not path.is_file():
        raise FileError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        from .catalogue import open_hdf5
        lazy = open_hdf5(path, units=units)

        def read_h5(a: int, b: int):
            cat = lazy.read(a, b)
            return cat.phase_space, cat.labels

        return RowSource(path, lazy.n, 6, read_h5, lazy.labels_name is not None)
    if suffix == ".npy":
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise FileError(f"{path}: cannot read a NumPy .npy array: {exc}") from None
    else:
        from .points import read_points
        array, labels = read_points(path, units=units, column_ok=column_ok)
        if labels is not None:
            return RowSource(path, len(array), array.shape[1],
                             lambda a, b: (np.asarray(array[a:b], np.float64), labels[a:b]), True)
    if column_ok and array.ndim == 1:
        array = array.reshape(-1, 1)
    if array.ndim != 2:
        raise InputError(f"{path}: array of shape {list(array.shape)}; expected [N, D]")
    return RowSource(path, len(array), array.shape[1],
                     lambda a, b: (np.asarray(array[a:b], np.float64), None), False)


# ---- the chunked, resumable writer -------------------------------------------------------------

def partial_path(out: str | os.PathLike) -> Path:
    """The hidden sibling ``.NAME.partial`` a job writes into before it is renamed onto ``out``."""
    out = Path(out)
    return out.with_name(f".{out.name}.partial")


def model_fingerprint(model: Any) -> str:
    """sha256 of a model's variable values, or for a SavedModel (no Python variables) of its
    ``saved_model.pb`` and variables files: a job's results are reused on resume only for the
    same weights.
    """
    h = hashlib.sha256(type(model).__name__.encode())
    for v in getattr(model, "variables", ()) or ():
        h.update(np.ascontiguousarray(np.asarray(v)).tobytes())
    path = getattr(model, "path", None)
    if isinstance(path, Path) and path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(file.relative_to(path)).encode())
            h.update(file.read_bytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Column:
    """An output dataset: name, per-row shape, dtype ("str" for variable-length text)."""

    name: str
    shape: tuple[int, ...]
    dtype: str


def run_chunks(out: str | os.PathLike, n: int, chunk: int, columns: Sequence[Column],
               compute: Callable[[int, int, int], Mapping[str, np.ndarray]], job: Mapping,
               attrs: Mapping[str, Any] | None = None, callback: ChunkCallback | None = None,
               workers: int = 1) -> Path:
    """Fill ``columns`` of ``out`` chunk by chunk, resumably; rename into place when all done.

    With ``workers`` W > 1 the chunks not yet done are computed by W spawned processes
    (:func:`map_chunks`; ``compute`` must then be picklable) and come back to this process, the
    only one that writes the file, in the order they finish: the same rows, flags and resume
    as with W = 1.

    Args:
        out: the output HDF5 file.
        n: rows N of every column.
        chunk: rows per chunk; chunk i covers rows [i·chunk, min((i+1)·chunk, N)).
        columns: the datasets [N, *shape] to create.
        compute: compute(i, a, b) -> {name: array [b - a, *shape]} for chunk i = rows a:b.
        job: JSON-able identity of the job; a partial file with another identity is restarted.
        attrs: root attributes of the finished file (JSON-encoded unless str/number).
        callback: called after each chunk with (chunks done, chunks in all, rows done).
        workers: processes computing the chunks (1: this process).

    Returns:
        ``out`` as a Path.
    """
    import h5py

    out = Path(out)
    n = validation.integer(n, "n", low=0)
    chunk = validation.integer(chunk, "chunk")
    n_chunks = -(-n // chunk)
    tmp = partial_path(out)
    stamp = json.dumps({**job, "chunk": chunk, "n_rows": n, "columns": [
        [c.name, list(c.shape), c.dtype] for c in columns], "version": PARTIAL_VERSION},
        sort_keys=True)
    f = _reopen(tmp, stamp, h5py)
    try:
        if f is None:
            f = h5py.File(tmp, "w")
            f.attrs["job"] = stamp
            rows = max(1, min(n, chunk))
            for c in columns:
                dtype = h5py.string_dtype() if c.dtype == "str" else np.dtype(c.dtype)
                f.create_dataset(c.name, shape=(n,) + c.shape, dtype=dtype,
                                 chunks=(rows,) + c.shape)
            f.create_dataset("done", shape=(n_chunks,), dtype=np.uint8)
            f.flush()
        done = f["done"][:].astype(bool)
        finished = int(done.sum())
        if callback is not None:
            callback(finished, n_chunks, _rows_in(done, chunk, n))
        todo = [(int(i), int(i) * chunk, min((int(i) + 1) * chunk, n))
                for i in np.nonzero(~done)[0]]
        for i, a, b, values in map_chunks(compute, todo, workers):
            for c in columns:
                v = np.asarray(values[c.name])
                if v.shape != (b - a,) + c.shape:
                    raise AssertionError(f"chunk {i}: {c.name} has shape {v.shape}, expected "
                                         f"{(b - a,) + c.shape}")
                f[c.name][a:b] = v.astype(object) if c.dtype == "str" else v
            f.flush()                    # rows on disk before the chunk is marked done
            f["done"][i] = 1
            f.flush()
            done[i] = True
            finished += 1
            if callback is not None:
                callback(finished, n_chunks, _rows_in(done, chunk, n))
        for key, value in (attrs or {}).items():
            f.attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value)
        f.attrs["complete"] = True
    finally:
        if f is not None:
            f.close()
    with open(tmp, "rb+") as fh:        # durable before the rename publishes it
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    return out


def map_chunks(compute: Callable[[int, int, int], Any], todo: Sequence[tuple[int, int, int]],
               workers: int = 1) -> Iterator[tuple[int, int, int, Any]]:
    """(i, a, b, compute(i, a, b)) for every chunk (i, a, b) of ``todo``: in order in this process
    (W = 1), or as they finish in W spawned worker processes.

    Each worker unpickles ``compute`` once (a model it holds is reloaded there, see
    :class:`AccelChunks`) and runs with this process's TensorFlow thread settings: CPU kernels
    split their reductions by the thread count, and a CBE solve turns a last-bit difference into
    another resampled velocity, so equal settings are what make a chunk come out bit-for-bit the
    same in any process (W processes then share the cores). At most 2 W chunks are in flight, so
    memory stays flat. 'spawn', not 'fork': TensorFlow is not fork-safe. When the consumer stops
    early (an error, a kill of this process's loop) pending chunks are cancelled; a worker's
    exception is re-raised here.
    """
    workers = validation.integer(workers, "workers")
    if workers == 1 or len(todo) <= 1:
        for i, a, b in todo:
            yield i, a, b, compute(i, a, b)
        return
    import concurrent.futures
    import multiprocessing

    threads = (0, 0)                     # TensorFlow's defaults, unless this process set others
    if "tensorflow" in sys.modules:
        import tensorflow as tf
        threads = (tf.config.threading.get_intra_op_parallelism_threads(),
                   tf.config.threading.get_inter_op_parallelism_threads())
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=min(workers, len(todo)), mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker, initargs=(compute, threads))
    pending: dict = {}
    queue = iter(todo)
    try:
        for item in itertools.islice(queue, 2 * workers):
            pending[pool.submit(_worker_chunk, *item)] = item
        while pending:
            finished, _ = concurrent.futures.wait(
                pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                i, a, b = pending.pop(future)
                values = future.result()
                for item in itertools.islice(queue, 1):
                    pending[pool.submit(_worker_chunk, *item)] = item
                yield i, a, b, values
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


_WORKER_COMPUTE: Any = None          # the compute of this worker process (map_chunks)


def _start_worker(compute: Any, threads: tuple[int, int]) -> None:
    global _WORKER_COMPUTE
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if any(threads):
        import tensorflow as tf
        tf.config.threading.set_intra_op_parallelism_threads(threads[0])
        tf.config.threading.set_inter_op_parallelism_threads(threads[1])
    _WORKER_COMPUTE = compute


def _worker_chunk(i: int, a: int, b: int) -> Any:
    return _WORKER_COMPUTE(i, a, b)


def _rows_in(done: np.ndarray, chunk: int, n: int) -> int:
    rows = int(done.sum()) * chunk
    if len(done) and done[-1]:
        rows -= len(done) * chunk - n       # the last chunk is short
    return rows


def _reopen(tmp: Path, stamp: str, h5py) -> Any:
    """The partial file opened for appending if it belongs to this job, else None (removed)."""
    if not tmp.exists():
        return None
    try:
        f = h5py.File(tmp, "r+")
    except OSError:                      # torn by a hard kill: start over
        tmp.unlink()
        return None
    try:
        same = f.attrs.get("job") == stamp and "done" in f
    except Exception:                    # corrupt metadata: start over
        same = False
    if same:
        return f
    f.close()
    tmp.unlink()
    return None


def read_done(out: str | os.PathLike) -> np.ndarray | None:
    """The ``done`` flags [n_chunks] of ``out``'s partial file (None without one)."""
    import h5py
    tmp = partial_path(out)
    if not tmp.exists():
        return None
    with h5py.File(tmp, "r") as f:
        return f["done"][:].astype(bool)


class ProgressBar:
    """A one-line progress bar on a stream (stderr): chunks, rows, rows/s, ETA. Chunks found done
    on a resume count as done but not towards the rate.
    """

    def __init__(self, what: str, stream: Any = None, width: int = 30):
        self.what, self.stream, self.width = what, stream or sys.stderr, width
        self.start: tuple[float, int, int] | None = None     # (time, chunks, rows) at the start

    def __call__(self, done: int, total: int, rows: int) -> None:
        """Redraw the line after ``done`` of ``total`` chunks (``rows`` rows) are finished."""
        now = time.monotonic()
        if self.start is None:
            self.start = (now, done, rows)
        t0, done0, rows0 = self.start
        elapsed = max(now - t0, 1e-9)
        rate = (rows - rows0) / elapsed
        eta = f"{(total - done) * elapsed / (done - done0):.0f} s" if done > done0 else "-"
        bar = "=" * int(round(self.width * done / total)) if total else "=" * self.width
        self.stream.write(f"\r{self.what} [{bar:<{self.width}}] {done}/{total} chunks, {rows} "
                          f"rows, {rate:.3g} rows/s, ETA {eta} ")
        if done == total:
            self.stream.write("\n")
        self.stream.flush()


def _callbacks(progress: bool | ChunkCallback, callback: ChunkCallback | None, what: str
               ) -> ChunkCallback | None:
    calls = [c for c in (ProgressBar(what) if progress is True else progress or None, callback)
             if c is not None]
    if not calls:
        return None

    def both(done: int, total: int, rows: int) -> None:
        for c in calls:
            c(done, total, rows)

    return both


# ---- jobs --------------------------------------------------------------------------------------

def log_prob_file(model: Any, points: str | os.PathLike, out: str | os.PathLike, *,
                  labels: str | os.PathLike | None = None, units: Mapping[str, str] | None = None,
                  chunk: int = DEFAULT_CHUNK, progress: bool | ChunkCallback = False,
                  callback: ChunkCallback | None = None) -> Path:
    """log p(x_n | c_n) of every row of a points file, streamed to ``out`` (HDF5 ``log_prob`` [N]).

    Args:
        model: a :class:`~tfgalflow.density.Density` (Flow, Ensemble, exported model).
        points: [N, D] points: an HDF5 catalogue (streamed), ``.npy`` (memory-mapped) or any
            format of :func:`tfgalflow.points.read_points` (read whole).
        out: the output ``.h5``/``.hdf5``; resumable (module docstring).
        labels: a file of labels [N, C] for a conditional model (default: the catalogue's own
            labels); ignored by an unconditional model.
        units: units of a catalogue file that records none.
        chunk: rows per chunk (memory ~ chunk rows).
        progress: True for a progress bar on stderr, or a callback (done, total, rows).
        callback: another callback after each chunk (tests use it to interrupt a job).

    Returns:
        ``out``; its ``log_prob`` [N] float64 equals ``model.log_prob(x, labels)`` row by row
        (units: log of the model's density per unit physical volume).
    """
    out = _check_out(out)
    src = open_rows(points, units=units)
    if src.width != model.dim:
        raise InputError(f"{points}: points are [N, {src.width}]; the model expects "
                         f"[N, {model.dim}]")
    lab = None
    if model.label_dim:
        if labels is not None:
            lab = open_rows(labels, column_ok=True)
            if lab.n != src.n or lab.width != model.label_dim:
                raise InputError(f"{labels}: labels are [{lab.n}, {lab.width}]; expected "
                                 f"[{src.n}, {model.label_dim}] (one row per point)")
        elif not src.has_labels:
            raise InputError(f"{points}: the model is conditional (label_dim = "
                             f"{model.label_dim}): pass labels [N, {model.label_dim}]")

    def compute(i: int, a: int, b: int) -> dict:
        x, c = src.read(a, b)
        if not model.label_dim:
            c = None
        elif lab is not None:
            c = lab.read(a, b)[0]
        return {"log_prob": np.asarray(model.log_prob(x, c), np.float64)}

    job = {"task": "log_prob", **src.stamp(), "model": model_fingerprint(model),
           "labels": None if lab is None else lab.stamp()}
    return run_chunks(out, src.n, chunk, [Column("log_prob", (), "float64")], compute, job,
                      attrs={"source": "tfgalflow log_prob", "input": str(points)},
                      callback=_callbacks(progress, callback, "log_prob"))


def sample_file(model: Any, n: int, out: str | os.PathLike, *, labels: Any = None,
                seed: int | None = None, chunk: int = DEFAULT_CHUNK,
                units: Mapping[str, str] | None = None, label_names: Sequence[str] = (),
                meta: Mapping[str, Any] | None = None, progress: bool | ChunkCallback = False,
                callback: ChunkCallback | None = None) -> Path:
    """N draws x ~ p(x | labels) streamed to ``out`` in chunks: chunk i = ``model.sample(rows,
    labels, seed=chunk_seed(seed, i))``; memory is that of one chunk, whatever N.

    ``labels``: [C] for all n draws, or a table [G, C] of G label rows (e.g. galaxies given
    their properties): then n draws for each row, G·n in all, row g's draws at rows
    [g n, (g+1) n) of the file, with a dataset ``label_row`` [G n] (int64) naming the table row.
    A 6-D model writes a tfgalflow HDF5 catalogue (``pos``, ``vel`` [N, 3], ``labels`` [N, C]
    when conditional; readable by :func:`tfgalflow.catalogue.open_hdf5` with ``units``), any
    other dimension a dataset ``samples`` [N, D]. ``seed`` None draws one seed, recorded in the
    partial file, so a resumed job continues the same draws.
    """
    import h5py

    from .catalogue.core import FORMAT, FORMAT_VERSION
    out = _check_out(out)
    n = validation.integer(n, "n")
    table = None
    if model.label_dim:
        if labels is None:
            raise InputError(f"the model is conditional: pass labels [{model.label_dim}] or a "
                             f"table [G, {model.label_dim}]")
        table = validation.finite_matrix(np.atleast_2d(np.asarray(labels, np.float64)),
                                         "labels", width=model.label_dim,
                                         expected=f"[{model.label_dim}] or [G, "
                                                  f"{model.label_dim}]")
    elif labels is not None:
        raise InputError("the model is unconditional (label_dim = 0): pass no labels")
    rows_total = n * (1 if table is None else len(table))
    job = {"task": "sample", "n": n, "model": model_fingerprint(model),
           "labels": None if table is None else table.tolist()}
    if seed is None:
        seed = _recorded_seed(out, job, chunk, h5py)
    seed = validation.integer(seed, "seed", low=0)
    job["seed"] = seed
    six = model.dim == 6
    cols = ([Column("pos", (3,), "float64"), Column("vel", (3,), "float64")] if six
            else [Column("samples", (model.dim,), "float64")])
    if table is not None:
        cols.append(Column("labels", (model.label_dim,), "float64"))
        if len(table) > 1:
            cols.append(Column("label_row", (), "int64"))

    def compute(i: int, a: int, b: int) -> dict:
        which = None if table is None else np.arange(a, b) // n
        c = None if table is None else (table[0] if len(table) == 1 else table[which])
        x = np.asarray(model.sample(b - a, labels=c, seed=chunk_seed(seed, i)), np.float64)
        values = {"pos": x[:, :3], "vel": x[:, 3:]} if six else {"samples": x}
        if table is not None:
            values["labels"] = table[which]
            if len(table) > 1:
                values["label_row"] = which.astype(np.int64)
        return values

    attrs: dict[str, Any] = {"meta": {**(meta or {}), "seed": seed, "chunk": chunk,
                                      "draws_per_label_row": n}}
    if six:
        attrs.update(format=FORMAT, format_version=FORMAT_VERSION,
                     units=dict(units or {"length": "model", "velocity": "model"}),
                     label_names=([] if table is None else list(label_names)
                                  or [f"label_{j}" for j in range(model.label_dim)]))
    return run_chunks(out, rows_total, chunk, cols, compute, job, attrs=attrs,
                      callback=_callbacks(progress, callback, "sample"))


def _recorded_seed(out: Path, job: Mapping, chunk: int, h5py) -> int:
    """The seed of an unfinished partial file of this job, else fresh entropy (< 2^31)."""
    tmp = partial_path(out)
    try:
        with h5py.File(tmp, "r") as f:
            old = json.loads(f.attrs["job"])
        if all(old.get(k) == v for k, v in job.items()) and old.get("chunk") == chunk:
            return int(old["seed"])
    except (OSError, KeyError, ValueError, TypeError):
        pass
    return int(np.random.SeedSequence().generate_state(1)[0] >> 1)


def accel_file(model: Any, positions: Any, out: str | os.PathLike, *,
               seed: int = 0, labels: Any = None, chunk: int = DEFAULT_ACCEL_CHUNK,
               workers: int = 1, rotations: int = 0, progress: bool | ChunkCallback = False,
               callback: ChunkCallback | None = None, **options: Any) -> Path:
    """CBE accelerations (:func:`tfgalflow.cbe.accelerations`) at the positions [B, 3] of a file
    (or an array), streamed to ``out`` in chunks; chunk i is solved with the seed
    ``chunk_seed(seed, i)``.

    Datasets: positions, radius, acceleration, a_radial, residual, condition, ess, log_density,
    [spread for an Ensemble], flagged, reasons (as :meth:`AccelerationResult.save`).

    Args:
        model: a 6-D :class:`~tfgalflow.density.Density`, or the path of a run directory
            (loaded with :func:`tfgalflow.export.load`) or of a tfgalflow SavedModel (rebuilt as
            its Flow or Ensemble, :func:`tfgalflow.export.rebuild_model`).
        positions: [B, 3] positions: a file (``.npy`` memory-mapped, HDF5, or any format of
            :func:`tfgalflow.points.read_points`) or an array.
        out: the output ``.h5``/``.hdf5``; resumable (module docstring).
        seed: the job's seed (chunk i: ``chunk_seed(seed, i)``; also the rotations' seed).
        labels: [C]: every position solved at that label (a conditional model).
        chunk: positions per chunk.
        workers: W processes computing chunks in parallel (``map_chunks``); W > 1 needs
            ``model`` as a path, which each worker loads itself. The output does not depend on W
            (every chunk has its own seed), and a job interrupted with one W resumes with another.
        rotations: M >= 1 averages the model over M rotations before solving
            (:class:`tfgalflow.symmetry.SphericalAverage`, seeded by ``seed``); 0: off.
        progress: True for a progress bar on stderr, or a callback (done, total, rows).
        callback: another callback after each chunk (tests use it to interrupt a job).
        options: n_velocities, thresholds, sampler, jit_compile... passed to
            :func:`~tfgalflow.cbe.accelerations`.
    """
    out = _check_out(out)
    workers = validation.integer(workers, "workers")
    rotations = validation.integer(rotations, "rotations", low=0)
    seed = validation.integer(seed, "seed", low=0)
    if workers > 1 and not isinstance(model, (str, os.PathLike)):
        raise InputError(f"accel_file(workers={workers}): pass the model as the path of its run "
                         f"directory (each worker process loads it), not a {type(model).__name__}")
    chunks = AccelChunks(model, positions, seed, labels, rotations, options)
    src, density = chunks.source(), chunks.density()
    if src.width != 3:
        raise InputError(f"{positions}: positions are [B, {src.width}]; expected [B, 3]")
    if options.get("jit_compile") is None:
        # the default decided once for the whole job (its size repays the compilation), not per
        # chunk; the job's stamp keeps the options as given
        from .cbe import xla_by_default
        chunks.options["jit_compile"] = xla_by_default(
            density, src.n, options.get("n_velocities", 256))
    cols = [Column("positions", (3,), "float64"), Column("radius", (), "float64"),
            Column("acceleration", (3,), "float64"), Column("a_radial", (), "float64"),
            Column("residual", (), "float64"), Column("condition", (), "float64"),
            Column("ess", (), "float64"), Column("log_density", (), "float64"),
            Column("flagged", (), "bool"), Column("reasons", (), "str")]
    if getattr(density, "members", None):     # an Ensemble (averaged or not): the spread [B, 3]
        cols.insert(8, Column("spread", (3,), "float64"))
    job = {"task": "accel", **src.stamp(), "model": chunks.fingerprint, "seed": seed,
           "labels": None if labels is None else np.asarray(labels, float).tolist(),
           "rotations": rotations,
           "options": {k: repr(v) for k, v in sorted(options.items())}}
    return run_chunks(out, src.n, chunk, cols, chunks, job,
                      attrs={"source": "tfgalflow accel", "input": job["input"]},
                      callback=_callbacks(progress, callback, "accel"), workers=workers)


class AccelChunks:
    """compute(i, a, b) of :func:`accel_file`: accelerations of chunk i (positions a:b).

    Picklable for worker processes: the model travels as its path (reloaded once per process,
    checked against the parent's fingerprint) and the positions as their path or array.
    """

    def __init__(self, model: Any, positions: Any, seed: int, labels: Any, rotations: int,
                 options: Mapping[str, Any]):
        self.model_path = (str(Path(model).resolve()) if isinstance(model, (str, os.PathLike))
                           else None)
        self.positions = (str(Path(positions).resolve())
                          if isinstance(positions, (str, os.PathLike)) else positions)
        self.seed, self.labels, self.rotations = seed, labels, rotations
        self.options = dict(options)
        self._model = None if self.model_path else model
        self._density: Any = None
        self._src: RowSource | None = None
        self.fingerprint = model_fingerprint(self.density())

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_model", "_density", "_src")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _model=None, _density=None, _src=None)

    def density(self) -> Any:
        """The model (loaded from its path on first use), averaged over the rotations if any."""
        if self._density is None:
            model = self._model
            if model is None:
                from .export import ExportedModel, load, rebuild_model
                model = load(self.model_path)
                if isinstance(model, ExportedModel):    # differentiable: its Flow/Ensemble
                    model = rebuild_model(self.model_path)
            if self.rotations:
                from .symmetry import SphericalAverage
                model = SphericalAverage(model, self.rotations, seed=self.seed)
            self._density = model
            if getattr(self, "fingerprint", None) not in (None, model_fingerprint(model)):
                raise FileError(f"{self.model_path}: the model changed while the accelerations "
                                "job ran (its weights differ from the job's)")
        return self._density

    def source(self) -> RowSource:
        """The positions as a :class:`RowSource` (opened on first use)."""
        if self._src is None:
            self._src = open_rows(self.positions)
        return self._src

    def __call__(self, i: int, a: int, b: int) -> dict:
        """The datasets of chunk i, positions a:b, solved with the seed chunk_seed(seed, i)."""
        from . import cbe
        x = cbe.check_positions(self.source().read(a, b)[0]).astype(np.float64)
        res = cbe.accelerations(self.density(), x, seed=chunk_seed(self.seed, i),
                                labels=self.labels, **self.options)
        values = {"positions": x, "radius": np.linalg.norm(x, axis=1),
                  "acceleration": res.acceleration, "a_radial": res.radial(x),
                  "residual": res.residual, "condition": res.condition, "ess": res.ess,
                  "log_density": res.log_density, "flagged": res.flagged,
                  "reasons": np.asarray(res.reasons, dtype=str)}
        if res.spread is not None:
            values["spread"] = res.spread
        return values


def chunk_seed(seed: int, i: int) -> int:
    """The int seed of chunk i of a job with seed ``seed``: ``seed`` itself for chunk 0 (so a
    one-chunk job equals the in-memory call), else 31 bits of ``numpy.random.SeedSequence([seed,
    i])`` (independent streams per chunk; plain ints suit every model, SavedModels included).
    """
    if i == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(i)]).generate_state(1)[0] >> 1)


def _check_out(out: str | os.PathLike) -> Path:
    from .points import check_output
    return check_output(out, (".h5", ".hdf5"), "streamed output")


__all__ = ["DEFAULT_ACCEL_CHUNK", "DEFAULT_CHUNK", "AccelChunks", "Column", "ProgressBar",
           "RowSource", "accel_file", "chunk_seed", "log_prob_file", "map_chunks",
           "model_fingerprint", "open_rows", "partial_path", "read_done", "run_chunks",
           "sample_file"]
