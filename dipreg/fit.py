"""`dipreg fit`: a thin LightningCLI over :class:`DipRegModule` and :class:`PairDataModule`.

Recipes are YAML files in ``dipreg.recipes`` (``--recipe NAME``) or anywhere (``--config PATH``); every option is
overridable flag by flag (``--model.lr 1e-4``, ``--trainer.max_steps 5``). ``--model NAME`` is shorthand for
``--model.model_name NAME`` (the base model; default: the embedded SmolLM2-135M-Instruct).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from dipreg.data import PairDataModule
from dipreg.heldout import HeldOutEval
from dipreg.module import DipRegModule

__all__ = ["RECIPES", "recipe_path", "run_fit", "translate_args"]

#: Packaged recipe names (``recipes/<name>.yaml``).
RECIPES: tuple[str, ...] = tuple(
    sorted(
        p.name.removesuffix(".yaml") for p in resources.files("dipreg.recipes").iterdir() if p.name.endswith(".yaml")
    )
)

TRAINER_DEFAULTS: dict[str, Any] = {
    "default_root_dir": "runs/fit",
    "callbacks": [RichProgressBar()],  # persistent (LightningCLI keeps trainer_defaults callbacks)
}


def recipe_path(name: str) -> Path:
    """The packaged YAML of recipe ``name``; unknown names raise a ValueError listing the recipes."""
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}. Packaged recipes: {', '.join(RECIPES)}; or pass --config FILE.")
    return Path(str(resources.files("dipreg.recipes").joinpath(f"{name}.yaml")))


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


def run_fit(argv: Sequence[str], *, run: bool = True) -> DipRegCLI:
    """Run ``dipreg fit`` with ``argv`` (everything after ``fit``); ``run=False`` only instantiates."""
    args = translate_args(argv)
    # We pass args on purpose (argv after `fit`); Lightning warns whenever sys.argv is non-empty too.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    return DipRegCLI(
        DipRegModule,
        PairDataModule,
        args=(["fit", *args] if run else args),
        run=run,
        save_config_kwargs={"overwrite": True},
        trainer_defaults=TRAINER_DEFAULTS,
        seed_everything_default=0,
    )
