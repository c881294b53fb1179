"""The ``tfgalflow`` command line: thin argparse subcommands over the Python API.

Each subcommand has an ``_add_<name>(subparsers)`` function that declares its arguments and sets
``func`` to a ``_run_<name>(args) -> int`` handler. Errors the package raises on purpose
(``TfgalflowError``) are printed as one line and exit with status 2; anything else is a bug and
keeps its traceback.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import TYPE_CHECKING

# keep TensorFlow's C++ start-up chatter off the CLI
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from . import __version__  # noqa: E402
from .errors import TfgalflowError  # noqa: E402

if TYPE_CHECKING:
    from .density import Density


_SUBCOMMANDS = []   # the _add_<name> functions, in the order `tfgalflow --help` lists them

# ---- subcommands ------------------------------------------------------------------------------
# Each block: _add_<name>(sub) declares the arguments and sets func=_run_<name>; _run_<name>(args)
# calls the Python API and returns an exit code; the block ends with
# _SUBCOMMANDS.append(_add_<name>).


# ---- train, sample, logprob (training) ----------------------------------------------------------

_CONFIG_METAVAR = {"int": "N", "int?": "N|none", "float": "X", "float?": "X|none", "str": "NAME",
                   "ints": "N,N,...", "pairs?": "K:X,..."}


def _add_config_flag(group, field: str, kind: str, text: str, dest: str) -> None:
    """One flag --field-name of a config dataclass field (bool: --x/--no-x; else a value)."""
    flag = "--" + field.replace("_", "-")
    if kind == "bool":
        group.add_argument(
            flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=text
        )
    else:
        metavar = _CONFIG_METAVAR.get(kind, "VALUE")
        group.add_argument(flag, dest=dest, metavar=metavar, default=None, help=text)


def _add_train(sub) -> None:
    from .training import TrainConfig   # stdlib + NumPy only: keeps `tfgalflow --help` fast

    p = sub.add_parser(
        "train",
        help="fit a flow (or an ensemble) to a catalogue; write a run directory",
        description="Fit a normalizing flow to a catalogue by maximum likelihood and write a run "
        "directory (config.json, history.csv, checkpoints, final weights). Settings: TrainConfig "
        "defaults, then --config FILE, then the flags below (flags win). --resume RUN continues "
        "an interrupted run exactly as configured; with --members K it also grows the "
        "ensemble to K members (the new ones train with seeds seed + k).",
    )
    p.add_argument("catalogue", nargs="?", metavar="CATALOGUE",
                   help="catalogue file: .npz (loaded into memory), .h5/.hdf5 (streamed) or "
                        ".parquet (loaded; streamed with --stream or --multi-worker)")
    p.add_argument("--out", metavar="RUN", help="new (or empty) run directory")
    p.add_argument(
        "--config", metavar="FILE", help="TrainConfig as JSON/YAML, or a run's config.json"
    )
    p.add_argument(
        "--resume", metavar="RUN", help="continue the interrupted run RUN from its checkpoints"
    )
    p.add_argument("--verbose", type=int, choices=(0, 1, 2), default=None,
                   help="0 quiet, 1 progress bar (default), 2 one line per epoch; "
                        "--resume keeps the run's own unless given")
    p.add_argument("--units", metavar="LENGTH,VELOCITY",
                   help="units of a catalogue that does not record them (e.g. m,m/s for the "
                        "reference study's plain pos/vel .npz)")
    p.add_argument("--event-columns", metavar="A,B,...",
                   help="a .parquet CATALOGUE's event (data) columns, e.g. m0,m1")
    p.add_argument("--label-columns", metavar="A,B,...",
                   help="a .parquet CATALOGUE's label columns, e.g. Z,alpha (dictionary-encoded "
                        "or plain)")
    p.add_argument("--stream", action="store_true",
                   help="stream a .parquet CATALOGUE in shuffled batches instead of loading it "
                        "(flat memory; validation rows spread evenly over the file); always so "
                        "with --multi-worker, each worker reading its own shard")
    defaults = TrainConfig()
    group = p.add_argument_group("training configuration (one flag per TrainConfig field)")
    for name, (kind, text) in TrainConfig.field_help().items():
        default = getattr(defaults, name)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        shown = "none" if shown in (None, "") else shown
        _add_config_flag(group, name, kind, f"{text} (default: {shown})", f"config_{name}")
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from .errors import InputError
    from .training import TrainConfig, resume, train

    overrides = {name: getattr(args, f"config_{name}") for name in TrainConfig.field_help()
                 if getattr(args, f"config_{name}") is not None}
    if args.resume:
        # --members K grows the ensemble (the new members train, the others are kept)
        members = overrides.pop("members", None)
        extra = [flag for flag, value in (("--out", args.out), ("--config", args.config)) if value]
        extra += ["--" + name.replace("_", "-") for name in overrides]
        if extra:
            raise InputError(
                "--resume RUN continues the run exactly as it was configured (only --members "
                f"may grow it); drop {', '.join(extra)}"
            )
        if args.catalogue:
            # A run trained on data read in memory (--units, .parquet) resumes with the same data,
            # checked against the sha256 recorded in its config.json; a streamed one streams.
            from .training import read_run_config
            streamed = read_run_config(args.resume)["data"].get("source") == "parquet"
            data, labels, _ = _parquet_training_data(args, stream=streamed)
            resume(args.resume, data=data, labels=labels, verbose=args.verbose, members=members)
        else:
            resume(args.resume, verbose=args.verbose, members=members)
        run_dir = args.resume
        from .training import read_run_config
        multi_worker = bool(read_run_config(run_dir)["train"].get("multi_worker"))
    else:
        if not args.catalogue or not args.out:
            raise InputError("train needs a CATALOGUE file and --out RUN (or --resume RUN)")
        config = TrainConfig.from_file(args.config) if args.config else TrainConfig()
        config = config.with_overrides(**overrides)
        verbose = 1 if args.verbose is None else args.verbose
        data, labels, names = _parquet_training_data(args, args.stream or config.multi_worker)
        train(data, config, args.out, labels=labels, label_names=names, verbose=verbose)
        run_dir, multi_worker = args.out, config.multi_worker
    if multi_worker:
        from .training.distributed import chief_process
        if not chief_process():          # the chief writes (and reports) the run directory
            print(f"worker finished; the chief writes {run_dir}")
            return 0
    _print_run_summary(run_dir)
    return 0


def _parquet_training_data(args, stream: bool = False) -> tuple:
    """(data, labels, label_names) for train(): a .parquet file is read by its named columns
    (with ``stream``: opened lazily, streamed); a catalogue that records no units is read with
    ``--units`` (in memory).
    """
    from pathlib import Path
    from .catalogue import PARQUET_SUFFIXES, Catalogue, open_parquet, read_parquet
    from .errors import InputError
    from .points import parse_units

    if Path(args.catalogue).suffix.lower() not in PARQUET_SUFFIXES:
        if args.event_columns or args.label_columns:
            raise InputError("--event-columns/--label-columns apply to .parquet catalogues only")
        if getattr(args, "stream", False) and Path(args.catalogue).suffix.lower() in (".npz",):
            raise InputError("--stream applies to .parquet catalogues (.h5/.hdf5 always stream; "
                             "a .npz is loaded): convert the catalogue to .h5 to stream it")
        units = parse_units(args.units)
        if units is not None:
            return Catalogue.load(args.catalogue, units=units), None, None
        return args.catalogue, None, None
    if not args.event_columns:
        raise InputError(f"{args.catalogue}: a Parquet catalogue needs --event-columns, "
                         f"e.g. m0,m1")
    if stream:
        table = open_parquet(args.catalogue, args.event_columns, args.label_columns or ())
        return table, None, None
    table = read_parquet(args.catalogue, args.event_columns, args.label_columns or ())
    return table.events, table.labels, table.label_names or None


def _print_run_summary(run_dir: str) -> None:
    from .training import member_summary, read_run_config

    run = read_run_config(run_dir)
    for k, member in enumerate(run["members"]):
        s = member_summary(run_dir, run, k)
        print(
            f"{run_dir}/{member['name']}: seed {s['seed']}, {s['epochs_run']} epochs, best "
            f"{s['monitor']} {s['best']:.6g} after epoch "
            f"{s['best_epoch'] + 1}{' (stopped early)' if s['stopped_early'] else ''}"
        )


_SUBCOMMANDS.append(_add_train)


def _add_sample(sub) -> None:
    p = sub.add_parser(
        "sample",
        help="draw points from a trained run or SavedModel",
        description="Draw N points x ~ p(x | labels) from a finished run "
        "(the equal-weight mixture of its members for an ensemble) or an exported SavedModel, in "
        "the physical units of the training data.",
    )
    p.add_argument(
        "run", metavar="MODEL", help="run directory (tfgalflow train) or SavedModel directory"
    )
    p.add_argument("--n", type=_count, required=True,
                   help="number of points (>= 1; 1e6 is accepted), per label row with "
                        "--labels-file")
    p.add_argument(
        "--labels",
        metavar="V1,V2,...",
        help="label values (one per label column) for a conditional run",
    )
    p.add_argument(
        "--labels-file",
        metavar="TABLE",
        help="a CSV table of label rows (e.g. galaxies.csv: one galaxy per row) for a "
        "conditional run: N points for each row. With a header, the run's label columns are "
        "taken by name (other columns, e.g. id, are ignored); without, exactly its label columns",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed (default: fresh entropy)")
    p.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help=".npy, .txt/.csv, or .npz/.h5/.hdf5 (a Catalogue when the run models 6D phase "
        "space); .h5/.hdf5 are written in chunks, resumably (tfgalflow.batch.sample_file)",
    )
    _add_chunk_flag(p)
    p.set_defaults(func=_run_sample)


def _add_chunk_flag(p) -> None:
    p.add_argument("--chunk", type=int, default=None, metavar="ROWS",
                   help="rows per chunk of a streamed .h5/.hdf5 output (default: 65536; accel: "
                        "4096 positions); a killed job run again keeps its finished chunks")


def _model_description(path: str) -> tuple["Density", dict]:
    """(model, the data description of its run: units, label_names) for a run or SavedModel
    directory.
    """
    from .export import ExportedModel, load
    from .training import read_run_config

    model = load(path)
    run = (
        (model.metadata.get("run") or {})
        if isinstance(model, ExportedModel)
        else read_run_config(path)
    )
    return model, run.get("data") or {}


def _run_sample(args) -> int:
    from pathlib import Path
    import numpy as np
    from .points import SAMPLE_SUFFIXES, check_output, write_samples
    from .validation import integer, seed

    integer(args.n, "--n")
    if args.seed is not None:
        seed(args.seed, "--seed")
    check_output(args.out, SAMPLE_SUFFIXES, "samples")
    model, data = _model_description(args.run)
    names = data.get("label_names") or []
    if args.labels_file:
        if args.labels:
            from .errors import InputError
            raise InputError("give --labels or --labels-file, not both")
        labels = _label_table(args.labels_file, model.label_dim, names)
    else:
        labels = _label_values(args.labels, model.label_dim, names)
    total = args.n * (len(labels) if labels is not None and labels.ndim == 2 else 1)
    if _streamed(args.out):
        from .batch import DEFAULT_CHUNK, sample_file
        sample_file(model, args.n, args.out, labels=labels, seed=args.seed,
                    chunk=args.chunk or DEFAULT_CHUNK, units=data.get("units"),
                    label_names=tuple(names), progress=True,
                    meta={"source": "tfgalflow sample", "run": str(Path(args.run).resolve())})
        print(f"wrote {total} samples [{total}, {model.dim}] to {args.out}")
        return 0
    rows = None if labels is None else np.repeat(np.atleast_2d(labels), args.n, axis=0)
    x = np.asarray(model.sample(total, labels=rows, seed=args.seed), np.float64)
    write_samples(
        args.out,
        x,
        rows,
        units=data.get("units"),
        label_names=tuple(names),
        meta={
            "source": "tfgalflow sample",
            "run": str(Path(args.run).resolve()),
            "seed": args.seed,
        },
    )
    print(f"wrote {total} samples [{total}, {model.dim}] to {args.out}")
    return 0


def _count(text: str) -> int:
    """A count from the command line: an integer, also written as 1e6 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value == int(value) and abs(value) < 2**63):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 1, e.g. 1000000 "
                                         f"or 1e6")
    return int(value)        # the command checks the range (>= 1) with its own message


def _label_table(path: str, label_dim: int, names: list[str]):
    """Label rows [G, C] of a CSV table (header: the run's label names picked by name)."""
    import csv

    import numpy as np
    from .errors import FileError, InputError

    if label_dim == 0:
        raise InputError("the run is unconditional (label_dim = 0); drop --labels-file")
    try:
        with open(path, newline="") as fh:
            rows = [r for r in csv.reader(fh) if r and not r[0].startswith("#")]
    except OSError as exc:
        raise FileError(f"{path}: cannot read the label table: {exc}") from None
    if not rows:
        raise InputError(f"{path}: the label table is empty")

    def numeric(row: list[str]) -> bool:
        try:
            [float(v) for v in row]
            return True
        except ValueError:
            return False

    header = None if numeric(rows[0]) else [h.strip() for h in rows[0]]
    body = rows[1:] if header else rows
    if header is not None:
        missing = [n for n in names if n not in header]
        if not names or missing:
            raise InputError(f"{path}: the run's label columns {names or '(unnamed)'} are not "
                             f"all in the header {header} (missing: {missing or names}); name "
                             f"them, or give a table without header of exactly {label_dim} "
                             f"columns")
        pick = [header.index(n) for n in names]
    else:
        pick = list(range(label_dim))
        if any(len(r) != label_dim for r in body):
            raise InputError(f"{path}: a table without header needs exactly {label_dim} columns "
                             f"(the run's labels {names}) in every row")
    try:
        table = np.array([[float(r[j]) for j in pick] for r in body], np.float64)
    except (ValueError, IndexError):
        raise InputError(f"{path}: non-numeric or missing label values in the rows") from None
    if table.size == 0 or not np.all(np.isfinite(table)):
        raise InputError(f"{path}: expected at least one row of finite label values")
    return table


def _label_values(text: str | None, label_dim: int, names: list[str]):
    import numpy as np
    from .errors import InputError

    if label_dim == 0:
        if text:
            raise InputError("the run is unconditional (label_dim = 0); drop --labels")
        return None
    described = f"{label_dim} value(s) ({', '.join(names)})" if names else f"{label_dim} value(s)"
    if not text:
        raise InputError(f"the run is conditional: give --labels with {described}")
    try:
        values = np.array([float(v) for v in text.split(",")], dtype=np.float64)
    except ValueError:
        raise InputError(
            f"--labels {text!r}: expected comma-separated numbers, {described}"
        ) from None
    if values.size != label_dim:
        raise InputError(
            f"--labels {text!r} has {values.size} value(s); the run expects {described}"
        )
    return values


_SUBCOMMANDS.append(_add_sample)


def _add_logprob(sub) -> None:
    p = sub.add_parser(
        "logprob",
        help="log-density of points under a trained run or SavedModel",
        description="Evaluate log p(x | labels) (per unit physical volume of the training data) "
        "at the points of a file.",
    )
    p.add_argument(
        "run", metavar="MODEL", help="run directory (tfgalflow train) or SavedModel directory"
    )
    p.add_argument(
        "points",
        metavar="POINTS",
        help="[N, D] points: .npy, .npz (one array, or a catalogue), .txt/.dat/.csv, or a "
        "catalogue .h5/.hdf5",
    )
    p.add_argument(
        "--units",
        metavar="LENGTH,VELOCITY",
        help="units of a catalogue file that does not record them "
        "(e.g. m,m/s for a plain pos/vel .npz)",
    )
    p.add_argument(
        "--labels-file",
        metavar="F",
        help="[N, C] labels of a conditional run, same formats (default: the catalogue's labels)",
    )
    p.add_argument(
        "--out", metavar="FILE", help=".npy, .txt or .csv (default: print one value per line), or "
        ".h5/.hdf5: dataset log_prob [N] streamed in chunks with flat memory, resumable "
        "(tfgalflow.batch.log_prob_file)"
    )
    _add_chunk_flag(p)
    p.set_defaults(func=_run_logprob)


def _streamed(out: str | None) -> bool:
    """True for an .h5/.hdf5 output: written chunk by chunk by tfgalflow.batch."""
    return bool(out) and out.lower().endswith((".h5", ".hdf5"))


def _run_logprob(args) -> int:
    import numpy as np
    from .points import ARRAY_SUFFIXES, check_output, parse_units, read_points, write_array

    if _streamed(args.out):
        from .batch import DEFAULT_CHUNK, log_prob_file
        check_output(args.out, (".h5", ".hdf5"), "log-densities")
        model, _ = _model_description(args.run)
        log_prob_file(model, args.points, args.out, labels=args.labels_file,
                      units=parse_units(args.units), chunk=args.chunk or DEFAULT_CHUNK,
                      progress=True)
        print(f"wrote log-densities of {args.points} to {args.out} (dataset log_prob)")
        return 0
    if args.out:
        check_output(args.out, ARRAY_SUFFIXES, "log-densities")
    x, labels = read_points(args.points, units=parse_units(args.units))
    if args.labels_file:
        labels, _ = read_points(args.labels_file, column_ok=True)
    model, _ = _model_description(args.run)
    if model.label_dim == 0:
        labels = None          # an unconditional model ignores the labels a catalogue may carry
    lp = np.asarray(model.log_prob(x, labels))
    if args.out:
        write_array(args.out, lp, "log-densities")
        print(f"wrote {lp.size} log-densities to {args.out}")
    else:
        print("\n".join(f"{v:.9g}" for v in lp))
    return 0


_SUBCOMMANDS.append(_add_logprob)


# ---- export, serve (serving) --------------------------------------------------------------------

def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a trained run as a versioned SavedModel for TF Serving",
        description="Write RUN's model to OUT/NAME/<next free version>/ as a SavedModel with the "
        "signatures serving_default (= log_prob), log_prob, grad_log_prob, sample and, for "
        "6D phase-space models, accelerations; then regenerate OUT/models.config "
        "for tensorflow_model_server. Never overwrites a version. Prints the version directory.",
    )
    p.add_argument(
        "run", metavar="RUN",
        help="finished run directory (written by `tfgalflow train`), or a tfgalflow SavedModel "
             "to export again with this version's signatures"
    )
    p.add_argument("--name", required=True, help="model name (the URL's /v1/models/NAME)")
    p.add_argument("--out", default="saved_models", metavar="DIR",
                   help="model base directory (default: saved_models)")
    p.add_argument(
        "--base-path",
        metavar="DIR",
        default="/models",
        help="where --out is for the server, written into models.config (default: /models, "
        "as mounted in the tensorflow/serving container; give the absolute path of "
        "--out for a tensorflow_model_server on this host)",
    )
    p.add_argument(
        "--version-policy",
        choices=("all", "latest"),
        default="all",
        help="models.config version policy: serve all versions (default, as `tfgalflow serve`) "
        "or only the latest (TF Serving's default)",
    )
    p.add_argument("--accelerations", action=argparse.BooleanOptionalAction, default=None,
                   help="add the accelerations signature (default: when the model is 6D)")
    p.add_argument(
        "--n-velocities",
        type=int,
        default=256,
        metavar="K",
        help="velocities sampled per position by the accelerations signature (default: 256)",
    )
    p.add_argument(
        "--rotations",
        type=int,
        default=0,
        metavar="M",
        help="for a spherical system: export the DF averaged over M random rotations, so every "
        "signature answers for it (tfgalflow.symmetry.SphericalAverage; default: 0, off)",
    )
    p.set_defaults(func=_run_export)


def _spherical_average(model, rotations: int, seed: int = 0):
    """``--rotations M``: the model averaged over M rotations (tfgalflow.symmetry), itself for
    M = 0.
    """
    from .errors import InputError
    if rotations < 0:
        raise InputError(
            f"--rotations {rotations}: expected 0 (off) or a number of rotations >= 1"
        )
    if not rotations:
        return model
    from .symmetry import SphericalAverage
    return SphericalAverage(model, rotations, seed=seed)


def _run_export(args) -> int:
    from pathlib import Path
    from .export import (
        ExportedModel, export_versioned, load, rebuild_model, versions, write_models_config,
    )
    from .training import load_run, read_run_config
    source = Path(args.run)
    if not ((source / "saved_model.pb").is_file() or versions(source)):
        run_config = read_run_config(args.run)          # a run directory, or its one-line error
        model = load_run(args.run)
    else:
        # A SavedModel (e.g. from an older tfgalflow): rebuilt, exported with today's signatures.
        exported = load(args.run)
        run_config = exported.metadata.get("run") if isinstance(exported, ExportedModel) else None
        model = rebuild_model(args.run)
    model = _spherical_average(model, args.rotations)
    path = export_versioned(model, args.out, args.name, run_config=run_config,
                            accelerations=args.accelerations, n_velocities=args.n_velocities)
    write_models_config(args.out, base_path=args.base_path, version_policy=args.version_policy)
    print(path)
    return 0


_SUBCOMMANDS.append(_add_export)


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve SavedModels over the TensorFlow Serving REST API",
        description="Serve every model under BASE (BASE/NAME/<version>/saved_model.pb; all "
        "versions, the highest by default) at "
        "http://HOST:PORT/v1/models/NAME[:predict|/metadata], speaking the TF Serving REST API. "
        "Listens on loopback only unless --host says otherwise.",
    )
    p.add_argument("base", metavar="BASE", help="model base directory, e.g. saved_models/")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to listen on (default: 127.0.0.1; 0.0.0.0 exposes the server to the "
        "network)",
    )
    p.add_argument(
        "--port", type=int, default=8501, help="port (default: 8501, TF Serving's REST port)"
    )
    p.add_argument("--max-body-mb", type=float, default=64.0, metavar="MB",
                   help="largest request body in MiB; larger ones get 413 (default: 64)")
    p.add_argument("--max-rows", type=int, default=100_000, metavar="N",
                   help="largest batch per request; larger ones get 413 (default: 100000)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="threads parsing requests and running log_prob/grad_log_prob/serving_default "
        "(default: min(4, CPUs))",
    )
    p.add_argument(
        "--heavy-workers",
        type=int,
        default=None,
        metavar="N",
        help="threads running the other signatures (sample, accelerations), apart so that "
        "they never hold up cheap requests (default: max(1, workers // 2))",
    )
    p.add_argument("--max-positions", type=int, default=1000, metavar="N",
                   help="most positions per accelerations request; more get 413 (default: 1000)")
    p.add_argument(
        "--request-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds a request may queue and run before it is answered 504 (default: 60)",
    )
    p.add_argument(
        "--poll-seconds",
        type=float,
        default=2.0,
        metavar="S",
        help="rescan BASE for new or removed versions every S seconds (0 = never; default: 2)",
    )
    p.add_argument("--label", action="append", default=[], metavar="NAME:LABEL=VERSION",
                   help="version label for /v1/models/NAME/labels/LABEL URLs (repeatable)")
    p.add_argument(
        "--batch-rows",
        type=int,
        default=256,
        metavar="N",
        help="merge concurrent requests of at most N rows to "
        "log_prob/grad_log_prob/serving_default into one call (0 = off; default: 256)",
    )
    p.set_defaults(func=_run_serve)


def _run_serve(args) -> int:
    from .errors import InputError
    from .serving import serve
    labels: dict = {}
    for item in args.label:
        name, _, rest = item.partition(":")
        label, _, version = rest.partition("=")
        if not (name and label and version.isdigit()):
            raise InputError(
                f"--label {item!r}: expected NAME:LABEL=VERSION, e.g. hernquist_iso:stable=1"
            )
        labels.setdefault(name, {})[label] = int(version)
    if args.max_body_mb <= 0:
        raise InputError(f"--max-body-mb {args.max_body_mb}: expected a positive size in MiB")
    serve(args.base, host=args.host, port=args.port, max_body_bytes=int(args.max_body_mb * 2**20),
          max_rows=args.max_rows, workers=args.workers, poll_seconds=args.poll_seconds or None,
          version_labels=labels, batch_rows=args.batch_rows, heavy_workers=args.heavy_workers,
          max_positions=args.max_positions, request_timeout=args.request_timeout)
    return 0


_SUBCOMMANDS.append(_add_serve)


# ---- accel (cbe) --------------------------------------------------------------------------------

def _add_accel(sub) -> None:
    p = sub.add_parser(
        "accel",
        help="accelerations from the collisionless Boltzmann equation of a trained 6D run",
        description="Solve v . dlogf/dx + a . dlogf/dv = 0 by least squares over K velocities "
        "drawn from the learned DF at each position (tfgalflow.cbe.accelerations; an ensemble "
        "gives the member-to-member spread too). Positions are in the run's length unit; "
        "accelerations come out in velocity^2 / length of the training data. Positions failing a "
        "check (no support, low ESS, ill-conditioned, high residual) are flagged with the reason, "
        "never dropped.",
    )
    p.add_argument(
        "run",
        metavar="RUN",
        help="run directory (tfgalflow train), or a SavedModel with an accelerations signature",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--positions",
        metavar="FILE",
        help="[B, 3] positions: .npy, .npz (one array), .txt/.dat (spaces) or .csv",
    )
    where.add_argument(
        "--radii",
        metavar="R1,R2,...",
        help="radii; each at --directions isotropic random directions",
    )
    p.add_argument("--directions", type=int, default=1, metavar="N",
                   help="random directions per radius with --radii (default: 1)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the directions and the velocity draws (default: 0)",
    )
    p.add_argument("--labels", metavar="V1,V2,...",
                   help="label values (one per label column) of a conditional run: every "
                        "position is solved at this label, a(x | labels)")
    p.add_argument(
        "--n-velocities",
        type=int,
        default=None,
        metavar="K",
        help="velocities per position, >= 8 (default: 256; a SavedModel uses its exported K)",
    )
    p.add_argument("--max-residual", type=float, default=None, metavar="X",
                   help="flag relative residuals above X (default: tfgalflow.cbe.MAX_RESIDUAL)")
    p.add_argument(
        "--max-condition",
        type=float,
        default=None,
        metavar="X",
        help="flag normal-matrix condition numbers above X (default: tfgalflow.cbe.MAX_CONDITION)",
    )
    p.add_argument(
        "--min-ess",
        type=float,
        default=None,
        metavar="X",
        help="flag velocity draws with effective sample size below X "
        "(default: tfgalflow.cbe.MIN_ESS)",
    )
    p.add_argument(
        "--min-log-density",
        type=float,
        default=None,
        metavar="X",
        help="flag positions where log of the integral of f over velocities is below X "
        "(default: off)",
    )
    p.add_argument(
        "--xla",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="--xla: XLA-compile the DF evaluations (run directories only; faster per position, "
        "but compiling takes seconds); --no-xla: the plain graph; default: XLA for large calls "
        "only (tfgalflow.cbe.accelerations, jit_compile=None: tfgalflow.cbe.xla_by_default)",
    )
    p.add_argument(
        "--rotations",
        type=int,
        default=0,
        metavar="M",
        help="for a spherical system: average the learned DF over M random joint rotations of "
        "(x, v) before solving (tfgalflow.symmetry.SphericalAverage; M x the cost; run "
        "directories only; default: 0, off)",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help=".npz (arrays positions, acceleration, a_radial, residual, condition, flagged, "
        "reasons, ...) or .csv; a_radial = a . x/|x|, negative for attraction "
        "(tfgalflow.study.radial_component); .h5/.hdf5: the same datasets streamed in chunks, "
        "resumable (tfgalflow.batch.accel_file; chunk i uses the seed (seed, i))",
    )
    _add_chunk_flag(p)
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="with a streamed .h5/.hdf5 --out: solve the chunks in N local processes, "
                        "each loading RUN itself (the output does not depend on N; a killed job "
                        "resumes with any N; default: 1)")
    p.set_defaults(func=_run_accel)


def _accel_positions(args):
    import numpy as np
    from .errors import InputError
    from .validation import integer, unit_vectors

    if args.positions:
        from .points import read_points
        positions, _ = read_points(args.positions)
        return np.asarray(positions, dtype=np.float64)
    try:
        radii = np.array([float(r) for r in args.radii.split(",")])
    except ValueError:
        raise InputError(
            f"--radii {args.radii!r}: expected comma-separated numbers, e.g. 0.5,1,2"
        ) from None
    if radii.size == 0 or not np.all(np.isfinite(radii)) or np.any(radii < 0):
        raise InputError(f"--radii {args.radii!r}: expected finite radii >= 0")
    integer(args.directions, "--directions")
    directions = unit_vectors(radii.size * args.directions, np.random.default_rng(args.seed))
    return np.repeat(radii, args.directions)[:, None] * directions


def _run_accel(args) -> int:
    import numpy as np
    from . import cbe
    from .errors import InputError
    from .export import ExportedModel, load
    from .potential import is_potential
    from .training import read_run_config

    if is_potential(args.run):          # a potential network (tfgalflow potential): its own branch
        return _run_accel_potential(args)
    if _streamed(args.out):
        from .points import check_output
        check_output(args.out, (".h5", ".hdf5"), "accelerations")
    else:
        cbe.check_output_suffix(args.out)
    positions = cbe.check_positions(_accel_positions(args)).astype(np.float64)
    thresholds = dict(
        max_residual=cbe.MAX_RESIDUAL if args.max_residual is None else args.max_residual,
        max_condition=cbe.MAX_CONDITION if args.max_condition is None else args.max_condition,
        min_ess=cbe.MIN_ESS if args.min_ess is None else args.min_ess,
        min_log_density=args.min_log_density,
    )
    if args.seed < 0:
        raise InputError(f"--seed {args.seed}: expected an integer >= 0")
    if args.workers < 1 or (args.workers > 1 and not _streamed(args.out)):
        raise InputError(f"--workers {args.workers}: expected N >= 1; N > 1 needs a streamed "
                         ".h5/.hdf5 --out")
    model = load(args.run)
    data = (((model.metadata.get("run") or {}) if isinstance(model, ExportedModel)
             else read_run_config(args.run)).get("data") or {})
    label_names = list(data.get("label_names") or [])
    labels = _label_values(args.labels, model.label_dim, label_names)
    if isinstance(model, ExportedModel):
        if _streamed(args.out):
            raise InputError(f"{args.run}: streamed .h5/.hdf5 accelerations need the run "
                             "directory; write a SavedModel's accelerations to .npz or .csv")
        if args.rotations:
            raise InputError(
                f"{args.run}: --rotations applies to run directories; a SavedModel's "
                "accelerations signature is a fixed graph of the model as exported"
            )
        if args.xla:
            raise InputError(
                f"{args.run}: --xla applies to run directories; a SavedModel's accelerations "
                f"signature is a fixed, plain graph"
            )
        exported_k = (model.metadata.get("accelerations") or {}).get("n_velocities")
        if (
            args.n_velocities is not None
            and exported_k is not None
            and args.n_velocities != exported_k
        ):
            raise InputError(
                f"{args.run}: the SavedModel was exported with {exported_k} velocities per "
                "position; drop --n-velocities or use the run directory"
            )
        res = model.accelerations(positions, seed=args.seed, labels=labels, **thresholds)
    elif _streamed(args.out):
        from .batch import DEFAULT_ACCEL_CHUNK, accel_file
        accel_file(args.run if args.workers > 1 else model, args.positions or positions,
                   args.out, seed=args.seed, labels=labels, workers=args.workers,
                   rotations=args.rotations, chunk=args.chunk or DEFAULT_ACCEL_CHUNK,
                   progress=True,
                   n_velocities=256 if args.n_velocities is None else args.n_velocities,
                   jit_compile=args.xla, **thresholds)
        print(f"wrote {len(positions)} accelerations to {args.out}")
        return 0
    else:
        model = _spherical_average(model, args.rotations, seed=args.seed)
        res = cbe.accelerations(
            model,
            positions,
            n_velocities=256 if args.n_velocities is None else args.n_velocities,
            seed=args.seed,
            labels=labels,
            jit_compile=args.xla,
            **thresholds,
        )
    names = label_names if len(label_names) == model.label_dim else None
    res.save(args.out, positions, data.get("units"), labels=labels, label_names=names)
    reasons = res.reasons
    summary = ", ".join(
        f"{name} {int(sum(name in r.split(',') for r in reasons))}"
        for name in (
            "no_support",
            "low_density",
            "low_ess",
            "ill_conditioned",
            "high_residual",
            "non_finite",
        )
        if any(name in r.split(",") for r in reasons)
    )
    print(f"wrote {len(positions)} accelerations to {args.out}; {int(res.flagged.sum())} flagged"
          + (f" ({summary})" if summary else ""))
    return 0


_SUBCOMMANDS.append(_add_accel)


# ---- potential (potential network) -------------------------------------------------------------

def _add_potential(sub) -> None:
    p = sub.add_parser(
        "potential",
        help="fit a potential network Phi(x) to the CBE of a trained 6D run",
        description="Fit a smooth network Phi(x) to v . dlogf/dx - grad Phi . dlogf/dv = 0 over "
        "the whole volume, with no symmetry assumed (tfgalflow.potential.fit_potential): "
        "a = -grad Phi is curl-free and rho = lap Phi / 4 pi G comes out too. Writes POT "
        "(config.json, weights.npz, savedmodel/ with signatures potential, acceleration, "
        "density); `tfgalflow accel POT --radii ...` then evaluates it. Gauge: Phi = 0 at "
        "the centre of the training points (or --reference).",
    )
    p.add_argument("run", metavar="RUN", help="finished 6D run directory (or a SavedModel)")
    p.add_argument("--out", required=True, metavar="POT", help="new potential directory")
    p.add_argument(
        "--data",
        metavar="CATALOGUE",
        help="fit at these stars (e.g. the training catalogue) instead of draws from the DF",
    )
    p.add_argument("--points", type=int, default=None, metavar="N",
                   help="phase-space points drawn from the DF (default: PotentialConfig.n_points)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: PotentialConfig)")
    p.add_argument("--hidden", default=None, metavar="N,N,...", help="hidden layer widths")
    p.add_argument("--activation", default=None, help="softplus, tanh, swish or sigmoid")
    p.add_argument("--G", type=float, default=None,
                   help="gravitational constant in the run's units (default 1: model units)")
    p.add_argument("--reference", default=None, metavar="X,Y,Z", help="gauge point: Phi = 0 there")
    p.add_argument(
        "--rotations",
        type=int,
        default=0,
        metavar="M",
        help="fit to the DF averaged over M rotations (spherical systems only; default 0)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing POT")
    p.set_defaults(func=_run_potential)


def _run_potential(args) -> int:
    from .export import load
    from .potential import PotentialConfig, fit_potential

    hidden = None if args.hidden is None else tuple(int(h) for h in _number_list(args.hidden,
                                                                                 "--hidden"))
    reference = None if args.reference is None else tuple(_number_list(args.reference,
                                                                        "--reference"))
    config = PotentialConfig().with_overrides(n_points=args.points, epochs=args.epochs,
                                              hidden=hidden, activation=args.activation, G=args.G,
                                              reference=reference, seed=args.seed)
    df = _spherical_average(load(args.run), args.rotations, seed=args.seed)
    data = None
    if args.data:
        from .catalogue import Catalogue
        data = Catalogue.load(args.data)
    pot = fit_potential(df, config, data=data, verbose=2)
    pot.save(args.out, overwrite=args.overwrite)
    h = pot.history
    print(f"wrote {args.out}: {len(h.get('loss', []))} epochs, best val_loss "
          f"{min(h.get('val_loss', [float('nan')])):.5g}, {h['n_points'][0]} points")
    return 0


def _run_accel_potential(args) -> int:
    """`tfgalflow accel POT ...` for a potential directory: a = -grad Phi, Phi, rho, support."""
    from .errors import InputError
    from .potential import load_potential, save_field

    for flag, value in (("--rotations", args.rotations), ("--xla", args.xla),
                        ("--n-velocities", args.n_velocities)):
        if value:
            raise InputError(f"{args.run} is a potential network: {flag} applies to DF runs only")
    from pathlib import Path
    if Path(args.out).suffix.lower() not in (".npz", ".csv"):
        raise InputError(f"{args.out}: unknown output type; use .npz or .csv")
    positions = _accel_positions(args)
    pot = load_potential(args.run)
    out = pot.evaluate(positions)
    save_field(args.out, positions, out)
    print(f"wrote {len(positions)} accelerations (with potential and density) to {args.out}; "
          f"{int((~out['supported']).sum())} flagged (no_support)")
    return 0


_SUBCOMMANDS.append(_add_potential)


# ---- mock, info (data) --------------------------------------------------------------------------

#: --units of `tfgalflow mock`: (length, velocity) unit names of tfgalflow.units.
_MOCK_UNITS = {"model": ("model", "model"), "kpc": ("kpc", "km/s"), "si": ("m", "m/s")}
#: `tfgalflow info` computes percentiles from at most this many rows
#: (every k-th row of a larger HDF5 file).
_INFO_ROWS = 1_000_000
_PERCENTILES = (1, 16, 50, 84, 99)


def _add_mock(sub) -> None:
    from .mocks import NOISE_CONVENTIONS

    p = sub.add_parser(
        "mock",
        help="sample a mock catalogue from an exact distribution function",
        description="hernquist: draw N stars from the isotropic (iso) or beta = 1/2 (aniso) "
        "Hernquist DF, exactly; dehnen: from a Dehnen gamma-model with Osipkov-Merritt "
        "anisotropy, one model (--gamma G --ra-inverse Q) or a label grid "
        "(comma lists: N stars per node, labels (gamma, ra_inverse) as columns, training data for "
        "a conditional flow); exactly (tfgalflow.mocks.sample_hernquist) or with emcee, "
        "optionally add fractional Gaussian noise (seeded with --seed + 1; stars it moves beyond "
        "--r-max are dropped), and write a catalogue (.npz/.h5/.hdf5). Radii are in units of the "
        "scale length a; the physical scale comes from --mass-msun and --scale-kpc.",
    )
    p.add_argument("model", choices=("hernquist", "dehnen"), help="galaxy model")
    p.add_argument("--gamma", default="1", metavar="G[,G,...]",
                   help="dehnen: inner density slope(s) gamma in [0, 3) (default: 1, Hernquist)")
    p.add_argument("--ra-inverse", default="0", metavar="Q[,Q,...]",
                   help="dehnen: a / r_a, Osipkov-Merritt anisotropy (0: isotropic; default: 0)")
    p.add_argument(
        "--df",
        choices=("iso", "aniso"),
        default="iso",
        help="iso: Hernquist (1990) f(E); aniso: constant beta = 1/2 f(E, L) (default: iso)",
    )
    p.add_argument(
        "--n", type=int, required=True, help="number of stars (per grid node for a dehnen grid)"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="random seed (default: fresh entropy, recorded in meta)",
    )
    p.add_argument(
        "--r-max",
        type=float,
        default=None,
        metavar="R",
        help="keep only r < R (units of a; default: untruncated for exact, required in practice "
        "for emcee)",
    )
    p.add_argument("--noise", type=float, default=0.0, metavar="LEVEL",
                   help="fractional Gaussian noise, e.g. 0.01 for 1%% (default: 0, none)")
    p.add_argument(
        "--noise-convention",
        choices=NOISE_CONVENTIONS,
        default="coordinate",
        help="coordinate: x_i *= 1 + LEVEL eps (the reference study's); vector: x += LEVEL |x| "
        "eps (default: coordinate)",
    )
    p.add_argument(
        "--sampler", choices=("exact", "emcee"), default="exact", help="sampler (default: exact)"
    )
    p.add_argument(
        "--walkers", type=int, default=64, help="emcee walkers, even, >= 12 (default: 64)"
    )
    p.add_argument("--burn", type=int, default=1000, help="emcee burn-in steps (default: 1000)")
    p.add_argument(
        "--thin", type=int, default=20, help="emcee steps between kept states (default: 20)"
    )
    p.add_argument("--units", choices=tuple(_MOCK_UNITS), default="model",
                   help="model (G = M = a = 1), kpc (kpc, km/s) or si (m, m/s) (default: model)")
    p.add_argument("--mass-msun", type=float, default=1.0e10, metavar="M",
                   help="total mass M in Msun that model units stand for (default: 1e10)")
    p.add_argument("--scale-kpc", type=float, default=1.0, metavar="A",
                   help="scale length a in kpc that model units stand for (default: 1)")
    p.add_argument(
        "--out", required=True, metavar="FILE", help="catalogue file: .npz, .h5 or .hdf5"
    )
    p.set_defaults(func=_run_mock)


def _number_list(text: str, flag: str) -> list[float]:
    """[x1, x2, ...] from "x1,x2,..." or InputError naming the flag."""
    from .errors import InputError
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise InputError(
            f"{flag} {text!r}: expected a number or comma-separated numbers"
        ) from None


def _run_mock(args) -> int:
    import math
    from pathlib import Path
    from .catalogue import HDF5_SUFFIXES, NPZ_SUFFIXES
    from .errors import InputError
    from .hernquist import Hernquist
    from .mocks import add_noise, cut, sample_emcee, sample_hernquist
    from .units import ModelUnits

    suffix = Path(args.out).suffix.lower()
    # checked before sampling: fail fast, write nothing
    if suffix not in NPZ_SUFFIXES + HDF5_SUFFIXES:
        raise InputError(
            f"--out {args.out}: unsupported catalogue extension {suffix!r}; use .npz, .h5 or .hdf5"
        )
    if not (math.isfinite(args.noise) and args.noise >= 0):
        raise InputError(
            f"--noise {args.noise}: level must be a finite fractional noise level >= 0 "
            "(0.01 = 1 %)"
        )
    try:
        model_units = ModelUnits(args.mass_msun, args.scale_kpc)
    except ValueError as exc:
        raise InputError(f"--mass-msun/--scale-kpc: {exc}") from None
    if args.model == "dehnen":
        from .mocks import sample_dehnen, sample_dehnen_grid

        gammas, ra_inverses = (
            _number_list(args.gamma, "--gamma"),
            _number_list(args.ra_inverse, "--ra-inverse"),
        )
        if args.sampler != "exact":
            raise InputError(
                "--sampler emcee applies to hernquist; dehnen mocks are sampled exactly"
            )
        if len(gammas) == len(ra_inverses) == 1:
            cat = sample_dehnen(
                args.n,
                gammas[0],
                ra_inverses[0],
                seed=args.seed,
                r_max=args.r_max,
                model_units=model_units,
            )
        else:
            cat = sample_dehnen_grid(gammas, ra_inverses, args.n, seed=args.seed, r_max=args.r_max,
                                     model_units=model_units)
        described = f"gamma {args.gamma}, a/r_a {args.ra_inverse}"
    elif args.sampler == "exact":
        cat = sample_hernquist(
            args.n, kind=args.df, seed=args.seed, r_max=args.r_max, model_units=model_units
        )
    else:
        model, kind = Hernquist(), args.df
        cat = sample_emcee(
            lambda x, v: model.log_df(x, v, kind),
            args.n,
            nwalkers=args.walkers,
            burn=args.burn,
            thin=args.thin,
            seed=args.seed,
            r_max=args.r_max,
            meta={
                "df": "hernquist",
                "kind": kind,
                "model": {"M": 1.0, "a": 1.0, "G": 1.0},
                "model_units": model_units,
            },
        )
        print(
            f"emcee: mean acceptance fraction {cat.meta['acceptance_fraction']:.3f}, "
            f"autocorrelation time {cat.meta['autocorr_steps']} steps (thin {args.thin})"
        )
    if args.noise > 0:
        cat = add_noise(cat, args.noise, seed=None if args.seed is None else args.seed + 1,
                        convention=args.noise_convention)
        # noise moves stars across r_max: keep the promise r < R (as the study does)
        if args.r_max is not None:
            noisy = len(cat)
            cat = cut(cat, r_max=args.r_max)
            print(
                f"noise moved {noisy - len(cat)} of {noisy} stars beyond --r-max {args.r_max:g}: "
                "dropped them"
            )
    if args.units != "model":
        cat = cat.to_units(*_MOCK_UNITS[args.units])
    cat.save(args.out)
    if args.model == "hernquist":
        described = args.df
    print(
        f"wrote {len(cat)} stars ({args.model} {described}, {args.sampler} sampler"
        + (f", {args.noise:g} noise" if args.noise > 0 else "")
        + f") to {args.out}; units length={cat.units['length']}, velocity={cat.units['velocity']}"
    )
    return 0


_SUBCOMMANDS.append(_add_mock)


def _add_info(sub) -> None:
    p = sub.add_parser(
        "info",
        help="summarise a catalogue file (N, units, labels, radius/speed percentiles, meta)",
        description="Print the number of stars, units, label names, percentiles of r = |x| and "
        "|v|, and the provenance (meta) of a catalogue. Large HDF5 files are not read whole: "
        f"percentiles then come from every k-th row (at most {_INFO_ROWS} rows).",
    )
    p.add_argument(
        "file",
        metavar="FILE",
        help="catalogue: .npz, .h5/.hdf5 (tfgalflow or Gadget PartType4 layout)",
    )
    p.add_argument("--units", metavar="LENGTH,VELOCITY",
                   help="units of a file that records none, e.g. m,m/s for the reference datasets")
    p.set_defaults(func=_run_info)


def _run_info(args) -> int:
    import json
    import math
    from pathlib import Path
    import numpy as np
    from .catalogue import HDF5_SUFFIXES, Catalogue, open_hdf5
    from .errors import InputError

    units = None
    if args.units:
        parts = args.units.split(",")
        if len(parts) != 2:
            raise InputError(
                f"--units {args.units!r}: expected LENGTH,VELOCITY, e.g. kpc,km/s or m,m/s"
            )
        units = {"length": parts[0].strip(), "velocity": parts[1].strip()}
    if Path(args.file).suffix.lower() in HDF5_SUFFIXES:
        lazy = open_hdf5(args.file, units=units)
        n, step = len(lazy), max(1, math.ceil(len(lazy) / _INFO_ROWS))
        cat = lazy.read(step=step)
    else:
        cat = Catalogue.load(args.file, units=units)
        n, step = len(cat), 1
    length, velocity = cat.units["length"], cat.units["velocity"]
    source = "" if step == 1 else f" (from every {step}th row, {len(cat)} rows)"

    def percentiles(values) -> str:
        return ", ".join(
            f"p{q}={v:.4g}" for q, v in zip(_PERCENTILES, np.percentile(values, _PERCENTILES))
        )

    print(f"file: {args.file}")
    print(f"N: {n}")
    print(f"units: length={length}, velocity={velocity}")
    print(f"labels: {', '.join(cat.label_names) if cat.label_names else 'none'}")
    print(f"radius |x| [{length}]{source}: {percentiles(cat.r)}")
    print(f"speed |v| [{velocity}]{source}: {percentiles(cat.speed)}")
    print("meta: " + json.dumps(cat.meta, indent=2, sort_keys=True))
    return 0


_SUBCOMMANDS.append(_add_info)


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run the main job on a small built-in Hernquist mock",
        description="Sample an isotropic Hernquist mock, train a small flow, recover "
        "accelerations from the CBE at a set of radii, print recovered against true, write "
        "figures.",
    )
    p.add_argument(
        "--out",
        default="demo_output",
        help="folder for the run, figure data and PNGs (a previous demo's runs/ in it are "
        "replaced)",
    )
    p.add_argument(
        "--n", type=int, default=None, help="number of stars (default: the built-in demo size)"
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="training epochs (default: the built-in demo value)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    import shutil
    from pathlib import Path

    from .study import StudyConfig, format_table, run_study

    config = StudyConfig.demo().with_overrides(n_stars=args.n, epochs=args.epochs, seed=args.seed)
    out = Path(args.out)
    if (out / "study_config.json").exists() and (out / "runs").exists():
        shutil.rmtree(out / "runs")     # a previous demo's output: the demo always trains afresh
    summary = run_study(config, out, verbose=2)
    print(format_table(summary))
    print(
        f"figures and figure data written to {args.out}/ (accelerations.png, df_slices.png, "
        "mock_iso.png)"
    )
    return 0


_SUBCOMMANDS.append(_add_demo)


# ---- posterior (1-D posteriors on a grid) -------------------------------------------------------

def _add_posterior(sub) -> None:
    p = sub.add_parser(
        "posterior",
        help="1-D posteriors on a grid (MAP, mean, quantiles, HPD, PIT) for many objects",
        description="Evaluate p(z | labels) of a 1-D conditional run or SavedModel on a grid for "
        "every row of an HDF5 file (dataset 'labels' [N, C], optional truths 'z' [N]) and write "
        "the normalised posteriors, summaries and (with truths) PIT, HPD coverage and "
        "sigma_NMAD / eta / bias to an HDF5 file (atomically).",
    )
    p.add_argument(
        "run", metavar="MODEL", help="run directory (tfgalflow train) or SavedModel directory"
    )
    p.add_argument(
        "inputs", metavar="INPUTS", help="HDF5 file with 'labels' [N, C] (and optionally 'z' [N])"
    )
    p.add_argument("--grid", default="0:3:0.005", metavar="START:STOP:STEP",
                   help="grid of z, inclusive (default 0:3:0.005)")
    p.add_argument("--out", required=True, metavar="FILE", help="output HDF5 file (.h5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_posterior)


def _run_posterior(args) -> int:
    import json
    from .posterior import parse_grid, posterior_file

    grid = parse_grid(args.grid)
    model, _ = _model_description(args.run)
    metrics = posterior_file(model, args.inputs, grid, args.out, progress=not args.no_progress)
    print(f"wrote posteriors on {grid.size} grid points to {args.out}")
    if metrics:
        print(json.dumps({k: metrics[k] for k in ("map", "pit_ks", "hpd68_coverage")}))
    return 0


_SUBCOMMANDS.append(_add_posterior)


# ---- task (validation tasks with exact answers) -------------------------------------------------

def _add_task(sub) -> None:
    from .tasks import TASKS, task_names
    from .training import TrainConfig

    p = sub.add_parser(
        "task",
        help="validation tasks with exact answers: simulate, train, evaluate",
        description="Validation tasks: each simulates events at labels, trains a flow, "
        "evaluates it at held-out labels against the exact density and writes "
        "OUT/report.json and figures. Rerunning into OUT resumes the training; rerunning "
        "with a larger --members trains just the new ensemble members.",
    )
    actions = p.add_subparsers(dest="task_action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="list the tasks")
    listing.set_defaults(func=_run_task_list)
    run = actions.add_parser("run", help="run one task: tfgalflow task run NAME --out DIR")
    names = run.add_subparsers(dest="task_name", required=True, metavar="NAME")
    reserved = {"seed", "label_dim"}          # the task sets these training fields itself
    for name in task_names():
        cls = TASKS[name]
        r = names.add_parser(name, help=cls.description, description=cls.description)
        r.add_argument("--out", required=True, help="task directory (report.json, figures, run/)")
        r.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2),
                       help="Keras progress output: 0 quiet, 1 progress bar, 2 one line per epoch")
        group = r.add_argument_group(
            f"task configuration (one flag per {cls.config_type.__name__} field)"
        )
        task_fields = cls.config_type.field_help()
        for field, (kind, text) in task_fields.items():
            _add_config_flag(
                group,
                field,
                kind,
                f"{text} (default: {getattr(cls.config_type(), field)})",
                f"task_{field}",
            )
        group = r.add_argument_group(
            "training configuration (TrainConfig fields; default: the task's)"
        )
        for field, (kind, text) in TrainConfig.field_help().items():
            if field not in reserved and field not in task_fields:
                _add_config_flag(group, field, kind, text, f"train_{field}")
        r.set_defaults(func=_run_task_run, task_fields=list(task_fields),
                       train_fields=[f for f in TrainConfig.field_help()
                                     if f not in reserved and f not in task_fields])


def _run_task_list(args) -> int:
    from .tasks import TASKS, task_names

    for name in task_names():
        print(f"{name:20s} {TASKS[name].description}")
    return 0


def _run_task_run(args) -> int:
    from .tasks import run_task

    overrides = {f: getattr(args, f"task_{f}") for f in args.task_fields
                 if getattr(args, f"task_{f}") is not None}
    train = {f: getattr(args, f"train_{f}") for f in args.train_fields
             if getattr(args, f"train_{f}") is not None}
    report = run_task(args.task_name, args.out, overrides, train, verbose=args.verbose)
    for name, t in report["targets"].items():
        print(f"{name:12s} {t['measured']:.4g} {t['relation']} {t['threshold']:g}  "
              f"{'met' if t['met'] else 'NOT met'}  ({t['description']})")
    print(f"report: {args.out}/report.json; figures: {', '.join(report['figures'])}")
    return 0


_SUBCOMMANDS.append(_add_task)


# ---- infer-labels (label inference) -------------------------------------------------------------

def _add_infer_labels(sub) -> None:
    p = sub.add_parser(
        "infer-labels",
        help="infer a conditional model's labels (hyperparameters) from observed events",
        description="log L(c) = sum_i log p(x_i | c) of the labels c given events x_i: a "
        "likelihood map, the maximum (scipy), and emcee posterior samples under a box prior "
        "(uniform, or log-uniform with :log). Writes DIR/inference.json, "
        "likelihood_map.png, corner.png, "
        "posterior_samples.npy.",
    )
    p.add_argument("run", metavar="MODEL",
                   help="run directory (tfgalflow train) or SavedModel directory")
    p.add_argument("events", metavar="EVENTS",
                   help="events: .parquet (with --event-columns) or .npy [N, D]")
    p.add_argument("--event-columns", metavar="A,B,...",
                   help="a .parquet file's event columns, e.g. m0,m1")
    p.add_argument("--prior", required=True, metavar="NAME=LOW:HIGH[:log],...",
                   help="one box per label of the model, e.g. Z=1e-4:0.03:log,alpha=0.5:5")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--grid", type=int, default=40,
                   help="likelihood-map points per label (default 40)")
    p.add_argument("--walkers", type=int, default=16, help="emcee walkers (default 16)")
    p.add_argument("--steps", type=int, default=400, help="emcee steps per walker (default 400)")
    p.add_argument("--burn", type=int, default=150,
                   help="steps discarded as burn-in (default 150)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--truth", metavar="V1,V2,...",
                   help="true labels, if known (coverage + figures)")
    p.set_defaults(func=_run_infer_labels)


def _run_infer_labels(args) -> int:
    from .inference import Prior, infer_labels, read_events

    model, description = _model_description(args.run)
    names = description.get("label_names") or [f"label_{k}" for k in range(model.label_dim)]
    prior = Prior.parse(args.prior).ordered(names)
    truth = None if not args.truth else [float(v) for v in args.truth.split(",")]
    result = infer_labels(model, read_events(args.events, args.event_columns), prior, args.out,
                          truth=truth, grid_points=args.grid, walkers=args.walkers,
                          steps=args.steps,
                          burn=args.burn, seed=args.seed)
    for name, (lo, mid, hi) in result["posterior"]["intervals_68"].items():
        print(f"{name}: {mid:.4g} (68 %: {lo:.4g} .. {hi:.4g})")
    print(f"maximum likelihood: {dict(zip(prior.names, result['maximum']['labels']))}; "
          f"written to {args.out}/ (inference.json, likelihood_map.png, corner.png)")
    return 0


_SUBCOMMANDS.append(_add_infer_labels)


# ---- sweep (training) ---------------------------------------------------------------------------

def _add_sweep(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="hyperparameter grid: one run config per point, train them, tabulate the losses",
        description="Write SWEEP/point_XXX/config.json for every point of a grid of TrainConfig "
        "fields over the base CONFIG; with --train CATALOGUE train the points one after another "
        "(finished points skipped, interrupted ones resumed; --point K for one point, e.g. "
        "$SLURM_ARRAY_TASK_ID); always print and write SWEEP/summary.csv of the best validation "
        "losses so far (tfgalflow.training.sweep).",
    )
    p.add_argument("config", metavar="CONFIG", help="base TrainConfig (JSON/YAML, or a run's "
                   "config.json)")
    p.add_argument("--grid", nargs="+", required=True, metavar="FIELD=V1,V2",
                   help="grid of fields, e.g. layers=4,8 hidden=64,128 (list values: 64x64)")
    p.add_argument("--out", required=True, metavar="SWEEP", help="sweep directory")
    p.add_argument("--train", metavar="CATALOGUE", help="train the points on this catalogue")
    p.add_argument("--point", type=int, default=None, metavar="K",
                   help="with --train: only grid point K (0-based)")
    p.add_argument("--units", metavar="LENGTH,VELOCITY",
                   help="units of a catalogue that does not record them")
    p.add_argument("--verbose", type=int, choices=(0, 1, 2), default=2,
                   help="Keras output while training (default: 2, one line per epoch)")
    p.set_defaults(func=_run_sweep)


def _run_sweep(args) -> int:
    from .errors import InputError
    from .training import TrainConfig
    from .training.sweep import format_table, parse_grid, summarize, train_points, write_sweep

    if args.point is not None and not args.train:
        raise InputError("--point K needs --train CATALOGUE")
    sweep = write_sweep(TrainConfig.from_file(args.config), parse_grid(args.grid), args.out)
    print(f"{args.out}: {len(sweep['points'])} grid points")
    if args.train:
        from .catalogue import Catalogue
        from .points import parse_units
        units = parse_units(args.units)
        data = Catalogue.load(args.train, units=units) if units else args.train
        train_points(args.out, data, None if args.point is None else [args.point],
                     verbose=args.verbose)
    print(format_table(summarize(args.out)))
    return 0


_SUBCOMMANDS.append(_add_sweep)


# ---- entry point ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The ``tfgalflow`` argument parser: one subcommand per entry of the subcommand table."""
    parser = argparse.ArgumentParser(
        prog="tfgalflow",
        description="Conditional normalizing flows for galactic phase-space data.",
    )
    parser.add_argument("--version", action="version", version=f"tfgalflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default sys.argv); returns the exit status
    (2 for errors).
    """
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TfgalflowError as exc:
        print(f"tfgalflow {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
