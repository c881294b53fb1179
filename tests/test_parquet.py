"""Parquet event tables: round trip, dictionary-encoded labels, streaming shuffle across labels,
sharding (shards partition the rows; workers read only their own) and streamed training.

Truth for the sharding tests: a file whose first event column is the row number, so every
streamed row names itself; the checks are exact set equalities (no tolerance needed).
"""

from __future__ import annotations

import builtins

import numpy as np
import pytest

pytest.importorskip("pyarrow")
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from tfgalflow import popsynth  # noqa: E402
from tfgalflow.catalogue import (  # noqa: E402
    iter_parquet_batches,
    open_parquet,
    parquet_dataset,
    read_parquet,
    write_parquet,
)
from tfgalflow.errors import FileError, InputError  # noqa: E402


@pytest.fixture(scope="module")
def grid_file(tmp_path_factory):
    """The 60-node grid, 100 events per node, sorted by node; row groups of 50 rows (120)."""
    events, labels = popsynth.simulate("grid", n_per_node=100, seed=0)
    path = tmp_path_factory.mktemp("pq") / "grid.parquet"
    write_parquet(
        path, events, labels, popsynth.EVENT_NAMES, popsynth.LABEL_NAMES, row_group_size=50
    )
    return path, events, labels


def test_round_trip_is_exact_and_labels_are_dictionary_encoded(grid_file):
    path, events, labels = grid_file
    meta = pq.ParquetFile(path).metadata.row_group(0)
    encodings = {meta.column(j).path_in_schema: meta.column(j).encodings for j in range(4)}
    assert "RLE_DICTIONARY" in encodings["Z"] and "RLE_DICTIONARY" in encodings["alpha"]
    # label pages hold few-bit indices into the 15 (4) values: far smaller than float64 events
    sizes = {meta.column(j).path_in_schema: meta.column(j).total_compressed_size for j in range(4)}
    assert sizes["alpha"] < sizes["m0"] / 2
    table = read_parquet(path, "m0,m1", ("Z", "alpha"))
    assert np.array_equal(table.events, events) and np.array_equal(table.labels, labels)
    assert table.event_names == ("m0", "m1") and table.label_names == ("Z", "alpha")


def test_plain_and_categorical_label_columns_written_by_other_tools_are_read(tmp_path):
    path = tmp_path / "plain.parquet"
    z_text = pa.DictionaryArray.from_arrays(
        pa.array([1, 0, 1], pa.int8()), pa.array(["1e-4", "0.02"])
    )
    pq.write_table(
        pa.table(
            {
                "m0": [10.0, 20.0, 30.0],
                "m1": [5.0, 9.0, 1.0],
                "Z": [1e-3, 2e-3, 1e-3],
                "Ztext": z_text,
            }
        ),
        path,
    )
    assert pa.types.is_dictionary(pq.read_table(path).schema.field("Ztext").type)
    table = read_parquet(path, ["m0", "m1"], ["Z", "Ztext"])
    assert table.labels.tolist() == [[1e-3, 0.02], [2e-3, 1e-4], [1e-3, 0.02]]


def test_streaming_batches_mix_many_nodes_of_a_label_sorted_file(grid_file):
    path, events, labels = grid_file
    batches = list(
        iter_parquet_batches(
            path, ("m0", "m1"), ("Z", "alpha"), batch_size=256, buffer_rows=2000, seed=0
        )
    )
    first_nodes = {tuple(r) for r in batches[0][1]}
    # The file is sorted by node (100 rows per node); a sequential read gives 3 nodes per batch.
    # The buffer spans 40 random row groups (~35 nodes), and 256 draws from them hit >= 25 nodes.
    nodes_per_batch = [len({tuple(r) for r in c}) for _, c in batches[:-1]]
    assert len(first_nodes) >= 25 and min(nodes_per_batch) >= 20
    # every row exactly once per epoch (compare sorted rows, as float32)
    x = np.concatenate([b[0] for b in batches])
    assert x.shape == events.shape
    assert np.array_equal(np.sort(x[:, 0]), np.sort(events[:, 0].astype(np.float32)))
    # a new epoch is a new order, the same seed and epoch the same order
    again = next(iter_parquet_batches(path, ("m0", "m1"), ("Z", "alpha"), 256, 2000, seed=0))
    other = next(
        iter_parquet_batches(path, ("m0", "m1"), ("Z", "alpha"), 256, 2000, seed=0, epoch=1)
    )
    assert np.array_equal(again[0], batches[0][0]) and not np.array_equal(other[0], batches[0][0])


def test_parquet_dataset_yields_labelled_float32_batches(grid_file):
    path, events, _ = grid_file
    ds = parquet_dataset(
        path, ("m0", "m1"), ("Z", "alpha"), batch_size=500, buffer_rows=1000, seed=1
    )
    sizes = [int(x.shape[0]) for x, c in ds]
    assert sum(sizes) == len(events) and set(sizes[:-1]) == {500}
    x, c = next(iter(ds))
    assert x.dtype.name == "float32" and c.shape == (500, 2)


def test_errors_name_the_problem(grid_file, tmp_path, monkeypatch):
    path, _, _ = grid_file
    with pytest.raises(InputError, match=r"no column\(s\) \['mass'\]; the file has columns"):
        read_parquet(path, ["mass"], ["Z"])
    with pytest.raises(FileError, match="no such Parquet file"):
        read_parquet(tmp_path / "missing.parquet", ["m0"])
    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ModuleNotFoundError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(InputError, match=r"install the 'parquet' extra"):
        read_parquet(path, ["m0"])


# ---- sharding -----------------------------------------------------------------------------------

N = 2003            # prime: no shard, row group or batch size divides it


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    """Events (row number, noise), label = row // 100 (sorted, 21 nodes); row groups of 37."""
    rows = np.arange(N, dtype=np.float64)
    events = np.stack([rows, np.random.default_rng(0).normal(size=N)], axis=1)
    path = tmp_path_factory.mktemp("pqshard") / "numbered.parquet"
    write_parquet(path, events, rows // 100, ("id", "y"), ("node",), row_group_size=37)
    return path


def ids(batches) -> np.ndarray:
    return np.concatenate([np.rint(x[:, 0]).astype(np.int64) for x, _ in batches])


@pytest.mark.parametrize("count", [1, 2, 3, 5])
@pytest.mark.parametrize("start,stop", [(0, None), (123, N - 77)])
def test_shards_partition_the_rows_every_epoch(numbered, count, start, stop):
    stop_ = N if stop is None else stop
    for epoch in (0, 1):
        shards = [ids(iter_parquet_batches(numbered, "id,y", "node", 64, buffer_rows=200,
                                           seed=3, epoch=epoch, shard=(i, count), start=start,
                                           stop=stop))
                  for i in range(count)]
        every = np.concatenate(shards)
        assert len(every) == stop_ - start                      # each row once ...
        assert np.array_equal(np.sort(every), np.arange(start, stop_))   # ... and every row
        if count > 1:                           # whole row groups per shard, spread by the seed
            assert all(len(s) >= 37 for s in shards)


def test_a_label_sorted_file_still_mixes_nodes_per_batch_within_a_shard(grid_file):
    path, events, labels = grid_file
    shard = list(iter_parquet_batches(path, "m0,m1", "Z,alpha", 256, buffer_rows=2000, seed=0,
                                      shard=(1, 3)))
    # 60 nodes x 100 rows in row groups of 50, sorted by node: a shard is 40 of the 120 groups,
    # drawn at random by the seed (about 30 nodes); a sequential read of its rows would put 3-4
    # nodes in a batch of 256, the buffer of the whole shard puts >= 20 in every full batch.
    nodes = [len({tuple(r) for r in c}) for _, c in shard if len(c) == 256]
    assert len(nodes) == 7 and min(nodes) >= 20
    assert sum(len(c) for _, c in shard) == 2000


def test_shard_order_is_deterministic_per_seed_and_epoch(numbered):
    def order(seed=7, epoch=0):
        return ids(iter_parquet_batches(numbered, "id,y", "node", 64, buffer_rows=300, seed=seed,
                                        epoch=epoch, shard=(1, 3)))

    first = order()
    assert np.array_equal(order(), first)                         # same seed, same epoch
    assert not np.array_equal(order(epoch=1), first)              # next epoch: another order
    assert not np.array_equal(order(seed=8), first)
    assert not np.array_equal(first, np.sort(first))              # shuffled, not file order
    # buffer_rows = 0: file order, the shards' spans still partition the rows
    plain = ids(open_parquet(numbered, "id,y", "node").batches(64, 0))
    assert np.array_equal(plain, np.arange(N))


def test_dataset_and_read_give_the_shard_and_the_rows(numbered):
    table = read_parquet(numbered, "id,y", "node")
    lazy = open_parquet(numbered, "id,y", "node")
    part = lazy.read(100, 1900, 7)                                 # across row-group edges
    assert np.array_equal(part.events, table.events[100:1900:7])
    assert np.array_equal(part.labels, table.labels[100:1900:7])
    ds = parquet_dataset(numbered, "id,y", "node", 128, buffer_rows=256, seed=1, shard=(0, 2))
    epochs = [ids((x.numpy(), c.numpy()) for x, c in ds) for _ in range(2)]
    for epoch, got in enumerate(epochs):           # iteration k of the dataset is epoch k
        want = ids(iter_parquet_batches(numbered, "id,y", "node", 128, 256, 1, epoch,
                                        shard=(0, 2)))
        assert np.array_equal(got, want)
    assert not np.array_equal(epochs[0], epochs[1])


@pytest.mark.parametrize("kwargs,match", [
    ({"shard": (2, 2)}, r"shard index = 2"), ({"shard": 3}, r"expected \(index, count\)"),
    ({"start": 10, "stop": 5}, r"start:stop = 10:5"), ({"stop": N + 1}, r"<= 2003"),
])
def test_bad_shards_and_ranges_are_refused(numbered, kwargs, match):
    with pytest.raises(InputError, match=match):
        next(iter_parquet_batches(numbered, "id,y", "node", 64, **kwargs))


# ---- streamed training --------------------------------------------------------------------------

def test_training_rows_and_worker_shards_of_a_streamed_table(numbered):
    """Validation rows spread evenly (one in ~10 rows for a split 0.1), training rows numbered in
    between; two workers stream disjoint contiguous ranges of the training rows, no validation
    row, and every training row but the odd one out.
    """
    import tensorflow as tf
    from tfgalflow.training import TrainConfig
    from tfgalflow.training.data import as_training_data

    data = as_training_data(open_parquet(numbered, "id,y", "node"))
    config = TrainConfig(batch_size=64, validation_split=0.1, adapt_samples=500, label_dim=1)
    pipes = data.pipelines(config, seed=0)
    val = ids(pipes.val_dataset().as_numpy_iterator())
    assert pipes.n_val == 200 == len(val)                         # round(2003 · 0.1)
    assert set(np.diff(val)) == {10, 11}              # one row in every n/m = 10.015 rows
    train = np.setdiff1d(np.arange(N), val)
    assert np.array_equal(np.sort(ids(pipes.train_dataset(0, 1).as_numpy_iterator())), train)
    assert [pipes.file_row(t) for t in (0, 9, 1000)] == [train[0], train[9], train[1000]]
    x, c = pipes.adapt_input()
    assert len(x) <= 500 and not np.isin(np.rint(x[:, 0]), val).any()
    pipes.shard_for_workers(2)
    creator = pipes.train_dataset(0, 1)
    worker = []
    for i in range(2):
        context = tf.distribute.InputContext(2, i, 2)
        batches = list(creator.dataset_fn(context).as_numpy_iterator())
        worker.append(ids(batches))
        sizes = [len(x) for x, _ in batches]                      # per-replica batches of B/W
        assert sizes == [32] * (901 // 32) + [901 % 32]
    half = len(train) // 2                                       # 901 each, train[-1] sits out
    assert np.array_equal(np.sort(worker[0]), train[:half])
    assert np.array_equal(np.sort(worker[1]), train[half:2 * half])


def test_cli_trains_on_a_streamed_parquet_table_and_resumes(grid_file, tmp_path):
    from tfgalflow.cli import main
    from tfgalflow.training import read_run_config

    path, _, _ = grid_file
    run = tmp_path / "run"
    args = ["train", str(path), "--event-columns", "m0,m1", "--label-columns", "Z,alpha",
            "--stream", "--log-columns", "0,1", "--label-log-columns", "0", "--layers", "1",
            "--hidden", "8", "--epochs", "1", "--verbose", "0", "--no-jit-compile",
            "--steps-per-call", "1"]
    assert main(args + ["--out", str(run)]) == 0
    data = read_run_config(run)["data"]
    assert data["source"] == "parquet" and data["event_columns"] == ["m0", "m1"]
    assert data["label_names"] == ["Z", "alpha"] and data["n"] == 6000
    assert main(["train", "--resume", str(run)]) == 0              # reopens the recorded table
