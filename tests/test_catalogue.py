"""tfgalflow.catalogue: validation, exact round trips, Gadget files, HDF5 streaming, atomic saves.

References: the arrays written (round trips must be bit-exact, np.array_equal), the sorted rows of
the file (every streamed epoch must be a permutation of them), CODATA/IAU constants written out
literally here (unit conversions), and a good file saved before a simulated crash (it must survive
unchanged).
"""
from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest

from tfgalflow import catalogue
from tfgalflow.catalogue import Catalogue, hdf5_dataset, open_hdf5
from tfgalflow.catalogue import hdf5 as hdf5_format
from tfgalflow.catalogue import npz as npz_format
from tfgalflow.errors import FileError, InputError
from tfgalflow.units import ModelUnits

KPC_KMS = {"length": "kpc", "velocity": "km/s"}


def make(n: int = 1000, seed: int = 0, labels: bool = True, **kw) -> Catalogue:
    rng = np.random.default_rng(seed)
    return Catalogue(
        rng.normal(size=(n, 3)),
        rng.normal(size=(n, 3)),
        labels=rng.normal(size=(n, 2)) if labels else None,
        label_names=("feh", "age") if labels else (),
        units=kw.pop("units", KPC_KMS),
        meta=kw.pop("meta", {"sampler": "test", "seed": seed, "weights": np.arange(3.0)}),
        **kw,
    )


def sorted_rows(a: np.ndarray) -> np.ndarray:
    return a[np.lexsort(a.T[::-1])]


# ---- round trips --------------------------------------------------------------------------------

@pytest.mark.parametrize("ext", [".npz", ".h5", ".hdf5"])
def test_round_trip_is_exact(tmp_path, ext):
    cat = make(5000)
    path = cat.save(tmp_path / f"cat{ext}")
    back = Catalogue.load(path)
    assert np.array_equal(back.pos, cat.pos) and np.array_equal(back.vel, cat.vel)
    assert np.array_equal(back.labels, cat.labels)
    assert back.label_names == ("feh", "age")
    assert back.units == KPC_KMS
    assert back.meta == {"sampler": "test", "seed": 0, "weights": [0.0, 1.0, 2.0]}
    assert len(back) == 5000 and back.phase_space.shape == (5000, 6)
    assert not back.pos.flags.writeable


def test_round_trip_without_labels(tmp_path):
    cat = make(10, labels=False)
    for ext in (".npz", ".h5"):
        back = Catalogue.load(cat.save(tmp_path / f"c{ext}"))
        assert back.labels is None and back.label_names == ()
        assert np.array_equal(back.phase_space, cat.phase_space)


def test_hdf5_layout_is_chunked_with_unit_attributes(tmp_path):
    path = make(70_000).save(tmp_path / "big.h5")
    with h5py.File(path, "r") as f:
        assert f["pos"].chunks == (catalogue.CHUNK_ROWS, 3)
        assert f["pos"].attrs["units"] == "kpc" and f["vel"].attrs["units"] == "km/s"
        assert json.loads(f.attrs["units"]) == KPC_KMS
    lazy = open_hdf5(path)
    assert len(lazy) == 70_000 and lazy.label_names == ("feh", "age") and lazy.units == KPC_KMS
    part = lazy.read(100, 200)
    assert np.array_equal(part.pos, Catalogue.load(path).pos[100:200])


def test_reference_npz_needs_units(tmp_path):
    """The reference datasets hold only pos and vel (SI): loading them needs the caller's units."""
    rng = np.random.default_rng(1)
    pos, vel = rng.normal(size=(50, 3)) * 3e19, rng.normal(size=(50, 3)) * 1e5
    path = tmp_path / "hq_iso_orig.npz"
    np.savez(path, pos=pos, vel=vel)
    with pytest.raises(FileError, match=r"hq_iso_orig\.npz.*no units"):
        Catalogue.load(path)
    cat = Catalogue.load(path, units={"length": "m", "velocity": "m/s"})
    assert np.array_equal(cat.pos, pos) and cat.units == {"length": "m", "velocity": "m/s"}
    # A file that carries units refuses different ones (convert with to_units instead).
    with pytest.raises(InputError, match="the file says units"):
        Catalogue.load(make(5).save(tmp_path / "k.npz"), units={"length": "m", "velocity": "m/s"})


def test_plain_hdf5_needs_units(tmp_path):
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f["pos"] = np.ones((4, 3))
        f["vel"] = np.zeros((4, 3))
    with pytest.raises(FileError, match="no units"):
        Catalogue.load(path)
    assert Catalogue.load(path, units=KPC_KMS).units == KPC_KMS


# ---- Gadget-style snapshots ---------------------------------------------------------------------

def write_gadget(path, pos, vel, header=None, dataset_units=None):
    with h5py.File(path, "w") as f:
        h = f.create_group("Header")
        for k, v in (header or {}).items():
            h.attrs[k] = v
        g = f.create_group("PartType4")
        c = g.create_dataset(
            "Coordinates", data=pos.astype(np.float32), chunks=(min(7, len(pos)), 3)
        )
        v_ = g.create_dataset("Velocities", data=vel.astype(np.float32))
        g.create_dataset("Masses", data=np.ones(len(pos), np.float32))
        if dataset_units:
            c.attrs["units"], v_.attrs["units"] = dataset_units


def test_gadget_layout_with_cgs_unit_attributes(tmp_path):
    rng = np.random.default_rng(2)
    pos, vel = rng.normal(size=(40, 3)) * 10, rng.normal(size=(40, 3)) * 100
    path = tmp_path / "snap_000.hdf5"
    # Gadget's usual 1 kpc = 3.085678e21 cm and 1 km/s = 1e5 cm/s;
    # our kpc is 3.0856775814913673e21 cm.
    write_gadget(
        path,
        pos,
        vel,
        header={
            "UnitLength_in_cm": 3.085678e21,
            "UnitVelocity_in_cm_per_s": 1e5,
            "NumPart_ThisFile": np.array([0, 0, 0, 0, 40, 0]),
            "Time": 0.0,
        },
    )
    cat = Catalogue.load(path)
    assert cat.units == KPC_KMS and len(cat) == 40 and cat.labels is None
    # length_factor = 1 + 1.4e-7: the file's kpc is slightly longer
    length_factor = 3.085678e21 / 3.0856775814913673e21
    np.testing.assert_allclose(
        cat.pos, pos.astype(np.float32).astype(np.float64) * length_factor, rtol=1e-15
    )
    np.testing.assert_allclose(cat.vel, vel.astype(np.float32).astype(np.float64), rtol=1e-15)
    assert cat.meta["unit_conversion"]["UnitLength_in_cm"] == 3.085678e21
    assert cat.meta["gadget_header"]["NumPart_ThisFile"][4] == 40
    # The stream applies the same conversion.
    streamed = np.concatenate(list(open_hdf5(path).batches(16)))
    np.testing.assert_allclose(streamed, cat.phase_space.astype(np.float32), rtol=1e-7)


def test_gadget_layout_units_from_attributes_or_caller(tmp_path):
    pos, vel = np.arange(12.0).reshape(4, 3), -np.arange(12.0).reshape(4, 3)
    write_gadget(tmp_path / "a.hdf5", pos, vel, dataset_units=("pc", "km/s"))
    a = Catalogue.load(tmp_path / "a.hdf5")
    assert a.units == {"length": "pc", "velocity": "km/s"} and np.array_equal(a.pos, pos)
    write_gadget(tmp_path / "b.hdf5", pos, vel)
    with pytest.raises(FileError, match="Gadget snapshot without units"):
        Catalogue.load(tmp_path / "b.hdf5")
    assert Catalogue.load(tmp_path / "b.hdf5", units=KPC_KMS).units == KPC_KMS


# ---- streaming ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def big_h5(tmp_path_factory):
    """50 003 stars (not a multiple of the chunk or batch sizes), with labels."""
    cat = make(50_003, seed=5)
    return cat, cat.save(tmp_path_factory.mktemp("stream") / "big.h5")


def test_lazy_batches_never_read_the_whole_file(big_h5, monkeypatch):
    cat, path = big_h5
    reads = []
    original = h5py.Dataset.__getitem__

    def recording(self, key):
        out = original(self, key)
        reads.append(np.shape(out)[0] if np.ndim(out) else 0)
        return out

    monkeypatch.setattr(h5py.Dataset, "__getitem__", recording)
    lazy = open_hdf5(path)
    assert reads == [] and len(lazy) == 50_003           # opening reads the header only
    rows = np.concatenate([x for x, _ in lazy.batches(1000, shuffle_buffer=10_000, seed=0)])
    assert len(rows) == 50_003
    assert max(reads) == lazy.chunk_rows < len(lazy)     # one chunk-sized block per read


def test_hdf5_dataset_yields_every_row_once_per_epoch(big_h5):
    cat, path = big_h5
    ds = hdf5_dataset(path, batch_size=1000, shuffle_buffer=20_000, seed=3)
    expected = sorted_rows(
        np.concatenate([cat.phase_space, cat.labels], axis=1).astype(np.float32)
    )
    epochs = []
    for _ in range(2):
        batches = [(x.numpy(), lab.numpy()) for x, lab in ds]
        assert all(x.shape[0] <= 1000 and x.shape[1] == 6 and lab.shape == (x.shape[0], 2)
                   for x, lab in batches)
        rows = np.concatenate([np.concatenate(b, axis=1) for b in batches])
        assert rows.shape == expected.shape
        assert np.array_equal(sorted_rows(rows), expected)
        epochs.append(rows)
    assert not np.array_equal(epochs[0], epochs[1])       # reshuffled each epoch
    # Same seed, fresh dataset: same first epoch (reproducible).
    again = np.concatenate([np.concatenate([x.numpy(), lab.numpy()], 1) for x, lab in
                            hdf5_dataset(path, batch_size=1000, shuffle_buffer=20_000, seed=3)])
    assert np.array_equal(again, epochs[0])


def test_hdf5_dataset_without_shuffle_keeps_file_order(big_h5):
    cat, path = big_h5
    ds = hdf5_dataset(path, batch_size=4096, with_labels=False, drop_remainder=True)
    rows = np.concatenate([x.numpy() for x in ds])
    assert rows.shape == (50_003 // 4096 * 4096, 6)
    assert np.array_equal(rows, cat.phase_space[:len(rows)].astype(np.float32))


def test_in_memory_dataset_yields_every_row_once():
    cat = make(2500, seed=4, labels=False)
    ds = cat.to_dataset(batch_size=512, shuffle=True, seed=1)
    first = np.concatenate([x.numpy() for x in ds])
    second = np.concatenate([x.numpy() for x in ds])
    expected = sorted_rows(cat.phase_space.astype(np.float32))
    assert np.array_equal(sorted_rows(first), expected) and np.array_equal(
        sorted_rows(second), expected
    )
    assert not np.array_equal(first, second)
    x, labels = next(iter(make(100).to_dataset(batch_size=64, shuffle=False)))
    assert x.shape == (64, 6) and labels.shape == (64, 2)
    with pytest.raises(InputError, match="no labels"):
        cat.to_dataset(8, with_labels=True)


# ---- units --------------------------------------------------------------------------------------

def test_to_units_physical_round_trip():
    cat = make(100)
    si = cat.to_units("m", "m/s")
    np.testing.assert_allclose(
        si.pos, cat.pos * 3.0856775814913673e19, rtol=1e-15
    )  # IAU 2012 au-based kpc
    np.testing.assert_allclose(si.vel, cat.vel * 1e3, rtol=1e-15)
    back = si.to_units("kpc", "km/s")
    np.testing.assert_allclose(back.phase_space, cat.phase_space, rtol=1e-14)
    assert si.units == {"length": "m", "velocity": "m/s"}


def test_to_units_from_model_units():
    model = Catalogue(
        np.ones((3, 3)), np.ones((3, 3)), units={"length": "model", "velocity": "model"}
    )
    with pytest.raises(InputError, match="model_units"):
        model.to_units("kpc", "km/s")
    mu = ModelUnits(mass_msun=1e10, length_kpc=2.0)
    phys = model.to_units("kpc", "km/s", model_units=mu)
    # v0 = sqrt(G M / a) with G = 4.30091e-6 kpc (km/s)^2 / Msun:
    # sqrt(4.30091e4 / 2) = 146.64 km/s.
    np.testing.assert_allclose(phys.vel, 146.643, rtol=2e-5)
    np.testing.assert_allclose(phys.pos, 2.0)
    assert phys.model_units == mu  # recorded, so converting back works
    np.testing.assert_allclose(phys.to_units("model", "model").vel, 1.0, rtol=1e-14)


# ---- bad input ----------------------------------------------------------------------------------

def _arrays(n=10):
    return np.zeros((n, 3)), np.ones((n, 3))


@pytest.mark.parametrize(
    "bad, field, row", [("nan", "pos", 7), ("inf", "vel", 3), ("-inf", "pos", 0)]
)
def test_non_finite_values_name_field_and_row(bad, field, row):
    pos, vel = _arrays()
    {"pos": pos, "vel": vel}[field][row, 1] = float(bad)
    with pytest.raises(
        InputError, match=rf"{field} contains NaN or inf in 1 row\(s\), first rows \[{row}\]"
    ):
        Catalogue(pos, vel, units=KPC_KMS)


def test_nan_labels_are_refused():
    pos, vel = _arrays()
    labels = np.zeros((10, 1))
    labels[4] = np.nan
    with pytest.raises(
        InputError, match=r"labels contains NaN or inf in 1 row\(s\), first rows \[4\]"
    ):
        Catalogue(pos, vel, labels=labels, units=KPC_KMS)


@pytest.mark.parametrize("kwargs, message", [
    (dict(pos=np.zeros((10, 2))), r"pos has shape \[10, 2\]; expected \[N, 3\]"),
    (dict(vel=np.zeros((9, 3))), "pos has 10 rows but vel has 9"),
    (dict(pos=np.zeros((0, 3)), vel=np.zeros((0, 3))), "pos is empty"),
    (dict(vel=np.zeros(30)), r"vel has shape \[30\]"),
    (dict(labels=np.zeros((8, 1))), "labels have 8 rows"),
    (dict(labels=np.zeros((10, 2)), label_names=("a",)), "label_names has 1 entries"),
    (dict(label_names=("a",)), "without labels"),
    (dict(units=None), "units are missing"),
    (dict(units={"length": "kpc"}), r"lack \['velocity'\]"),
    (dict(units={"length": "furlong", "velocity": "km/s"}), "unknown length unit 'furlong'"),
    (dict(units={"length": "kpc", "velocity": "mph"}), "unknown velocity unit 'mph'"),
    (dict(meta={"f": object()}), "JSON-serialisable"),
])
def test_bad_construction_raises_input_error(kwargs, message):
    pos, vel = _arrays()
    args = dict(pos=pos, vel=vel, units=KPC_KMS)
    args.update(kwargs)
    with pytest.raises(InputError, match=message):
        Catalogue(**args)


@pytest.mark.parametrize("ext", [".npz", ".h5"])
def test_corrupt_file_raises_file_error(tmp_path, ext):
    path = tmp_path / f"garbage{ext}"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(FileError, match=f"garbage{ext}"):
        Catalogue.load(path)


def test_truncated_npz_raises_file_error(tmp_path):
    path = make(1000).save(tmp_path / "cut.npz")
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(FileError, match="cut.npz"):
        Catalogue.load(path)


def test_missing_file_raises_file_error(tmp_path):
    with pytest.raises(FileError, match="nope.h5: no such catalogue file"):
        Catalogue.load(tmp_path / "nope.h5")
    with pytest.raises(FileError, match="no such catalogue file"):
        hdf5_dataset(tmp_path / "nope.h5", 10)


def test_missing_dataset_raises_file_error(tmp_path):
    path = tmp_path / "half.h5"
    with h5py.File(path, "w") as f:
        f["pos"] = np.zeros((5, 3))
    with pytest.raises(FileError, match=r"half.h5: missing dataset 'vel'"):
        Catalogue.load(path, units=KPC_KMS)
    np.savez(tmp_path / "half.npz", pos=np.zeros((5, 3)))
    with pytest.raises(FileError, match=r"half.npz: missing array\(s\) \['vel'\]"):
        Catalogue.load(tmp_path / "half.npz", units=KPC_KMS)
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f["other"] = np.zeros(3)
    with pytest.raises(FileError, match="no catalogue found"):
        Catalogue.load(tmp_path / "empty.h5")
    with h5py.File(tmp_path / "gadget.h5", "w") as f:
        f["PartType4/Coordinates"] = np.zeros((5, 3))
    with pytest.raises(FileError, match="missing dataset 'PartType4/Velocities'"):
        Catalogue.load(tmp_path / "gadget.h5", units=KPC_KMS)


def test_unknown_extension(tmp_path):
    with pytest.raises(InputError, match="unsupported catalogue extension '.csv'"):
        make(3).save(tmp_path / "x.csv")


def test_bad_batch_size():
    with pytest.raises(InputError, match="batch_size = 0: expected an integer >= 1"):
        make(3).to_dataset(0)


@pytest.mark.parametrize("ext, module, writer", [(".h5", hdf5_format, "write_hdf5"),
                                                  (".npz", npz_format, "write_npz")])
def test_interrupted_save_keeps_previous_file(tmp_path, monkeypatch, ext, module, writer):
    good = make(300, seed=1)
    path = good.save(tmp_path / f"cat{ext}")
    real = getattr(module, writer)

    def crash_after_writing(tmp, cat):
        real(tmp, cat)  # the new file is fully written to the temporary name ...
        raise KeyboardInterrupt("killed")   # ... and the process dies before the rename

    monkeypatch.setattr(module, writer, crash_after_writing)
    with pytest.raises(KeyboardInterrupt):
        make(500, seed=2).save(path)
    back = Catalogue.load(path)
    assert len(back) == 300 and np.array_equal(back.phase_space, good.phase_space)
    assert sorted(os.listdir(tmp_path)) == [f"cat{ext}"]       # no temporary file left behind
