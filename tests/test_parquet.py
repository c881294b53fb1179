"""Parquet event tables: round trip, dictionary-encoded labels, streaming shuffle across labels."""

from __future__ import annotations

import builtins

import numpy as np
import pytest

pytest.importorskip("pyarrow")
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from tfgalflow import popsynth  # noqa: E402
from tfgalflow.catalogue import (
    iter_parquet_batches,
    parquet_dataset,
    read_parquet,  # noqa: E402
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
