"""The `dipreg` console script: one sub-command per job, each taking --model and --out.

Every command names the ``run_*`` function it calls (``module:function``). Its options' defaults are read from that
function's signature (or its settings dataclass), so each default is written once, next to the code that uses it.
Only the selected command's arguments are built, and only then is its module imported: `dipreg --help` lists the
commands without importing any, and `dipreg audit` never loads Lightning.

- :mod:`~dipreg.cli.registry`: the command registry;
- :mod:`~dipreg.cli.options`: option helpers and the shared argument groups;
- :mod:`~dipreg.cli.commands`: the commands.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.text import Text

from dipreg.architectures import UnsupportedModelError
from dipreg.cli import commands as _commands  # noqa: F401  (registers the commands)
from dipreg.cli.options import load_scope
from dipreg.cli.registry import COMMANDS
from dipreg.models import ModelLoadError

__all__ = ["COMMANDS", "build_parser", "main"]


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser: every command with its one-line help, and the arguments of ``selected`` only
    (building them imports that command's run function to read its defaults)."""
    parser = argparse.ArgumentParser(
        prog="dipreg",
        description=__doc__.splitlines()[0],
        epilog="`dipreg COMMAND --help` lists a command's options and their defaults. `dipreg --debug COMMAND ...` (or "
        f"{DEBUG_ENV}=1) shows the full traceback of an error instead of one line.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        if name == selected:
            cmd.add_arguments(p, cmd.function())
    return parser


#: Set to 1 (or pass ``--debug`` before the command) to see the full traceback of an error instead of one line.
DEBUG_ENV = "DIPREG_DEBUG"
#: Errors that are the user's to fix: printed as one line, exit code 2.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, ModelLoadError, UnsupportedModelError)


def error_line(err: BaseException) -> Text:
    """``error: <message>`` on one line; the message is plain text, never Rich markup (user text such as a stimulus
    id ``[/oops]`` or a file name ``[draft].jsonl`` is shown as it is)."""
    message = " ".join(str(err).split()) or type(err).__name__
    return Text.assemble(("error:", "bold red"), " ", message)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dipreg`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if argv[:1] == ["--debug"]:
        debug, argv = True, argv[1:]
    if argv[:1] == ["fit"]:
        # LightningCLI parses everything after `fit` (argparse would claim --help, --model, ...).
        args = argparse.Namespace(command="fit", lightning_args=argv[1:])
    else:
        args = build_parser(argv[0] if argv else None).parse_args(argv)
    cmd = COMMANDS[args.command]
    try:
        with load_scope(args):  # --device/--dtype/--device-map reach every model the command loads
            cmd.call(cmd.function(), args)
    except USER_ERRORS as err:
        if debug:
            raise
        Console(stderr=True, soft_wrap=True).print(error_line(err))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
