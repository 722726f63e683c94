"""``avsm`` command line: one sub-command per module in :mod:`avsm.cli`.

Each sub-command module defines ``add_parser(subparsers) -> None`` which
registers its parser and sets ``func(args) -> int``.  Errors in the user's
input (:class:`avsm.errors.AvsmError`) are printed as one line, exit code 2,
and never leave partial outputs (commands write through
:class:`avsm.io.outputs.OutputTransaction`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from avsm.errors import AvsmError

SUBCOMMANDS = ("register", "demo", "warp", "jacobian", "train", "evaluate")

log = logging.getLogger("avsm")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every available sub-command."""
    parser = argparse.ArgumentParser(prog="avsm", description="Joint affine + vSVF 3-D image registration")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug logging")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    for name in SUBCOMMANDS:
        try:
            mod = importlib.import_module(f"avsm.cli.{name}")
        except ModuleNotFoundError as e:  # a sub-command whose module is not installed
            if e.name == f"avsm.cli.{name}":
                continue
            raise
        mod.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``avsm`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.version:
        from avsm import __version__

        sys.stdout.write(f"avsm {__version__}\n")
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except AvsmError as e:
        sys.stderr.write(f"avsm: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("avsm: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
