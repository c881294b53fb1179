"""The ``tfgalflow`` command line: thin argparse subcommands over the Python API.

Each subcommand has an ``_add_<name>(subparsers)`` function that declares its arguments and sets
``func`` to a ``_run_<name>(args) -> int`` handler. Errors the package raises on purpose
(``TfgalflowError``) are printed as one line and exit with status 2; anything else is a bug and
keeps its traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")   # keep TensorFlow's C++ start-up chatter off the CLI

from . import __version__  # noqa: E402
from .errors import TfgalflowError  # noqa: E402


_SUBCOMMANDS = []   # the _add_<name> functions, in the order `tfgalflow --help` lists them

# ---- subcommands ------------------------------------------------------------------------------
# Each block: _add_<name>(sub) declares the arguments and sets func=_run_<name>; _run_<name>(args)
# calls the Python API and returns an exit code; the block ends with _SUBCOMMANDS.append(_add_<name>).


# ---- export, serve (serving) ----------------------------------------------------------------------

def _add_export(sub) -> None:
    p = sub.add_parser(
        "export", help="export a trained run as a versioned SavedModel for TF Serving",
        description="Write RUN's model to OUT/NAME/<next free version>/ as a SavedModel with the signatures "
                    "serving_default (= log_prob), log_prob, grad_log_prob, sample and, for unconditional 6D "
                    "phase-space models, accelerations; then regenerate OUT/models.config for "
                    "tensorflow_model_server. Never overwrites a version. Prints the version directory.")
    p.add_argument("run", metavar="RUN", help="finished run directory (written by `tfgalflow train`)")
    p.add_argument("--name", required=True, help="model name (the URL's /v1/models/NAME)")
    p.add_argument("--out", default="saved_models", metavar="DIR",
                   help="model base directory (default: saved_models)")
    p.add_argument("--base-path", metavar="DIR",
                   help="where DIR is for the server, written into models.config (e.g. /models inside the "
                        "tensorflow/serving container); default: the absolute path of --out")
    p.add_argument("--version-policy", choices=("all", "latest"), default="all",
                   help="models.config version policy: serve all versions (default, as `tfgalflow serve`) "
                        "or only the latest (TF Serving's default)")
    p.add_argument("--accelerations", action=argparse.BooleanOptionalAction, default=None,
                   help="add the accelerations signature (default: when the model is 6D and unconditional)")
    p.add_argument("--n-velocities", type=int, default=256, metavar="K",
                   help="velocities sampled per position by the accelerations signature (default: 256)")
    p.set_defaults(func=_run_export)


def _run_export(args) -> int:
    from .export import export_versioned, write_models_config
    from .training import load_run, read_run_config
    run_config = read_run_config(args.run)
    model = load_run(args.run)
    path = export_versioned(model, args.out, args.name, run_config=run_config,
                            accelerations=args.accelerations, n_velocities=args.n_velocities)
    write_models_config(args.out, base_path=args.base_path, version_policy=args.version_policy)
    print(path)
    return 0


_SUBCOMMANDS.append(_add_export)


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve SavedModels over the TensorFlow Serving REST API",
        description="Serve every model under BASE (BASE/NAME/<version>/saved_model.pb; all versions, the "
                    "highest by default) at http://HOST:PORT/v1/models/NAME[:predict|/metadata], speaking "
                    "the TF Serving REST API. Listens on loopback only unless --host says otherwise.")
    p.add_argument("base", metavar="BASE", help="model base directory, e.g. saved_models/")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default: 127.0.0.1; 0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=int, default=8501, help="port (default: 8501, TF Serving's REST port)")
    p.add_argument("--max-body-mb", type=float, default=64.0, metavar="MB",
                   help="largest request body in MiB; larger ones get 413 (default: 64)")
    p.add_argument("--max-rows", type=int, default=100_000, metavar="N",
                   help="largest batch per request; larger ones get 413 (default: 100000)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="threads running requests (default: min(4, CPUs))")
    p.add_argument("--poll-seconds", type=float, default=2.0, metavar="S",
                   help="rescan BASE for new or removed versions every S seconds (0 = never; default: 2)")
    p.add_argument("--label", action="append", default=[], metavar="NAME:LABEL=VERSION",
                   help="version label for /v1/models/NAME/labels/LABEL URLs (repeatable)")
    p.set_defaults(func=_run_serve)


def _run_serve(args) -> int:
    from .errors import InputError
    from .serving import serve
    labels: dict = {}
    for item in args.label:
        name, _, rest = item.partition(":")
        label, _, version = rest.partition("=")
        if not (name and label and version.isdigit()):
            raise InputError(f"--label {item!r}: expected NAME:LABEL=VERSION, e.g. hernquist_iso:stable=1")
        labels.setdefault(name, {})[label] = int(version)
    if args.max_body_mb <= 0:
        raise InputError(f"--max-body-mb {args.max_body_mb}: expected a positive size in MiB")
    serve(args.base, host=args.host, port=args.port, max_body_bytes=int(args.max_body_mb * 2**20),
          max_rows=args.max_rows, workers=args.workers, poll_seconds=args.poll_seconds or None,
          version_labels=labels)
    return 0


_SUBCOMMANDS.append(_add_serve)


# ---- entry point ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
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
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TfgalflowError as exc:
        print(f"tfgalflow {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
