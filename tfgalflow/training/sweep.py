"""Hyperparameter sweeps over a grid of TrainConfig fields: one run config per grid point, trained
locally one after another or as a SLURM array job (``scripts/slurm/sweep_array.sbatch``), and a
summary table of the best validation losses.

Layout::

    SWEEP/sweep.json                 base config, grid, the points (name -> overrides)
    SWEEP/point_000/config.json      the TrainConfig of point 0 (base + its overrides)
    SWEEP/point_000/run/             its run directory once trained (tfgalflow train --out)
    SWEEP/summary.csv                one row per point: overrides, status, best loss, best epoch

Grid text (the CLI's ``--grid``): ``layers=4,8 hidden=64,128``: each field's values are separated
by commas; a value of a list field (hidden, log_columns) lists its elements with ``x``
(``hidden=64x64,128x128x128``), and a single width of ``hidden`` keeps the base config's number
of hidden layers (``hidden=128`` on a base of 64,64 is 128,128). Points are the Cartesian product
in the order the fields are given (the last field varies fastest).
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..atomic import write_json, write_text
from ..errors import FileError, InputError
from .config import TrainConfig
from .rundir import CONFIG_FILE, member_finished, member_summary, read_run_config

SWEEP_FILE = "sweep.json"
SUMMARY_CSV = "summary.csv"
RUN_SUBDIR = "run"


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """``["layers=4,8", "hidden=64,128"]`` -> ``{"layers": ["4", "8"], "hidden": ["64", "128"]}``
    (field names checked against TrainConfig; ``-`` in names read as ``_``).
    """
    fields = TrainConfig.field_help()
    grid: dict[str, list[str]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        name = name.strip().replace("-", "_")
        parts = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not parts:
            raise InputError(f"--grid {item!r}: expected FIELD=V1,V2,..., e.g. layers=4,8")
        if name not in fields:
            raise InputError(f"--grid {item!r}: unknown TrainConfig field {name!r}; allowed: "
                             f"{sorted(fields)}")
        if name in grid:
            raise InputError(f"--grid: field {name!r} given twice")
        grid[name] = parts
    if not grid:
        raise InputError("--grid: give at least one FIELD=V1,V2,...")
    return grid


def grid_points(base: TrainConfig, grid: Mapping[str, Sequence[str]]) -> list[dict[str, Any]]:
    """The overrides of every grid point (Cartesian product, last field fastest), each checked by
    building its TrainConfig; values as the config stores them (JSON-able).
    """
    kinds = TrainConfig.field_help()
    names = list(grid)
    points = []
    for combo in itertools.product(*(grid[n] for n in names)):
        overrides = {}
        for name, text in zip(names, combo):
            value: Any = text
            if kinds[name][0] == "ints":
                value = text.replace("x", ",")
                if name == "hidden" and "," not in value:
                    value = ",".join([value] * len(base.hidden))
            overrides[name] = value
        config = base.with_overrides(**overrides)            # validates every value
        points.append({n: config.to_dict()[n] for n in names})
    return points


def point_name(i: int) -> str:
    """Directory name of grid point i: ``point_000``, ``point_001``, ..."""
    return f"point_{i:03d}"


def write_sweep(base: TrainConfig, grid: Mapping[str, Sequence[str]],
                out: str | os.PathLike) -> dict:
    """Write ``SWEEP/sweep.json`` and one ``point_XXX/config.json`` per grid point; returns the
    sweep description. Writing the same sweep again is a no-op (finished runs are kept); a
    directory holding another sweep is refused (FileError).
    """
    out = Path(out)
    points = grid_points(base, grid)
    sweep = {"format": "tfgalflow-sweep", "base": base.to_dict(),
             "grid": {k: list(v) for k, v in grid.items()},
             "points": [{"name": point_name(i), "overrides": p} for i, p in enumerate(points)]}
    existing = out / SWEEP_FILE
    if existing.exists():
        old = read_sweep(out)
        if old["base"] != sweep["base"] or old["points"] != sweep["points"]:
            raise FileError(f"{existing}: the directory holds another sweep (other base config or "
                            f"grid); choose a new --out")
        return old
    if out.exists() and any(out.iterdir()):
        raise FileError(f"{out}: not empty and not a sweep directory; choose a new --out")
    for p, overrides in zip(sweep["points"], points):
        write_json(out / p["name"] / CONFIG_FILE, base.with_overrides(**overrides).to_dict())
    write_json(existing, sweep)
    return sweep


def read_sweep(out: str | os.PathLike) -> dict:
    """The parsed ``sweep.json`` of a sweep directory (FileError if missing or corrupt)."""
    path = Path(out) / SWEEP_FILE
    try:
        sweep = json.loads(path.read_text())
        sweep["points"], sweep["base"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FileError(f"{path}: not a readable sweep description ({exc})") from None
    return sweep


def run_dir_of(out: str | os.PathLike, point: Mapping) -> Path:
    """``SWEEP/point_XXX/run``: where a point's run is trained."""
    return Path(out) / point["name"] / RUN_SUBDIR


def train_points(out: str | os.PathLike, data: Any, points: Sequence[int] | None = None, *,
                 verbose: int = 2, **train_kwargs: Any) -> list[int]:
    """Train the given grid points (default all) one after another on ``data``: finished points
    are skipped, interrupted ones resumed from their checkpoints. Returns the points trained now.

    ``data`` is anything :func:`tfgalflow.training.train` takes (a catalogue path is re-read by
    each point; HDF5 is streamed).
    """
    from .fit import resume, train
    sweep = read_sweep(out)
    todo = range(len(sweep["points"])) if points is None else points
    trained = []
    for i in todo:
        if not 0 <= i < len(sweep["points"]):
            raise InputError(f"point {i}: the sweep has points 0..{len(sweep['points']) - 1}")
        point = sweep["points"][i]
        run_dir = run_dir_of(out, point)
        config = TrainConfig.from_file(Path(out) / point["name"] / CONFIG_FILE)
        if (run_dir / CONFIG_FILE).exists():
            run = read_run_config(run_dir)
            if all(member_finished(run_dir, run, k) for k in range(len(run["members"]))):
                continue
            resume(run_dir, data=None if isinstance(data, (str, os.PathLike)) else data,
                   verbose=verbose, **train_kwargs)
        else:
            train(data, config, run_dir, verbose=verbose, **train_kwargs)
        trained.append(i)
    return trained


def summarize(out: str | os.PathLike) -> list[dict[str, Any]]:
    """One row per grid point: name, its overrides, status (pending, running, finished), the
    best monitored loss (validation loss when the run holds out data; mean over members) and its
    epoch; also written to ``SWEEP/summary.csv`` (sorted as the points, best loss marked).
    """
    sweep = read_sweep(out)
    rows = []
    for point in sweep["points"]:
        run_dir = run_dir_of(out, point)
        row: dict[str, Any] = {"point": point["name"], **{k: _text(v) for k, v in
                                                           point["overrides"].items()},
                               "status": "pending", "monitor": "", "best": "", "best_epoch": ""}
        if (run_dir / CONFIG_FILE).exists():
            run = read_run_config(run_dir)
            done = [member_finished(run_dir, run, k) for k in range(len(run["members"]))]
            row["status"] = "finished" if all(done) else "running"
            if all(done):
                s = [member_summary(run_dir, run, k) for k in range(len(run["members"]))]
                row["monitor"] = s[0]["monitor"]
                row["best"] = sum(x["best"] for x in s) / len(s)
                row["best_epoch"] = max(x["best_epoch"] for x in s) + 1
        rows.append(row)
    finished = [r for r in rows if r["status"] == "finished"]
    best = min(finished, key=lambda r: r["best"])["point"] if finished else None
    for r in rows:
        r["lowest"] = "*" if r["point"] == best else ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(Path(out) / SUMMARY_CSV, buffer.getvalue())
    return rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The summary rows as an aligned text table (losses to 5 significant figures)."""
    if not rows:
        return ""
    cols = list(rows[0])
    cells = [[f"{r[c]:.5g}" if isinstance(r[c], float) else str(r[c]) for c in cols]
             for r in rows]
    widths = [max(len(c), *(len(row[j]) for row in cells)) for j, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _text(value: Any) -> str:
    return "x".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
