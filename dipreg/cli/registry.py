"""The registry of `dipreg` sub-commands: each names the ``run_*`` function it feeds (``module:function``), imported
only when that command is selected."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

RunFunction = Callable[..., Any]
#: ``(parser, run function) -> None``: adds a command's arguments, their defaults read from the run function.
AddArguments = Callable[[argparse.ArgumentParser, RunFunction], None]
#: ``(run function, parsed arguments) -> result``: calls the run function.
Call = Callable[[RunFunction, argparse.Namespace], object]


@dataclasses.dataclass(frozen=True)
class Command:
    """One sub-command: its one-line help, the run function it feeds (``module:function``, imported only when the
    command is selected), how its arguments are added and how the parsed arguments call the run function."""

    help: str
    target: str
    add_arguments: AddArguments
    call: Call

    def function(self) -> RunFunction:
        """The run function (imports its module)."""
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)


#: name -> command, in the order `dipreg --help` lists them; later sub-commands register here.
COMMANDS: dict[str, Command] = {}


def command(name: str, help_text: str, target: str, add_arguments: AddArguments) -> Callable[[Call], Call]:
    """Register the decorated call as sub-command ``name`` feeding ``target`` (``module:function``)."""

    def register(call: Call) -> Call:
        COMMANDS[name] = Command(help_text, target, add_arguments, call)
        return call

    return register
