"""Command line: parses, calls one library function per command and prints the record it returns. Heavy imports are
lazy (`asfda --help` imports no torch).

`asfda.cli.parser` defines the arguments (`build_parser`; the shared flags and their defaults: `asfda.cli.flags`),
each command naming its handler in `asfda.cli.commands` or `asfda.cli.project_commands`; `main` is the ``asfda``
script."""

from __future__ import annotations

import logging
import sys

from asfda.cli.commands import dispatch
from asfda.cli.parser import build_parser
from asfda.errors import AsfdaError

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # nothing done: say so, and not with exit code 0
        parser.print_help(sys.stderr)
        print("asfda: error: name a command (asfda COMMAND --help for its options)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="asfda: %(levelname)s: %(message)s")
    _quiet_warnings()
    try:
        return dispatch(args)
    except AsfdaError as exc:
        if args.debug:
            raise
        print(f"asfda: error: {exc.one_line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("asfda: interrupted; finished rounds are saved, run the same command again to resume", file=sys.stderr)
        return 130


def _quiet_warnings() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"monai\..*")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"monai\..*")
