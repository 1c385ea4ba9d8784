"""`dipreg fit`: a thin LightningCLI over :class:`DipRegModule` and :class:`PairDataModule`.

Recipes are YAML files in ``dipreg.recipes`` (``--recipe NAME``) or anywhere (``--config PATH``); every option is
overridable flag by flag (``--model.lr 1e-4``, ``--trainer.max_steps 5``). ``--model NAME`` is shorthand for
``--model.model_name NAME`` (the base model; default: the embedded SmolLM2-135M-Instruct).

:func:`build_cli` is the one recipe parser: `dipreg arms` instantiates each of its arms through it as well.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from dipreg.data import PairDataModule
from dipreg.heldout import HeldOutEval
from dipreg.module import DipRegModule
from dipreg.recipes import RECIPES, recipe_path

__all__ = ["TRAINER_DEFAULTS", "DipRegCLI", "build_cli", "run_fit", "translate_args"]

TRAINER_DEFAULTS: dict[str, Any] = {
    "default_root_dir": "runs/fit",
    "callbacks": [RichProgressBar()],  # persistent (LightningCLI keeps trainer_defaults callbacks)
}


def _is_config_value(value: str) -> bool:
    return value.endswith((".yaml", ".yml", ".json")) or value.lstrip().startswith(("{", "class_path"))


def translate_args(argv: Sequence[str]) -> list[str]:
    """Turn ``--recipe NAME`` into ``--config <packaged yaml>`` and a bare ``--model NAME`` into
    ``--model.model_name NAME``; configs go first (LightningCLI applies later flags over them). Missing config
    files raise FileNotFoundError."""
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
        if key in ("--recipe", "--config", "--model") and value is None:
            raise ValueError(f"{key} needs a value.")
        if key == "--recipe":
            configs += ["--config", str(recipe_path(value))]
        elif key == "--config":
            if not Path(value).is_file():
                raise FileNotFoundError(
                    f"Config file {value!r} does not exist. Pass an existing YAML file "
                    f"or --recipe NAME ({', '.join(RECIPES)})."
                )
            configs += ["--config", value]
        elif key == "--model" and not _is_config_value(value):
            rest += ["--model.model_name", value]
        else:
            rest.append(arg)
            step = 1
        i += step
    return configs + rest


class DipRegCLI(LightningCLI):
    """LightningCLI with the held-out before/after evaluation always attached (``--heldout.*`` options)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(HeldOutEval, "heldout")


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
    return DipRegCLI(
        DipRegModule,
        PairDataModule,
        args=(["fit", *args] if run else args),
        run=run,
        save_config_kwargs={"overwrite": True},
        trainer_defaults=TRAINER_DEFAULTS if trainer_defaults is None else trainer_defaults,
        seed_everything_default=0,
    )


def run_fit(argv: Sequence[str], *, run: bool = True) -> DipRegCLI:
    """Run ``dipreg fit`` with ``argv`` (everything after ``fit``); ``run=False`` only instantiates."""
    return build_cli(translate_args(argv), run=run)
