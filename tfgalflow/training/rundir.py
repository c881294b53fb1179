"""The run directory: its layout, ``config.json``, the members' histories and checkpoint names.

Layout (``RUN_FORMAT_VERSION``)::

    RUN/config.json                    resolved TrainConfig, FlowConfig, data description, member
                                       seeds, verbosity, versions
    RUN/member_000/history.csv         one row per finished epoch: epoch (1-based), loss, val_loss
    RUN/member_000/checkpoints/ckpt-E.*       full state after E epochs (E = k, 2k, ...; the
                                              last ``keep_checkpoints`` of them)
    RUN/member_000/checkpoints/best/ckpt-E.*  the same after the epoch E with the lowest loss
    RUN/member_000/final/              weights.* + summary.json (best epoch; a conditional flow
                                       also its label_weight_norms), written atomically at the end
    RUN/member_000/tensorboard/        optional TensorBoard logs

Epochs are counted from 1 everywhere (history.csv, checkpoint names, logs): epoch E is the E-th
pass over the data and ``ckpt-E`` the state after it. Runs written before history.csv counted from
1 numbered its rows from 0; :func:`read_history` and :func:`truncate_history` renumber such files.
NumPy and the standard library only (no TensorFlow import).
"""
from __future__ import annotations

import csv
import datetime
import io
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import __version__
from ..atomic import write_json, write_text
from ..errors import FileError, InputError
from ..validation import positive_number

if TYPE_CHECKING:  # pragma: no cover
    from .config import TrainConfig

RUN_FORMAT = "tfgalflow-run"
#: Version of the run-directory layout; ``load_run``/``resume`` refuse any other.
RUN_FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.csv"
WEIGHTS_PREFIX = "weights"
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
FINAL_DIR = "final"
SUMMARY_FILE = "summary.json"
#: Keras verbosity of a run whose config.json does not record one (0 silent, 1 bar, 2 lines).
DEFAULT_VERBOSE = 1


def member_name(k: int) -> str:
    """Directory name of ensemble member k inside a run: ``member_000``, ``member_001``, ..."""
    return f"member_{k:03d}"


def member_dir(run_dir: str | os.PathLike, run: dict, k: int) -> Path:
    """``RUN/member_XXX`` of member k of the run whose parsed config.json is ``run``."""
    return Path(run_dir) / run["members"][k]["name"]


def final_weights_prefix(run_dir: str | os.PathLike, run: dict, k: int) -> Path:
    """Checkpoint prefix of member k's final weights: ``RUN/member_XXX/final/weights``."""
    return member_dir(run_dir, run, k) / FINAL_DIR / WEIGHTS_PREFIX


def member_finished(run_dir: str | os.PathLike, run: dict, k: int) -> bool:
    """True once member k's final weights exist (they are written atomically, last)."""
    return Path(f"{final_weights_prefix(run_dir, run, k)}.index").is_file()


def member_summary(run_dir: str | os.PathLike, run: dict, k: int) -> dict:
    """Member k's ``final/summary.json`` (seed, epochs_run, monitor, best, best_epoch, ...);
    FileError if it is missing or corrupt.
    """
    path = member_dir(run_dir, run, k) / FINAL_DIR / SUMMARY_FILE
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FileError(f"{path}: missing or corrupt member summary: {exc}") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("best"), (int, float)):
        raise FileError(f"{path}: corrupt member summary: no number under \"best\"")
    return summary


#: How far (nats per point) a member's best validation loss may lie above the members' median
#: before :func:`outlying_members` reports it: well above the seed-to-seed spread of members
#: that trained (a few hundredths of a nat in the package's studies), below a diverged or
#: stalled start (0.12 to 0.8 nat above the others in the photo-z runs).
OUTLIER_MARGIN = 0.1


def outlying_members(run_dir: str | os.PathLike, margin: float = OUTLIER_MARGIN) -> list[dict]:
    """Finished members whose best validation loss lies more than ``margin`` above the median.

    An ensemble averages its members' densities with equal weights, so one member that diverged
    or stalled early (best loss L_k ≫ the others') spoils the mixture where its density is
    broad. With M ≥ 3 finished members and L̃ the median of their best losses (each member's
    ``final/summary.json`` "best"), a member is reported when L_k − L̃ > margin. With fewer than
    3 the median cannot tell which member is off, and none is reported.

    Args:
        run_dir: a run directory.
        margin: nats per point (> 0); default :data:`OUTLIER_MARGIN`.

    Returns:
        [{"member": "member_005", "best": L_k, "median": L̃, "excess": L_k − L̃}, ...], in
        member order (empty if none).

    Raises:
        FileError: not a run directory, or a corrupt summary.json.
        InputError: margin not a finite number > 0.
    """
    margin = positive_number(margin, "outlying_members margin")
    run = read_run_config(run_dir)
    best = {member["name"]: float(member_summary(run_dir, run, k)["best"])
            for k, member in enumerate(run["members"]) if member_finished(run_dir, run, k)}
    if len(best) < 3:
        return []
    median = float(np.median(list(best.values())))
    return [{"member": name, "best": value, "median": median, "excess": value - median}
            for name, value in best.items() if value - median > margin]


def checkpoint_epoch(path: str | None) -> int:
    """Epochs done E of a checkpoint prefix ``.../ckpt-E`` (-1 for None: no checkpoint)."""
    return -1 if path is None else int(re.search(r"-(\d+)$", path).group(1))


def read_run_config(run_dir: str | os.PathLike) -> dict:
    """Parsed ``RUN/config.json``; FileError if missing, corrupt, or of another run-format
    version.
    """
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileError(f"{path}: no such file; {run_dir} is not a tfgalflow run directory")
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FileError(f"{path}: corrupt run config: {exc}") from None
    if not isinstance(d, dict) or d.get("format") != RUN_FORMAT:
        raise FileError(f"{path}: not a tfgalflow run config (expected \"format\": "
                        f"\"{RUN_FORMAT}\")")
    if d.get("format_version") != RUN_FORMAT_VERSION:
        raise FileError(f"{path}: run-format version {d.get('format_version')!r} is not supported "
                        f"by tfgalflow {__version__} (expected {RUN_FORMAT_VERSION}); retrain "
                        f"with `tfgalflow train DATA --config {path} --out NEWRUN`")
    for key in ("train", "flow", "members", "data"):
        if key not in d:
            raise FileError(f"{path}: run config lacks the '{key}' section")
    return d


def new_run(run_dir: Path, config: "TrainConfig", flow_config: Any, data_description: dict,
            verbose: Any = DEFAULT_VERBOSE) -> dict:
    """Create the run directory and its config.json; FileError if it already holds something.

    Returns the parsed config.json: ``format``, ``format_version``, ``tfgalflow_version``,
    ``created``, ``train`` (TrainConfig), ``flow`` (FlowConfig), ``members`` (name, seed),
    ``data`` (description) and ``verbose`` (the Keras verbosity a resume keeps).
    """
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise FileError(f"{run_dir}: run directory exists and is not empty; continue it with "
                        f"resume() (`tfgalflow train --resume {run_dir}`) or choose another "
                        f"directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    run = {
        "format": RUN_FORMAT,
        "format_version": RUN_FORMAT_VERSION,
        "tfgalflow_version": __version__,
        "created": _now(),
        "train": config.to_dict(),
        "flow": flow_config.to_dict(),
        "members": _member_entries(config.seed, 0, config.members),
        "data": data_description,
        "verbose": verbose,
    }
    write_json(run_dir / CONFIG_FILE, run)
    return run


def _now() -> str:
    """The current UTC time, ISO 8601 to the second (config.json's timestamps)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _member_entries(seed: int, start: int, stop: int) -> list[dict]:
    """config.json's entries of members k = start, ..., stop - 1: name and seed ``seed + k``."""
    return [{"name": member_name(k), "seed": seed + k} for k in range(start, stop)]


def grow_members(run_dir: Path, run: dict, members: int) -> dict:
    """Grow a run's ensemble to ``members`` members; returns the updated parsed config.json.

    The new members k = K_old, ..., members - 1 get the seeds ``seed + k`` they would have had
    had the run been started with ``members`` (so a grown run equals one trained whole);
    config.json records them (atomically) and the next resume trains them. Finished members are
    never discarded: fewer members than recorded is an InputError (an ensemble of some members
    is ``Ensemble([...])`` of their flows). Each growth is appended to config.json's ``grown``
    list as {"time", "from", "to"} (``created`` keeps the time the run began).
    """
    recorded = len(run["members"])
    if members < recorded:
        raise InputError(f"members = {members}: {run_dir} already has {recorded} members; a run "
                         f"can grow, not shrink")
    if members == recorded:
        return run
    run = {
        **run,
        "train": {**run["train"], "members": members},
        "members": run["members"] + _member_entries(int(run["train"]["seed"]), recorded, members),
        "grown": run.get("grown", []) + [{"time": _now(), "from": recorded, "to": members}],
    }
    write_json(run_dir / CONFIG_FILE, run)
    return run


def read_history(run_dir: str | os.PathLike, member: int = 0) -> dict[str, np.ndarray]:
    """The per-epoch history of one member: {"epoch": int [E] (1, 2, ...), "loss": [E],
    "val_loss": [E], ...}.
    """
    path = Path(run_dir) / member_name(member) / HISTORY_FILE
    rows = _read_history_rows(path)
    if not rows:
        return {"epoch": np.zeros(0, int)}
    keys = list(rows[0])
    return {
        k: np.array([int(r[k]) if k == "epoch" else _history_value(r[k]) for r in rows])
        for k in keys
    }


def _history_value(text: str) -> float:
    """A history.csv loss: a number, or NaN for Keras' "NA" (no validation rows: CSVLogger always
    writes a val_loss column).
    """
    return float("nan") if text == "NA" else float(text)


def _read_history_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a history.csv with 1-based epochs, skipping torn lines (a crash mid-write) and
    keeping the first of duplicates. A file whose epochs start at 0 (written before history.csv
    counted from 1) is renumbered on reading.
    """
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        rows, seen = [], set()
        for row in reader:
            try:
                epoch = int(row["epoch"])
                [_history_value(v) for k, v in row.items() if k != "epoch"]
            except (TypeError, ValueError, KeyError):
                continue
            if epoch not in seen:
                seen.add(epoch)
                rows.append(row)
    if 0 in seen:
        rows = [dict(r, epoch=str(int(r["epoch"]) + 1)) for r in rows]
    return rows


def truncate_history(path: Path, epochs_done: int) -> None:
    """Keep only the rows of epochs 1..epochs_done, so a resumed run appends without duplicates
    (rewrites a file with torn lines, duplicates or 0-based epochs; removes one left empty).
    """
    rows = _read_history_rows(path)
    kept = [r for r in rows if int(r["epoch"]) <= epochs_done]
    if not path.exists() or (len(kept) == len(rows) and _well_formed(path, rows)):
        return
    if not kept:
        path.unlink()
        return
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(kept[0]), dialect="excel")  # CSVLogger's dialect
    writer.writeheader()
    writer.writerows(kept)
    write_text(path, out.getvalue())


def _well_formed(path: Path, rows: list[dict[str, str]]) -> bool:
    """True if the file has exactly a header and one line per row, the last one complete, and
    its epoch column is the 1-based one of ``rows``.
    """
    text = path.read_text()
    lines = text.splitlines()[1:]
    return (text.endswith("\n") and len(lines) == len(rows)
            and all(line.split(",", 1)[0] == r["epoch"] for line, r in zip(lines, rows)))
