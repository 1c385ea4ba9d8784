"""Option helpers and the argument groups every command shares (model, pairs and prompt, output).

Defaults are read from the ``run_*`` function a command feeds (its signature) or its settings dataclass, so each
default is written once, next to the code that uses it; every option's help ends with its default.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from typing import Any

from dipreg.cli.registry import RunFunction
from dipreg.models import DEFAULT_MODEL_NAME
from dipreg.prompting import PROMPT_STYLES


class Defaults(dict[str, Any]):
    """Name -> default of a run function's parameters or a settings dataclass's fields; asking for one without a
    default is a programming error that names the source to fix."""

    def __init__(self, source: RunFunction | type) -> None:
        if isinstance(source, type) and dataclasses.is_dataclass(source):
            given = {f.name: f.default for f in dataclasses.fields(source) if f.default is not dataclasses.MISSING}
        else:
            parameters = inspect.signature(source).parameters.values()
            given = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
        super().__init__(given)
        self.source = f"{source.__module__}.{source.__qualname__}"

    def __missing__(self, name: str) -> Any:
        raise TypeError(f"{self.source} has no default for {name!r}: the CLI reads its defaults from there.")


def show(value: Any) -> str:
    """A default as it is typed on the command line (lists comma-separated)."""
    if isinstance(value, list | tuple):
        return ",".join(show(v) for v in value)
    if isinstance(value, float):
        return format(value, "g")
    return str(value)


def option(
    group: argparse._ActionsContainer, *flags: str, help: str, default: Any = None, none: str | None = None, **kwargs
) -> argparse.Action:
    """Add an option whose help ends with its default (``none``: what a ``None`` default means) or with
    ``required``. A flag (``store_true``/``store_false``) shows whether it is on by default."""
    if kwargs.get("required"):
        suffix = "required"
    elif kwargs.get("action") in ("store_true", "store_false"):
        suffix = "default: " + ("on" if default == (kwargs["action"] == "store_true") else "off")
    elif default is None:
        if none is None:
            raise TypeError(f"{flags[0]}: say what its default None means (none=...)")
        suffix = f"default: {none}"
    else:
        suffix = f"default: {show(default)}"
    text = f"{help} ({suffix})".replace("%", "%%")
    return group.add_argument(*flags, default=default, help=text, **kwargs)


def csv_list(text: str) -> list[str]:
    """Split a comma-separated option into its non-empty parts."""
    return [part.strip() for part in text.split(",") if part.strip()]


def window_arg(text: str) -> tuple[float, float]:
    """Parse ``lo,hi``."""
    parts = csv_list(text)
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected LO,HI (e.g. 0.25,0.90), got {text!r}")
    return float(parts[0]), float(parts[1])


def float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in csv_list(text)]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in csv_list(text)]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def limit_arg(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"--limit must be >= 0 (0 = all vignettes), got {value}")
    return value


def model_group(p: argparse.ArgumentParser, run: RunFunction) -> argparse._ArgumentGroup:
    """--model, feeding ``model_name``."""
    group = p.add_argument_group("model")
    option(
        group,
        "--model",
        metavar="M",
        default=Defaults(run)["model_name"],
        none=f"the embedded {DEFAULT_MODEL_NAME}",
        help="HF name or local path",
    )
    return group


def pair_sets_help() -> str:
    """``--pairs`` of the commands that read minimal pairs: a built-in set or a JSONL file."""
    from dipreg.stimuli.jsonl import BUILTIN_SETS

    return f"{' | '.join(BUILTIN_SETS)} | FILE.jsonl"


PROMPT_HELP = (
    "how contexts are shown; auto: the chat template when the tokenizer has one (question as user turn, 'Answer:' "
    "opening the assistant turn), else raw text"
)


def pairs_group(
    p: argparse.ArgumentParser,
    run: RunFunction,
    *,
    pairs_help: str,
    pairs: str = "pairs_name",
    batch_size: bool = True,
    window: bool = True,
    prompt: bool = True,
    prompt_why: str = "",
) -> argparse._ArgumentGroup:
    """--pairs (feeding ``pairs``), and where the command has them --batch-size, --window, --prompt."""
    given = Defaults(run)
    group = p.add_argument_group("pairs and prompt")
    option(group, "--pairs", default=given[pairs], help=pairs_help)
    if batch_size:
        option(
            group, "--batch-size", metavar="N", type=int, default=given["batch_size"], help="contexts per forward pass"
        )
    if window:
        option(
            group,
            "--window",
            metavar="LO,HI",
            type=window_arg,
            default=given["window"],
            help="dip window LO,HI: the relative-depth range max_wrong_dip reads",
        )
    if prompt:
        option(group, "--prompt", choices=PROMPT_STYLES, default=given["prompt"], help=PROMPT_HELP + prompt_why)
    return group


def output_group(p: argparse.ArgumentParser, run: RunFunction, none: str | None = None) -> argparse._ArgumentGroup:
    """--out, feeding ``out``."""
    group = p.add_argument_group("output")
    option(group, "--out", metavar="DIR", default=Defaults(run)["out"], none=none, help="output folder")
    return group
