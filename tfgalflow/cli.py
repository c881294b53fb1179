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
