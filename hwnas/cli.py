"""The `hwnas` command: a thin layer over the Python API.

Each command lives in `hwnas/commands/<name>.py` with `add_parser(subparsers)`; the parser sets
`run`. Errors a user can cause (`HwnasError`) are caught here, once, and printed as one line.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from typing import Any, NoReturn, TextIO

from hwnas.errors import HwnasError

COMMANDS = ("demo", "profile", "latency", "train", "search", "export", "import")
# a command whose module has another name: `import` is a Python keyword
MODULES = {"import": "imports"}


class OneLineParser(argparse.ArgumentParser):
    """An option argparse cannot read (`--queries abc`, a missing `--space`) is one line and exit 2, like every
    other bad input, instead of the usage block above it; the line says where the usage is."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="hwnas",
        description="Hardware-aware NAS: profile a device, search under a latency budget, export engines.",
        epilog="Run 'hwnas COMMAND --help' for a command's options and an example.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"hwnas.commands.{MODULES.get(name, name)}")
        except ModuleNotFoundError as exc:
            if exc.name != f"hwnas.commands.{MODULES.get(name, name)}":
                raise
            continue
        module.add_parser(sub)
    return parser


def _one_line_warnings(command: str) -> Any:
    """A warning hwnas raises (a resumed table measured with a soft difference, ...) reaches a CLI user as one
    `hwnas CMD: warning: ...` line, not Python's `file:line: UserWarning:` and the source line under it."""

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: TextIO | None = None, line: str | None = None) -> None:
        print(f"hwnas {command}: warning: {message}", file=file or sys.stderr)

    return show


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    shown = warnings.showwarning
    warnings.showwarning = _one_line_warnings(args.command)
    try:
        return int(args.run(args) or 0)
    except HwnasError as exc:
        print(f"hwnas {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hwnas {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # the disk filled or a path went away mid-run: what the OS said, in one line
        where = f": {exc.filename}" if exc.filename else ""
        print(f"hwnas {args.command}: error: {exc.strerror or exc}{where} (files already written are complete: every "
              "write is atomic)", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
