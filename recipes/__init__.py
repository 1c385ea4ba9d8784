"""YAML recipes of the training arms (installed as dipreg.recipes), and the one place recipes are looked up.

`dipreg fit` and `dipreg arms` both resolve a recipe here (a packaged name or a YAML path) and then parse it
with the same LightningCLI (:func:`dipreg.training.fit.build_cli`). This module imports neither Lightning nor torch.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

__all__ = ["RECIPES", "load_recipe", "recipe_path"]

#: Packaged recipe names (``recipes/<name>.yaml``).
RECIPES: tuple[str, ...] = tuple(
    sorted(p.name.removesuffix(".yaml") for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))
)


def recipe_path(name_or_path: str | Path) -> Path:
    """The YAML of a packaged recipe name, or ``name_or_path`` itself when it names a YAML file.

    Unknown names raise a ValueError listing the packaged recipes; a YAML path that does not exist raises
    FileNotFoundError.
    """
    text = str(name_or_path)
    if text in RECIPES:
        return Path(str(resources.files(__name__).joinpath(f"{text}.yaml")))
    if text.endswith((".yaml", ".yml")) or Path(text).exists():
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(
                f"Recipe file {text!r} does not exist (or is not a file). Pass an existing YAML file or a "
                f"packaged recipe ({', '.join(RECIPES)})."
            )
        return path
    raise ValueError(f"Unknown recipe {text!r}. Packaged recipes: {', '.join(RECIPES)}; or pass --config FILE.")


def load_recipe(name_or_path: str | Path) -> dict[str, Any]:
    """A recipe (packaged name or YAML path) as a dict."""
    config = yaml.safe_load(recipe_path(name_or_path).read_text())
    if not isinstance(config, dict):
        raise ValueError(f"Recipe {str(name_or_path)!r} is not a YAML mapping.")
    return config
