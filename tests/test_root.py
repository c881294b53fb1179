"""ROOT input through uproot: branches of TTrees in a file or a directory tree -> events +
labels."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from tfgalflow.catalogue import EventTable, read_root
from tfgalflow.errors import InputError

uproot = pytest.importorskip("uproot")


def write_tree(path, columns: dict, name: str = "Events") -> None:
    """A ROOT file with one TTree ``name`` holding float64 branches ``columns``."""
    with uproot.recreate(path) as f:
        tree = f.mktree(name, {k: "f8" for k in columns})
        tree.extend({k: np.asarray(v, np.float64) for k, v in columns.items()})


@pytest.fixture
def grid(tmp_path):
    """A FEDHEX-like directory: 2 x 2 mass points, one file each (plus junk), events known
    exactly."""
    rng = np.random.default_rng(0)
    truth = {}
    for i, m1 in enumerate((1.0, 2.0)):
        for j, m2 in enumerate((3.0, 4.0)):
            phi, omega = rng.normal(m1, 0.1, 50 + i), rng.normal(m2, 0.1, 50 + i)
            sub = tmp_path / f"m1_{m1:g}"
            sub.mkdir(exist_ok=True)
            write_tree(
                sub / f"m2_{m2:g}.root",
                {
                    "phi": phi,
                    "omega": omega,
                    "gen_phi": np.full(phi.size, m1),
                    "gen_omega": np.full(phi.size, m2),
                },
            )
            truth[(m1, m2)] = np.stack([phi, omega], 1)
    (tmp_path / "README.txt").write_text("not a ROOT file")
    (tmp_path / "m1_1" / "plot.png").write_bytes(b"\x89PNG not really")
    write_tree(tmp_path / "other.root", {"x": np.ones(3)}, name="Other")  # ROOT, but no Events
    return tmp_path, truth


def test_directory_read_exactly_with_junk_skipped(grid):
    path, truth = grid
    table = read_root(path, "Events", ["phi", "omega"], label_branches=["gen_phi", "gen_omega"])
    assert isinstance(table, EventTable)
    # every event comes back bit-identical (float64 through ROOT), with its own file's label
    assert len(table) == sum(len(v) for v in truth.values())
    for (m1, m2), events in truth.items():
        rows = np.all(table.labels == [m1, m2], axis=1)
        np.testing.assert_array_equal(table.events[rows], events)
    assert table.event_names == ("phi", "omega") and table.label_names == ("gen_phi", "gen_omega")
    assert table.n_skipped == 3  # README.txt, plot.png, other.root (no tree "Events")
    assert any("no tree" in reason for reason in table.skipped.values())


def test_file_labels_per_file(grid):
    path, truth = grid

    def label(p):  # FEDHEX names files by their generated masses
        return [float(p.parent.name.split("_")[1]), float(p.stem.split("_")[1])]

    table = read_root(
        path, "Events", ["phi", "omega"], file_labels=label, label_names=["m1", "m2"]
    )
    for (m1, m2), events in truth.items():
        np.testing.assert_array_equal(
            table.events[np.all(table.labels == [m1, m2], axis=1)], events
        )
    single = read_root(
        path / "m1_1" / "m2_3.root", "Events", ["phi"], file_labels={"m2_3.root": [1, 3]}
    )
    assert (
        single.labels.shape == (50, 2) and single.events.shape == (50, 1) and single.n_skipped == 0
    )


def test_errors_are_one_clear_line(grid, tmp_path_factory):
    path, _ = grid
    cases = [
        (dict(branches=["phi", "omgea"]), "no event branch 'omgea'"),
        (
            dict(branches=["phi"], label_branches=["gen_phi"], label_dim=2),
            "label has width 1 but 2",
        ),
        (
            dict(branches=["phi"], file_labels=lambda p: [1.0, 2.0, 3.0], label_dim=2),
            "width 3 but 2",
        ),
    ]
    for kwargs, text in cases:
        with pytest.raises(InputError, match=text) as info:
            read_root(path, "Events", **kwargs)
        assert "\n" not in str(info.value)
    empty = tmp_path_factory.mktemp("empty") / "empty.root"
    write_tree(empty, {"phi": np.zeros(0)})
    with pytest.raises(InputError, match="is empty"):
        read_root(empty, "Events", ["phi"])
    with pytest.raises(InputError, match="no file has a tree 'Nope'"):
        read_root(path, "Nope", ["phi"])


def test_missing_uproot_says_how_to_install(grid, monkeypatch):
    monkeypatch.setitem(sys.modules, "uproot", None)  # import uproot -> ImportError
    with pytest.raises(InputError, match=r"tfgalflow\[root\]"):
        read_root(grid[0], "Events", ["phi"])


def test_events_train_a_flow_directly(grid, tmp_path):
    # the arrays go to train() as they are (events [N, 2], labels [N, 2])
    from tfgalflow.training import TrainConfig, train

    table = read_root(grid[0], "Events", ["phi", "omega"], label_branches=["gen_phi", "gen_omega"])
    flow = train(
        table.events,
        TrainConfig(
            layers=1,
            hidden=(8,),
            epochs=1,
            jit_compile=False,
            steps_per_call=1,
            validation_split=0.0,
        ),
        tmp_path / "run",
        labels=table.labels,
        label_names=table.label_names,
        verbose=0,
    )
    np.testing.assert_allclose(flow.label_range()[0], [1.0, 3.0])
    np.testing.assert_allclose(flow.label_range()[1], [2.0, 4.0])
