"""Sharded streaming of HDF5 catalogues: shards partition the rows, each worker reads only its own.

Truth: a file whose first position column is the row number, so every streamed row names itself
exactly; the checks are exact set equalities (no tolerance needed).
"""
from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest

from tfgalflow.catalogue import Catalogue, hdf5_dataset, open_hdf5
from tfgalflow.errors import InputError

N = 20_011          # prime: no shard, block or batch size divides it


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    """A catalogue whose pos[:, 0] is the row index; opened with 1000-row blocks (21 blocks)."""
    rng = np.random.default_rng(0)
    pos = rng.normal(size=(N, 3))
    pos[:, 0] = np.arange(N)
    cat = Catalogue(pos, rng.normal(size=(N, 3)), labels=rng.uniform(size=(N, 1)),
                    label_names=("z",), units={"length": "kpc", "velocity": "km/s"})
    path = cat.save(tmp_path_factory.mktemp("shard") / "numbered.h5")
    return path, dataclasses.replace(open_hdf5(path), chunk_rows=1000)


def row_ids(batches) -> np.ndarray:
    return np.concatenate([np.rint(x[:, 0]).astype(np.int64) for x, _ in batches])


@pytest.mark.parametrize("count", [1, 2, 3, 5])
@pytest.mark.parametrize("start,stop", [(0, None), (1234, N - 777)])
def test_shards_partition_the_rows_every_epoch(numbered, count, start, stop):
    _, lazy = numbered
    stop_ = N if stop is None else stop
    for epoch in (0, 1):
        parts = [row_ids(lazy.batches(256, shuffle_buffer=3000, seed=7, epoch=epoch,
                                      shard=(i, count), start=start, stop=stop))
                 for i in range(count)]
        everything = np.concatenate(parts)
        # every row of start:stop exactly once across the shards of one epoch
        assert len(everything) == stop_ - start
        assert np.array_equal(np.sort(everything), np.arange(start, stop_))
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 2 * lazy.chunk_rows   # balanced to a block or two


def test_shuffling_is_deterministic_per_epoch_and_seed(numbered):
    _, lazy = numbered

    def ids(epoch, seed=7, shard=(1, 3)):
        return row_ids(lazy.batches(256, shuffle_buffer=3000, seed=seed, epoch=epoch,
                                    shard=shard))

    assert np.array_equal(ids(0), ids(0))                 # same (seed, epoch): same order
    assert not np.array_equal(ids(0), ids(1))             # a new epoch reshuffles
    assert not np.array_equal(ids(0), ids(0, seed=8))     # so does a new seed
    # without shuffling, shard i is the i-th contiguous third of the file, in file order
    plain = row_ids(lazy.batches(256, shard=(1, 3)))
    assert np.array_equal(plain, np.arange(plain[0], plain[0] + len(plain)))
    # one shard of one is the unsharded stream
    assert np.array_equal(ids(2, shard=(0, 1)), ids(2, shard=None))


def test_a_worker_reads_only_its_own_rows(numbered, monkeypatch):
    _, lazy = numbered
    read = []
    original = h5py.Dataset.__getitem__

    def recording(self, key):
        if self.name == "/pos" and isinstance(key, slice):
            read.extend(range(*key.indices(self.shape[0])))
        return original(self, key)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", recording)
    mine = row_ids(lazy.batches(500, shuffle_buffer=2000, seed=1, shard=(2, 4)))
    assert sorted(read) == sorted(mine.tolist())          # read exactly the rows it yields
    assert len(mine) < N / 3                              # about a quarter of the file


def test_dataset_streams_the_shard_epoch_after_epoch(numbered):
    path, lazy = numbered
    ds = hdf5_dataset(path, 1000, shuffle_buffer=5000, seed=4, shard=(0, 2), stop=15_000)
    direct = open_hdf5(path)
    for epoch in range(2):
        got = np.concatenate([x.numpy() for x, _ in ds])
        want = np.concatenate([x for x, _ in direct.batches(1000, 5000, 4, epoch=epoch,
                                                           shard=(0, 2), stop=15_000)])
        assert np.array_equal(got, want)


@pytest.mark.parametrize("kwargs,match", [
    ({"shard": (2, 2)}, "shard index"), ({"shard": (0, 0)}, "shard count"),
    ({"shard": 3}, "expected \\(index, count\\)"), ({"start": 10, "stop": 5}, "start:stop"),
    ({"stop": N + 1}, "start:stop"),
])
def test_bad_shards_and_ranges_are_refused(numbered, kwargs, match):
    path, _ = numbered
    with pytest.raises(InputError, match=match):
        hdf5_dataset(path, 100, **kwargs)
