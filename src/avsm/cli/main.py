"""``avsm`` command line: one sub-command per module in :mod:`avsm.cli`.

Each sub-command module defines ``add_parser(subparsers) -> None`` which
registers its parser and sets ``func(args) -> int``.  Errors in the user's
input (:class:`avsm.errors.AvsmError`) are printed as one line, exit code 2,
and never leave partial outputs (commands write through
:class:`avsm.io.outputs.OutputTransaction`).

``-v``/``-vv``/``--verbose`` (info, debug) and ``--quiet`` (no progress bars, no
info messages; warnings and errors are still printed) are accepted anywhere on
the line, before or after the sub-command: ``avsm -v register ...`` and
``avsm register ... -v`` are the same, and the counts add up
(``avsm -v register -v`` is ``-vv``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from avsm.errors import AvsmError

SUBCOMMANDS = ("register", "demo", "warp", "jacobian", "train", "evaluate", "status")

log = logging.getLogger("avsm")

#: where the sub-command's copies of the verbosity options store their values (added to the
#: top-level ones by :func:`parse_args`; separate so that neither position overwrites the other)
_SUB_VERBOSE, _SUB_QUIET = "_sub_verbose", "_sub_quiet"

VERBOSE_HELP = "-v info, -vv debug messages (before or after the sub-command)"
QUIET_HELP = ("no progress bars and no info messages; warnings and errors are still printed "
              "(before or after the sub-command)")


def _add_verbosity(parser: argparse.ArgumentParser, verbose_dest: str, quiet_dest: str) -> None:
    g = parser.add_argument_group("messages")
    g.add_argument("-v", "--verbose", action="count", default=0, dest=verbose_dest, help=VERBOSE_HELP)
    g.add_argument("--quiet", action="store_true", default=False, dest=quiet_dest, help=QUIET_HELP)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every available sub-command (each also takes ``-v`` and ``--quiet``)."""
    parser = argparse.ArgumentParser(prog="avsm", description="Joint affine + vSVF 3-D image registration")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    _add_verbosity(parser, "verbose", "quiet")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            mod = importlib.import_module(f"avsm.cli.{name}")
        except ModuleNotFoundError as e:  # a sub-command whose module is not installed
            if e.name == f"avsm.cli.{name}":
                continue
            raise
        mod.add_parser(sub)
        _add_verbosity(sub.choices[name], _SUB_VERBOSE, _SUB_QUIET)
    return parser


def parse_args(argv: Sequence[str] | None = None,
               parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parsed arguments, with ``verbose`` (a count) and ``quiet`` from both positions merged."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    args.verbose = int(args.verbose) + int(vars(args).pop(_SUB_VERBOSE, 0) or 0)
    args.quiet = bool(args.quiet) or bool(vars(args).pop(_SUB_QUIET, False))
    if args.quiet and args.verbose:
        parser.error("give -v/--verbose or --quiet, not both")
    return args


def log_level(args: argparse.Namespace) -> int:
    """The level of the ``avsm`` loggers: WARNING (default and ``--quiet``), INFO (``-v``), DEBUG (``-vv``)."""
    if args.quiet:
        return logging.WARNING
    return logging.WARNING - 10 * min(int(args.verbose), 2)


def configure_logging(level: int) -> None:
    """Print ``avsm`` messages of ``level`` and above on stderr (other libraries: warnings)."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``avsm`` console script; returns the exit code."""
    parser = build_parser()
    args = parse_args(argv, parser)
    configure_logging(log_level(args))
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
