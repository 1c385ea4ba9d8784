"""`dipreg fit`: a thin LightningCLI over :class:`DipRegModule` and :class:`PairDataModule`.

Recipes are YAML files in ``dipreg.recipes`` (``--recipe NAME``) or anywhere (``--config PATH``); every option is
overridable flag by flag (``--model.lr 1e-4``, ``--trainer.max_steps 5``). ``--model NAME`` is shorthand for
``--model.model_name NAME`` (the base model; default: the embedded SmolLM2-135M-Instruct). ``--help`` prints these
options, the packaged recipes and examples (:func:`help_header`) before LightningCLI's own help.

:func:`build_cli` is the one recipe parser: `dipreg arms` instantiates each of its arms through it as well. Every
fit it builds has :class:`~dipreg.callbacks.heldout.HeldOutEval` (``--heldout.*``) and
:class:`~dipreg.callbacks.health.TrainingHealth` (``--health.*``) attached. Bad input is refused before the model
loads, as a ``ValueError`` that names its source: a config file that is not a YAML mapping, an option the parser
refuses (with the config files it read), or a ``trainer.max_steps`` that would train without a stated limit.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from dipreg.callbacks.health import TrainingHealth
from dipreg.callbacks.heldout import HeldOutEval
from dipreg.models import resolve_device
from dipreg.recipes import RECIPES, recipe_path
from dipreg.training.data import PairDataModule
from dipreg.training.module import DipRegModule

__all__ = [
    "TRAINER_DEFAULTS",
    "DipRegCLI",
    "build_cli",
    "check_config_file",
    "check_max_steps",
    "help_header",
    "run_fit",
    "translate_args",
]

TRAINER_DEFAULTS: dict[str, Any] = {
    "default_root_dir": "runs/fit",
    "callbacks": [RichProgressBar()],  # persistent (LightningCLI keeps trainer_defaults callbacks)
}


def _is_config_value(value: str) -> bool:
    return value.endswith((".yaml", ".yml", ".json")) or value.lstrip().startswith(("{", "class_path"))


def _recipe_hint() -> str:
    """What to pass instead of a bad config file."""
    groups = "trainer:, model:, data:, heldout:, health:"
    return f"pass a YAML mapping of options ({groups}) or --recipe NAME ({', '.join(RECIPES)})"


def check_config_file(path: str | Path) -> Path:
    """Check that ``path`` holds a YAML mapping (what LightningCLI reads from ``--config``) and return it.

    A file that is not UTF-8, not YAML (a truncated flow list, control bytes), empty, or not a mapping raises a
    one-line ``ValueError`` naming the file and the problem; a missing file raises ``FileNotFoundError``. Which keys
    the mapping may hold is the parser's to check (:func:`build_cli` names the file in its errors too).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {str(path)!r} does not exist; {_recipe_hint()}.")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"Config file {path}: not UTF-8 text (byte {err.start}: 0x{err.object[err.start]:02x}); {_recipe_hint()}."
        ) from err
    try:
        config = yaml.safe_load(text)
    except yaml.reader.ReaderError as err:  # a byte YAML does not allow (no line/column: a character offset)
        raise ValueError(
            f"Config file {path}: not valid YAML (character #x{err.character:04x} at offset {err.position}: "
            f"{err.reason}); fix it, or {_recipe_hint()}."
        ) from err
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(err, "problem", None) or " ".join(str(err).split())
        raise ValueError(f"Config file {path}: not valid YAML ({problem}{at}); fix it, or {_recipe_hint()}.") from err
    if config is None:
        raise ValueError(f"Config file {path} is empty; {_recipe_hint()}.")
    if not isinstance(config, dict):
        raise ValueError(f"Config file {path} holds a YAML {type(config).__name__}, not a mapping; {_recipe_hint()}.")
    return path


def check_max_steps(max_steps: int | None, max_epochs: int | None) -> None:
    """Refuse a step limit that would train without a stated end.

    Lightning reads ``max_steps=-1`` as "no step limit": ``max_epochs`` then decides, and when it is unset
    Lightning runs 1000 epochs. So ``-1`` is accepted only with an explicit ``max_epochs``, and any other negative
    value is refused (Lightning's rule: a step count >= 0, or -1).
    """
    if max_steps is None or max_steps >= 0:
        return
    if max_steps != -1:
        raise ValueError(
            f"trainer.max_steps={max_steps} (--trainer.max_steps): must be a number of optimizer steps >= 0, or -1 "
            "for no step limit together with an explicit --trainer.max_epochs N."
        )
    if max_epochs is None:
        raise ValueError(
            "trainer.max_steps=-1 (--trainer.max_steps) means no step limit, so trainer.max_epochs decides when "
            "training ends, and it is not set (Lightning would run 1000 epochs): give --trainer.max_epochs N as "
            "well, or a step count --trainer.max_steps N."
        )


def translate_args(argv: Sequence[str]) -> list[str]:
    """Turn ``--recipe NAME`` into ``--config <packaged yaml>`` and a bare ``--model NAME`` into
    ``--model.model_name NAME``; configs go first (LightningCLI applies later flags over them). Missing config
    files raise FileNotFoundError; a config file that is not a YAML mapping a ValueError naming it
    (:func:`check_config_file`)."""
    configs: list[str] = []
    rest: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg, value = args[i], args[i + 1] if i + 1 < len(args) else None
        key, eq, inline = arg.partition("=")
        if eq:
            value = inline
        step = 1 if eq else 2
        if key in ("--recipe", "--config", "--model", "--dtype", "--device", "--device-map") and value is None:
            raise ValueError(f"{key} needs a value.")
        if key == "--recipe":
            configs += ["--config", str(check_config_file(recipe_path(value)))]
        elif key == "--config":
            check_config_file(value)  # a missing file raises FileNotFoundError naming it
            configs += ["--config", value]
        elif key == "--model" and not _is_config_value(value):
            rest += ["--model.model_name", value]
        elif key in ("--dtype", "--device", "--device-map"):
            rest += _device_flags(key, value)
        else:
            rest.append(arg)
            step = 1
        i += step
    return configs + rest


def _device_flags(key: str, value: str) -> list[str]:
    """LightningCLI flags for ``--dtype`` (the frozen base's dtype: ``--model.dtype``) and ``--device`` (``cpu`` ->
    ``--trainer.accelerator cpu``; ``cuda`` / ``cuda:i`` -> ``gpu``, on GPU ``i``). ``--device-map`` is refused:
    Lightning places the model it trains (several GPUs: ``--trainer.strategy ddp`` or ``fsdp``)."""
    if key == "--dtype":
        return ["--model.dtype", value]
    if key == "--device-map":
        raise ValueError(
            "dipreg fit: --device-map is for audits; Lightning places the model it trains. Train on several GPUs "
            "with --trainer.strategy ddp (or fsdp) --trainer.devices N."
        )
    device = resolve_device(value)
    if device.type == "cpu":
        return ["--trainer.accelerator", "cpu"]
    devices = f"[{device.index}]" if device.index is not None else "1"
    return ["--trainer.accelerator", "gpu", "--trainer.devices", devices]


class DipRegCLI(LightningCLI):
    """LightningCLI with the held-out before/after evaluation (``--heldout.*`` options) and the training-health
    check (``--health.*``) always attached; ``trainer.max_steps`` is checked before anything is instantiated."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Attach :class:`HeldOutEval` and :class:`TrainingHealth` (each callback gets its flags)."""
        parser.add_lightning_class_args(HeldOutEval, "heldout")
        parser.add_lightning_class_args(TrainingHealth, "health")

    def before_instantiate_classes(self) -> None:
        """Before the model loads: refuse an unbounded ``trainer.max_steps`` (:func:`check_max_steps`) and check the
        ``health.*`` options (by building a :class:`TrainingHealth` from them). ``--trainer.enable_progress_bar
        false`` drops the default :class:`RichProgressBar` (Lightning refuses the two together)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_max_steps(config.get("trainer.max_steps"), config.get("trainer.max_epochs"))
        health = config.get("health")
        TrainingHealth(**(health.as_dict() if health is not None else {}))
        if config.get("trainer.enable_progress_bar") is False:  # Lightning refuses a progress bar callback then
            callbacks = self.trainer_defaults.get("callbacks") or []
            kept = [c for c in callbacks if not isinstance(c, RichProgressBar)]
            self.trainer_defaults = {**self.trainer_defaults, "callbacks": kept}


def build_cli(args: Sequence[str], *, run: bool, trainer_defaults: dict[str, Any] | None = None) -> DipRegCLI:
    """The one LightningCLI of `dipreg fit` and `dipreg arms`, on LightningCLI-ready ``args`` (``--config FILE``
    first, then flags; see :func:`translate_args`).

    ``run=False`` only parses and instantiates (``cli.model``, ``cli.datamodule``, ``cli.trainer``);
    ``run=True`` fits. ``trainer_defaults`` replaces :data:`TRAINER_DEFAULTS`: its ``callbacks`` are appended to
    the recipe's, its other keys are defaults that a recipe or a flag overrides.
    """
    # We pass args on purpose; Lightning warns whenever sys.argv is non-empty too.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    args = list(args)
    try:
        return DipRegCLI(
            DipRegModule,
            PairDataModule,
            args=(["fit", *args] if run else args),
            run=run,
            save_config_kwargs={"overwrite": True},
            trainer_defaults=TRAINER_DEFAULTS if trainer_defaults is None else trainer_defaults,
            seed_everything_default=0,
            # parse errors raise (and are named below) instead of printing the usage and exiting
            parser_kwargs={"exit_on_error": False, "fit": {"exit_on_error": False}},
        )
    except argparse.ArgumentError as err:
        configs = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "--config"]
        source = f"the config file {', then '.join(configs)} and then the flags" if configs else "the flags"
        raise ValueError(
            f"dipreg fit: {' '.join(str(err).split())} (options read from {source}); fix that option, "
            "`dipreg fit --help` lists every one."
        ) from err


def help_header() -> str:
    """What ``dipreg fit --help`` prints before LightningCLI's own (long) help: dipreg's options, the packaged
    recipes (:data:`dipreg.recipes.RECIPES`) and example command lines."""
    recipes = "\n".join(f"    {name}" for name in RECIPES)
    return f"""usage: dipreg fit [--recipe NAME | --config FILE] [--model NAME] [LightningCLI flags ...]

dipreg's own options (read before LightningCLI's, which follow below):
  --recipe NAME   a packaged recipe (a YAML config; later flags override it), one of:
{recipes}
  --config FILE   a YAML config of your own (trainer:, model:, data:, heldout:, health:); may follow --recipe
  --model NAME    the base model, an HF name or a local path (shorthand for --model.model_name NAME;
                  default: the embedded SmolLM2-135M-Instruct)
  --dtype DTYPE   the frozen base's dtype: auto | bfloat16 | float16 | float32 (shorthand for --model.dtype;
                  default: auto = bfloat16 on a GPU, float32 on a CPU); LoRA weights are always float32
  --device DEV    auto | cpu | cuda | cuda:INDEX (shorthand for --trainer.accelerator/--trainer.devices;
                  default: auto = Lightning's choice). Precision: --trainer.precision bf16-mixed | bf16-true

examples:
  dipreg fit --recipe dip_reg --trainer.max_steps 20 --model.lr 1e-4
  dipreg fit --recipe dip_reg --trainer.callbacks+=dipreg.callbacks.DipMonitor \\
      --trainer.callbacks.pairs=comp_loose --trainer.callbacks.every_n_steps=15
  dipreg fit --recipe dip_reg_monitored --model HuggingFaceTB/SmolLM2-360M-Instruct

LightningCLI's options:
"""


def run_fit(argv: Sequence[str], *, run: bool = True) -> DipRegCLI:
    """Run ``dipreg fit`` with ``argv`` (everything after ``fit``); ``run=False`` only instantiates.

    With ``--help``/``-h`` in ``argv``, :func:`help_header` is printed first, then LightningCLI prints its help
    and exits (``SystemExit(0)``).
    """
    if "--help" in argv or "-h" in argv:
        print(help_header(), flush=True)
    return build_cli(translate_args(argv), run=run)
