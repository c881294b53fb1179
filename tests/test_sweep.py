"""tfgalflow sweep: one run config per grid point, trained locally in sequence, summarised.

Truths: the grid is the Cartesian product of the given values (exact configs); the summary's best
loss of each point is the minimum of that run's own history.csv (exact, same numbers).
"""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from tfgalflow.catalogue import Catalogue
from tfgalflow.cli import main
from tfgalflow.errors import InputError
from tfgalflow.training import TrainConfig
from tfgalflow.training.sweep import grid_points, parse_grid


def test_grid_is_the_cartesian_product_with_list_values():
    base = TrainConfig(hidden=(64, 64))
    points = grid_points(base, parse_grid(["layers=4,8", "hidden=64,128x32"]))
    assert points == [{"layers": 4, "hidden": [64, 64]}, {"layers": 4, "hidden": [128, 32]},
                      {"layers": 8, "hidden": [64, 64]}, {"layers": 8, "hidden": [128, 32]}]
    with pytest.raises(InputError, match="unknown TrainConfig field"):
        parse_grid(["depth=3"])
    with pytest.raises(InputError, match="TrainConfig.layers"):
        grid_points(base, parse_grid(["layers=0,2"]))


def test_sweep_trains_every_point_and_tabulates_validation_losses(tmp_path, capsys):
    rng = np.random.default_rng(0)
    cat = Catalogue(rng.normal(size=(300, 3)), rng.normal(size=(300, 3)),
                    units={"length": "kpc", "velocity": "km/s"})
    data = cat.save(tmp_path / "cat.npz")
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"epochs": 2, "batch_size": 100, "hidden": [4, 4],
                                "jit_compile": False, "steps_per_call": 1}))
    out = tmp_path / "sweep"
    grid = ["layers=1,2", "hidden=4,8"]
    assert main(["sweep", str(base), "--grid", *grid, "--out", str(out)]) == 0
    configs = [json.loads((out / f"point_{i:03d}" / "config.json").read_text()) for i in range(4)]
    assert [(c["layers"], c["hidden"]) for c in configs] == [
        (1, [4, 4]), (1, [8, 8]), (2, [4, 4]), (2, [8, 8])]
    assert "pending" in capsys.readouterr().out
    # one point (as a SLURM array task would), then the rest; finished points are not retrained
    assert main(["sweep", str(base), "--grid", *grid, "--out", str(out), "--train", str(data),
                 "--point", "2", "--verbose", "0"]) == 0
    history = out / "point_002" / "run" / "member_000" / "history.csv"
    stamp = history.stat().st_mtime_ns
    assert main(["sweep", str(base), "--grid", *grid, "--out", str(out), "--train", str(data),
                 "--verbose", "0"]) == 0
    assert history.stat().st_mtime_ns == stamp
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["finished"] * 4
    for i, r in enumerate(rows):
        h = np.loadtxt(out / f"point_{i:03d}" / "run" / "member_000" / "history.csv",
                       delimiter=",", skiprows=1, ndmin=2)
        assert r["monitor"] == "val_loss"
        assert float(r["best"]) == pytest.approx(h[:, 2].min(), rel=1e-12)
    assert sum(r["lowest"] == "*" for r in rows) == 1
    # another grid in the same directory is refused
    assert main(["sweep", str(base), "--grid", "layers=3", "--out", str(out)]) == 2
