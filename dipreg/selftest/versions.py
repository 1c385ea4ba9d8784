"""The library versions the self-check found, and the versions dipreg needs, read from the installed package's
metadata (pyproject's ``dependencies``, so the two never disagree)."""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

import torch
from packaging.requirements import Requirement  # PEP 508 parsing; packaging comes with transformers


def required() -> dict[str, str]:
    """Each dependency dipreg declares (optional extras left out) -> its version specifier (``">=2.4"``), from
    ``importlib.metadata.requires("dipreg")``."""
    found: dict[str, str] = {}
    for line in metadata.requires("dipreg") or []:
        requirement = Requirement(line)
        if requirement.marker is None or "extra" not in str(requirement.marker):
            found[requirement.name] = str(requirement.specifier)
    return found


def versions() -> dict[str, Any]:
    """Installed version of each library dipreg requires (:func:`required`; ``None`` when missing), the
    requirements, Python, CUDA and the GPU name."""
    needed = required()
    found: dict[str, str | None] = {}
    for name in needed:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "found": found,
        "required": needed,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "gpu": gpu,
    }
