"""Option helpers and the argument groups every command shares (model, pairs and prompt, output).

Defaults are read from the ``run_*`` function a command feeds (its signature) or its settings dataclass, so each
default is written once, next to the code that uses it; every option's help ends with its default.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any

from dipreg.cli.registry import RunFunction
from dipreg.models import DEFAULT_MODEL_NAME, DEVICE_MAP_STRATEGIES, DTYPE_CHOICES, check_load_options, load_options
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


def device_map_arg(text: str) -> str | dict[str, int | str]:
    """``--device-map``: a strategy name, a JSON object, or a JSON file holding one (module name -> device)."""
    if text in DEVICE_MAP_STRATEGIES:
        return text
    source = Path(text).read_text(encoding="utf-8") if text.endswith(".json") and Path(text).is_file() else text
    try:
        value = json.loads(source)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(
            f"expected {' | '.join(DEVICE_MAP_STRATEGIES)}, a JSON object or a .json file, got {text!r}"
        ) from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a device map is a JSON object of module name -> device, got {text!r}")
    return value


def device_group(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """--device, --dtype, --device-map: where and in which precision every model the command loads lives
    (:func:`dipreg.load_model`; :func:`load_scope` applies them)."""
    group = p.add_argument_group("device and precision")
    option(
        group,
        "--device",
        default="auto",
        help="where the model runs: auto (cuda when a GPU is present, else cpu) | cpu | cuda | cuda:INDEX",
    )
    option(
        group,
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="weights' dtype; auto: bfloat16 on a GPU, float32 on a CPU (margins, DiD and statistics are float32 "
        "whatever it is)",
    )
    option(
        group,
        "--device-map",
        metavar="MAP",
        type=device_map_arg,
        none="none: the whole model on --device",
        help=f"spread the blocks over devices with accelerate: {' | '.join(DEVICE_MAP_STRATEGIES)} | a JSON object "
        "or .json file of module name -> GPU index, cpu or disk (e.g. a 32B audit over several GPUs: auto)",
    )
    return group


def load_scope(args: argparse.Namespace) -> contextlib.AbstractContextManager[None]:
    """The :func:`dipreg.models.load_options` scope of the parsed --device/--dtype/--device-map (a no-op for a
    command without them); checks them at once (a ``ValueError`` names the option)."""
    if not hasattr(args, "dtype"):
        return contextlib.nullcontext()
    try:
        check_load_options(dtype=args.dtype, device=args.device, device_map=args.device_map)
    except ValueError as err:
        raise ValueError(f"--device/--dtype/--device-map: {err}") from err
    return load_options(dtype=args.dtype, device=args.device, device_map=args.device_map)


def model_group(p: argparse.ArgumentParser, run: RunFunction) -> argparse._ArgumentGroup:
    """--model, feeding ``model_name``, and the :func:`device_group` options."""
    group = p.add_argument_group("model")
    option(
        group,
        "--model",
        metavar="M",
        default=Defaults(run)["model_name"],
        none=f"the embedded {DEFAULT_MODEL_NAME}",
        help="HF name or local path",
    )
    device_group(p)
    return group


def pair_sets_help() -> str:
    """``--pairs`` of the commands that read minimal pairs: a built-in set or a JSONL file."""
    from dipreg.stimuli.jsonl import BUILTIN_SETS

    return f"{' | '.join(BUILTIN_SETS)} | FILE.jsonl"


PROMPT_HELP = (
    "how contexts are shown; auto: the chat template when the tokenizer has one (question as user turn, 'Answer:' "
    "opening the assistant turn), else raw text; fewshot (pair sets only): raw text after 3 worked examples, "
    "other items of the same family with their correct answers"
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
    styles: tuple[str, ...] = PROMPT_STYLES,
) -> argparse._ArgumentGroup:
    """--pairs (feeding ``pairs``), and where the command has them --batch-size, --window, --prompt (``styles``:
    its choices)."""
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
        option(group, "--prompt", choices=styles, default=given["prompt"], help=PROMPT_HELP + prompt_why)
    return group


def output_group(p: argparse.ArgumentParser, run: RunFunction, none: str | None = None) -> argparse._ArgumentGroup:
    """--out, feeding ``out``."""
    group = p.add_argument_group("output")
    option(group, "--out", metavar="DIR", default=Defaults(run)["out"], none=none, help="output folder")
    return group
